"""Annotation for routed self-distillation: character spans -> tokens (multi-byte characters, spans across
token boundaries, observations), strict JSON validation of LLM annotators, the rule annotators."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracerl.distill.annotate import (ANNOTATORS, Annotation, AnnotationItem, AnnotatorContext, LLMAnnotator,
                                      annotation_prompt, parse_annotation)
from tracerl.distill.distiller import capped_tokens
from tracerl.distill.spans import _common_prefix, _decode, response_text, spans_to_tokens, token_char_ranges
from tracerl.envs import make_env
from tracerl.envs.base import Task
from tracerl.rollout import replay_turns


def _brute_ranges(tok, ids):
    """The definition: decode every prefix; a token covers the characters from the first one not yet
    complete before it to the last one its bytes touch."""
    text, out, done = _decode(tok, ids), [], 0
    for i in range(len(ids)):
        p = _decode(tok, ids[: i + 1])
        lcp = _common_prefix(p, text)
        end = min(len(text), lcp + (len(p) > lcp))
        out.append((min(done, end), end))
        done = max(done, lcp)
    return text, out


MULTIBYTE = "Café naïve — 3 × 4 = 12 😀 résumé 中文字符 <answer>Zoë</answer>"


@pytest.fixture(scope="module")
def tok(tiny_policy):
    return tiny_policy.tokenizer


def test_char_ranges_equal_the_prefix_decoding_definition(tok):
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    text, ranges = token_char_ranges(tok, ids)
    assert text == MULTIBYTE and (text, ranges) == _brute_ranges(tok, ids)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(list("ab é😀中<>/ \n") + ["<think>", "</answer>", "Sikur"]), max_size=30).map("".join))
def test_char_ranges_property_random_text(tiny_policy, s):
    tok = tiny_policy.tokenizer
    ids = tok.encode(s, add_special_tokens=False)
    text, ranges = token_char_ranges(tok, ids)
    assert (text, ranges) == _brute_ranges(tok, ids)
    # every character of the text is covered by some token, ranges are ordered and in bounds
    covered = set()
    for a, b in ranges:
        assert 0 <= a <= b <= len(text)
        covered.update(range(a, b))
    assert covered == set(range(len(text)))


def test_multibyte_character_split_over_tokens_routes_every_piece(tok):
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    text, ranges = token_char_ranges(tok, ids)
    for ch in ("é", "😀", "中"):
        at = text.index(ch)
        pieces = [k for k, (a, b) in enumerate(ranges) if a <= at < b]
        # the tiny BPE is trained on ASCII text: these characters take several byte tokens
        assert len(pieces) >= 2, (ch, pieces)
        assert tok.decode([ids[k] for k in pieces]).find(ch) >= 0  # together they hold the whole character
        resp = _response(tok, ids)
        assert spans_to_tokens(resp, [(at, at + 1)]) == pieces


def _response(tok, gen_ids, obs_ids=(), prompt=(1, 2)):
    ids = list(prompt) + list(gen_ids) + list(obs_ids)
    mask = [0] * len(prompt) + [1] * len(gen_ids) + [0] * len(obs_ids)
    return response_text(tok, ids, mask, len(prompt))


def test_span_crossing_a_token_boundary_covers_both_tokens_and_never_observations(tok):
    gen = tok.encode("<think>Sikur Foundry was founded</think>", add_special_tokens=False)
    obs = tok.encode("\n<information>Sikur Foundry</information>\n", add_special_tokens=False)
    resp = _response(tok, gen, obs)
    assert resp.text.startswith("<think>Sikur") and resp.segments[0][2] and not resp.segments[1][2]
    k = next(i for i, (a, b) in enumerate(resp.ranges) if b - a >= 2 and i + 1 < len(gen) and resp.ranges[i + 1][1] - resp.ranges[i + 1][0] >= 2)
    (a0, b0), (a1, b1) = resp.ranges[k], resp.ranges[k + 1]
    assert spans_to_tokens(resp, [(b0 - 1, a1 + 1)]) == [k, k + 1]  # last char of one, first of the next
    assert spans_to_tokens(resp, [(a0, b0)]) == [k]  # exactly one token's characters
    assert spans_to_tokens(resp, [(b0, b0)]) == []  # empty span
    # a span over the whole text routes exactly the generated tokens
    assert spans_to_tokens(resp, [(0, len(resp.text))]) == list(range(len(gen)))
    obs_start = resp.segments[1][0]
    assert spans_to_tokens(resp, [(obs_start, len(resp.text))]) == []


def _item(tok, gen_text, success, obs_text="\n<information>Doc 1 (X): facts</information>\n", task=None):
    gen = tok.encode(gen_text, add_special_tokens=False)
    obs = tok.encode(obs_text, add_special_tokens=False) if obs_text else []
    task = task or Task("t", "Who founded Sikur Foundry?", ("Besain Railand",), {"chain": ["Sikur Foundry"]})
    return AnnotationItem(task, success, _response(tok, gen, obs))


def _raw(diag, spans):
    return json.dumps({"diag_type": diag, "spans": spans})


def test_parse_annotation_valid_quote_fallback_and_drops(tok):
    it = _item(tok, "<think>I need Sikur Foundry.</think>\n<answer>Besain Railand</answer>", True)
    text = it.response.text
    a = text.index("Besain Railand")
    ann = parse_annotation(_raw("final_answer", [{"kind": "key", "start": a, "end": a + 14, "quote": "Besain Railand"}]), it)
    assert ann.valid and ann.key == [(a, a + 14)] and ann.error == [] and ann.dropped == 0
    # wrong offsets: the quote's first exact occurrence is used
    ann = parse_annotation(_raw("key_step", [{"kind": "key", "start": 0, "end": 3, "quote": "Sikur Foundry"}]), it)
    assert ann.valid and ann.key == [(text.index("Sikur Foundry"), text.index("Sikur Foundry") + 13)]
    # dropped spans (the answer stays valid): out of range with an absent quote, wrong kind, empty quote,
    # quote only inside the observation, non-integer offsets with an absent quote
    o = text.index("facts")
    bad = [{"kind": "key", "start": 5, "end": 10_000, "quote": "nowhere"}, {"kind": "error", "start": a, "end": a + 6, "quote": "Besain"},
           {"kind": "key", "start": 0, "end": 1, "quote": ""}, {"kind": "key", "start": o, "end": o + 5, "quote": "facts"},
           {"kind": "key", "start": True, "end": 3, "quote": "zzz"}, "not a span"]
    ann = parse_annotation(_raw("final_answer", bad), it)
    assert ann.valid and ann.key == [] and ann.dropped == len(bad)


def test_parse_annotation_overlaps_caps_and_fences(tok):
    it = _item(tok, "<think>I need Sikur Foundry.</think>\n<answer>Besain Railand</answer>", True)
    text = it.response.text
    a = text.index("Besain Railand")
    spans = [{"kind": "key", "start": a, "end": a + 14, "quote": "Besain Railand"},
             {"kind": "key", "start": a + 7, "end": a + 14, "quote": "Railand"},  # overlaps the first
             {"kind": "key", "start": 0, "end": 7, "quote": "<think>"},
             {"kind": "key", "start": 7, "end": 13, "quote": "I need"}]
    ann = parse_annotation(_raw("final_answer", spans), it, max_spans=3)
    assert ann.valid and len(ann.key) == 3 and ann.dropped == 1  # the fourth exceeds max_spans
    toks = spans_to_tokens(it.response, ann.key)
    union = sorted(set(spans_to_tokens(it.response, [ann.key[0]])) | set(spans_to_tokens(it.response, ann.key[1:])))
    assert toks == union  # overlapping spans are a union, never double-counted
    fenced = "```json\n" + _raw("final_answer", spans[:1]) + "\n```"
    assert parse_annotation(fenced, it).key == [(a, a + 14)]


@pytest.mark.parametrize("raw", [
    "", "not json", '{"diag_type": "final_answer", "spans": [', "Sure! " + _raw("final_answer", []),
    json.dumps([{"kind": "key"}]), json.dumps({"diag_type": "final_answer"}),
    json.dumps({"diag_type": "final_answer", "spans": [], "extra": 1}),
    json.dumps({"diag_type": "wrong_final", "spans": []}),  # an error label for a success
    json.dumps({"diag_type": "final_answer", "spans": {"kind": "key"}}),
    "[" * 100_000,
])
def test_parse_annotation_invalid_output_means_no_spans(tok, raw):
    it = _item(tok, "<answer>Besain Railand</answer>", True)
    ann = parse_annotation(raw, it)
    assert not ann.valid and ann.key == [] and ann.error == []


def test_capped_tokens_respects_span_count_and_token_share(tok):
    it = _item(tok, "<think>I need Sikur Foundry and more words here to make it long.</think>\n<answer>Besain Railand</answer>", True)
    resp, text = it.response, it.response.text
    ans = (text.index("Besain"), text.index("Besain") + 14)
    think = (0, text.index("</think>"))
    n = resp.n_generated
    assert capped_tokens(resp, [ans], 3, 1.0) == spans_to_tokens(resp, [ans])
    assert capped_tokens(resp, [think, ans], 3, 0.2) == spans_to_tokens(resp, [ans])  # the long span is skipped
    assert len(spans_to_tokens(resp, [think])) > 0.2 * n
    assert capped_tokens(resp, [ans, think], 1, 1.0) == spans_to_tokens(resp, [ans])  # one span at most


# ---------------------------------------------------------------------------------------- rules
def _traj_item(tok, env, task, turns):
    t = replay_turns(tok, env, task, turns, "auto")
    return AnnotationItem(task, t.reward > 0, response_text(tok, t.token_ids, t.loss_mask, t.prompt_len)), t


def _texts(item, spans):
    return [item.response.text[a:b] for a, b in spans]


def test_multihop_rules(tok, small_env):
    annotate = ANNOTATORS.get("rule")(AnnotatorContext(small_env, None))
    task = next(t for t in small_env.tasks("train") if t.meta["hops"] == 2)
    chain = task.meta["chain"]
    ok, t = _traj_item(tok, small_env, task, small_env.oracle_turns(task, random.Random(0), {}))
    assert ok.success
    ann = annotate([ok])[0]
    assert ann.valid and ann.diag_type == "correct_retrieval" and ann.error == []
    assert _texts(ok, ann.key) == [task.answers[0], *chain]  # the answer first, then the chain's searches
    # a search off the gold chain is the error, even before a wrong answer
    turns = small_env.oracle_turns(task, random.Random(0), {})
    turns.insert(1, "<think>Let me check.</think>\n<search>Nobody Inc</search>")
    turns[-1] = "<think>Done.</think>\n<answer>Wrong Person</answer>"
    bad, _ = _traj_item(tok, small_env, task, turns)
    ann = annotate([bad])[0]
    assert not bad.success and ann.diag_type == "retrieval_miss" and _texts(bad, ann.error) == ["Nobody Inc"] and ann.key == []
    turns = small_env.oracle_turns(task, random.Random(0), {})
    turns[-1] = "<think>Done.</think>\n<answer> Wrong Person </answer>"
    wrong, _ = _traj_item(tok, small_env, task, turns)
    ann = annotate([wrong])[0]
    assert ann.diag_type == "wrong_final" and _texts(wrong, ann.error) == ["Wrong Person"]
    fmt, _ = _traj_item(tok, small_env, task, ["<think>hmm</think> no action", "still nothing"])
    ann = annotate([fmt])[0]
    assert ann.diag_type == "format_error" and ann.key == ann.error == []


def test_arith_rules(tok):
    env = make_env("arith", seed=0, train_size=50, validation_size=2, test_size=2, heldout_size=2)
    annotate = ANNOTATORS.get("rule")(AnnotatorContext(env, None))
    task = next(t for t in env.tasks("train") if t.meta["ops"] == 3)
    steps = task.meta["steps"]
    ok, _ = _traj_item(tok, env, task, env.oracle_turns(task, random.Random(0), {}))
    ann = annotate([ok])[0]
    last = steps[-1]
    sym = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
    assert ok.success and ann.diag_type == "final_answer"
    # the answer, the equation giving the gold result, the gold intermediate results (distinct from the answer)
    inter = [str(s[3]) for s in steps[:-1] if str(s[3]) != task.answers[0]]
    assert _texts(ok, ann.key) == [task.answers[0], f"{last[0]} {sym[last[1]]} {last[2]} = {last[3]}", *inter]
    slip, _ = _traj_item(tok, env, task, env.oracle_turns(task, random.Random(0), {"wrong_answer": 1.0}))
    ann = annotate([slip])[0]
    assert not slip.success and ann.diag_type == "arithmetic_error"
    assert _texts(slip, ann.error)[0].startswith(f"{last[0]} {sym[last[1]]} {last[2]} = ")
    wrong, _ = _traj_item(tok, env, task, ["<think>1 + 1 = 2.</think>\n<answer>999</answer>"])
    ann = annotate([wrong])[0]
    assert ann.diag_type == "wrong_final" and _texts(wrong, ann.error) == ["999"]
    none, _ = _traj_item(tok, env, task, ["<think>no idea</think>"])
    assert annotate([none])[0].diag_type == "format_error"


# ---------------------------------------------------------------------------------------- LLM annotator
class ScriptedPolicy:
    """A generation backend that answers with given texts in turn (the annotator's parsing and retry
    are what is tested; generation itself is tested with the real model below)."""

    def __init__(self, tok, answers, max_context=4096):
        self.tokenizer, self.answers, self.max_context, self.calls = tok, list(answers), max_context, []

    def generate(self, prompts, params, generator=None):
        self.calls.append((len(prompts), params.temperature))
        out = []
        for _ in prompts:
            from tracerl.backends.hf import Generation

            out.append(Generation(self.tokenizer.encode(self.answers.pop(0), add_special_tokens=False), [], "eos"))
        return out, None

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def test_llm_annotator_retries_once_then_counts_invalid(tok, small_env):
    good = _item(tok, "<answer>Besain Railand</answer>", True)
    a = good.response.text.index("Besain")
    valid = _raw("final_answer", [{"kind": "key", "start": a, "end": a + 14, "quote": "Besain Railand"}])
    pol = ScriptedPolicy(tok, ["garbage", "{bad json", valid, "still garbage"])
    ann = LLMAnnotator(AnnotatorContext(small_env, pol), pol)([good, good])
    assert pol.calls == [(2, 0.0), (2, 1.0)]  # greedy, then one sampled retry of both failures
    assert ann[0].valid and ann[0].key == [(a, a + 14)]
    assert not ann[1].valid and ann[1].key == []
    # a prompt that does not fit the annotator's context is invalid without generating
    pol = ScriptedPolicy(tok, [], max_context=10)
    assert not LLMAnnotator(AnnotatorContext(small_env, pol), pol)([good])[0].valid and pol.calls == []


def test_self_annotator_with_a_real_model_never_crashes(tiny_policy, small_env):
    tok = tiny_policy.tokenizer
    items = [_item(tok, "<answer>Besain Railand</answer>", True), _item(tok, "<answer>Nobody</answer>", False)]
    prompt = annotation_prompt(small_env, items[0], 3)
    assert items[0].response.text in prompt and "Besain Railand" in prompt
    ann = ANNOTATORS.get("self")(AnnotatorContext(small_env, tiny_policy, max_new_tokens=4))(items)
    assert len(ann) == 2 and all(isinstance(a, Annotation) for a in ann)
    assert all(not a.valid and not a.key and not a.error for a in ann)  # a random model writes no valid JSON


@pytest.mark.slow  # the first user of the SmolLM2 tokenizer converts the GGUF (~30 s)
def test_char_ranges_with_the_smollm2_tokenizer():
    """SmolLM2's byte-level BPE: emoji split over several tokens (converted once, cached, never skipped)."""
    from transformers import AutoTokenizer

    from tracerl.models import smollm2_path

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tok.encode(MULTIBYTE * 3, add_special_tokens=False)
    text, ranges = token_char_ranges(tok, ids)
    assert (text, ranges) == _brute_ranges(tok, ids)
    at = text.index("😀")
    assert len([r for r in ranges if r[0] <= at < r[1]]) >= 2
