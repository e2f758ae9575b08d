"""FlowTracer credit: attention maps from hooks equal eager attention, token regions, weight rules,
packed-tree coefficients and the trainer's use of the weights."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from tracerl.config import CreditConfig
from tracerl.credit import CREDIT, TokenCredit
from tracerl.credit.attention import UnsupportedModelError, attention_maps, check_supported, default_layers
from tracerl.credit.regions import answer_span, trajectory_regions
from tracerl.rollout import replay_turns

ARCHS = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _pair(arch: str, layers: int = 4):
    """The same random weights under SDPA and under eager attention."""
    cfg_cls, model_cls = ARCHS[arch]
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sdpa = model_cls(cfg_cls(**kw, attn_implementation="sdpa")).eval()
    eager = model_cls(cfg_cls(**kw, attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    return sdpa, eager


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hooked_maps_equal_eager_attention_of_the_same_layers(arch):
    sdpa, eager = _pair(arch)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    layers = [1, 2]
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True).attentions
    want = torch.stack([ref[i].float().mean(1) for i in layers]).mean(0)
    got = attention_maps(sdpa, ids, layers, chunk_rows=7)  # several chunks, the last one partial
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 45))


def test_sdpa_output_attentions_returns_no_maps():
    """Why hooks: under SDPA, transformers silently returns no attention probabilities."""
    sdpa, _ = _pair("qwen3")
    with torch.no_grad():
        out = sdpa(input_ids=torch.tensor([[1, 2, 3, 4]]), output_attentions=True)
    assert not out.attentions  # an empty tuple (or None), never maps


def test_right_padded_rows_get_their_own_maps_and_upper_layers_never_run():
    sdpa, _ = _pair("qwen3")
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 97, (30,), generator=gen), torch.randint(0, 97, (18,), generator=gen)
    batch = torch.full((2, 30), 0)
    batch[0], batch[1, :18] = a, b
    calls = []
    hook = sdpa.model.layers[3].register_forward_hook(lambda *_: calls.append(1))
    norm_hook = sdpa.model.norm.register_forward_hook(lambda *_: calls.append(2))
    try:
        both = attention_maps(sdpa, batch, [1, 2])
    finally:
        hook.remove()
        norm_hook.remove()
    assert calls == []  # the forward stopped after layer 2
    torch.testing.assert_close(both[1, :18, :18], attention_maps(sdpa, b[None], [1, 2])[0])
    torch.testing.assert_close(both[0], attention_maps(sdpa, a[None], [1, 2])[0])


def test_layer_choice_and_unsupported_models():
    assert default_layers(4) == [1, 2]
    assert default_layers(30) == [10, 12, 15, 18, 20]
    assert default_layers(2) == [0, 1]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supports model types llama, qwen2, qwen3; this model is 'gpt2'"):
        check_supported(gpt2)
    sdpa, _ = _pair("llama")
    with pytest.raises(UnsupportedModelError, match="layer 7 does not exist"):
        check_supported(sdpa, [1, 7])


# ------------------------------------------------------------------------------------ regions


def _replayed(env, tok, index: int, cut_answer: bool = False):
    rng = random.Random(index)
    task = env.tasks("train")[index]
    turns = env.oracle_turns(task, rng, {})
    if cut_answer:  # a last turn without an answer (as when generation hits the turn cap)
        turns = turns[:-1] + ["<think>I am not sure what"]
    return replay_turns(tok, env, task, turns)


def test_regions_find_question_and_answer_tokens(tiny_policy, small_env):
    tok = tiny_policy.tokenizer
    traj = _replayed(small_env, tok, 3)
    r = trajectory_regions(tok, traj.token_ids, traj.loss_mask, traj.prompt_len, traj.turns, traj.task.question,
                           eos_ids={tok.eos_token_id})
    ids = torch.tensor(traj.token_ids)
    assert tok.decode(ids[r.source].tolist()).strip() == traj.task.question
    assert r.source.nonzero().max() < traj.prompt_len and r.answer_found
    assert tok.decode(ids[r.sink].tolist()).strip() == traj.task.answers[0]
    assert bool(r.sink[r.sink].all()) and torch.all(torch.tensor(traj.loss_mask)[r.sink] == 1)
    assert torch.equal(r.no_inflow[: traj.prompt_len], torch.ones(traj.prompt_len, dtype=torch.bool))
    assert not r.no_inflow[traj.prompt_len:].any()
    # observations are neither trainable nor boundary nodes; source=prompt takes the whole prompt
    obs = (torch.tensor(traj.loss_mask) == 0) & (torch.arange(len(ids)) >= traj.prompt_len)
    assert obs.any() and not r.trainable[obs].any()
    whole = trajectory_regions(tok, traj.token_ids, traj.loss_mask, traj.prompt_len, traj.turns, traj.task.question,
                               source="prompt", obs_as_source=True)
    assert int(whole.source.sum()) == traj.prompt_len + int(obs.sum()) and whole.no_inflow[obs].all()


def test_regions_fall_back_to_the_last_sampled_tokens(tiny_policy, small_env):
    tok = tiny_policy.tokenizer
    traj = _replayed(small_env, tok, 5, cut_answer=True)
    r = trajectory_regions(tok, traj.token_ids, traj.loss_mask, traj.prompt_len, traj.turns, traj.task.question,
                           fallback_tokens=4)
    assert not r.answer_found
    sampled = [i for i, m in enumerate(traj.loss_mask) if m]
    assert r.sink.nonzero().flatten().tolist() == sampled[-4:]


def test_answer_span_in_text():
    text = "<think>x</think><answer>first</answer> then <answer>Paris</answer>"
    a, b = answer_span(text)
    assert text[a:b] == "Paris"
    a, b = answer_span("so \\boxed{\\frac{1}{2}} done")
    assert "so \\boxed{\\frac{1}{2}} done"[a:b] == "\\frac{1}{2}"
    a, b = answer_span("<answer></answer>")
    assert (a, b) == (0, len("<answer></answer>"))
    assert answer_span("<search>Paris</search>") is None


# ------------------------------------------------------------------------------------ weights


def test_top_fraction_selection_ties_and_masking():
    score = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.5, 0.0, 0.8, 0.3])
    eligible = torch.tensor([False, True, True, True, True, True, True, True])
    w = CREDIT.get("flowtracer")(score, eligible, fraction=0.4, boost=1.5)
    # 7 eligible -> ceil(2.8) = 3 boosted: 0.8, then the earliest two of the tied 0.5s; token 0 is not eligible
    assert w.tolist() == [1.0, 1.0, 1.5, 1.5, 1.0, 1.0, 1.5, 1.0]
    w = CREDIT.get("bottom")(score, eligible, fraction=0.4, boost=2.0)
    assert w.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0, 2.0]
    w1 = CREDIT.get("random")(score, eligible, fraction=0.4, boost=1.5, generator=torch.Generator().manual_seed(3))
    w2 = CREDIT.get("random")(score, eligible, fraction=0.4, boost=1.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w1, w2) and int((w1 == 1.5).sum()) == 3 and w1[0] == 1.0
    assert torch.all(CREDIT.get("none")(score, eligible) == 1)
    with pytest.raises(ValueError, match="unknown token credit rule 'flow'; valid: bottom, flowtracer, none, random"):
        CREDIT.get("flow")


def test_token_credit_weights_only_sampled_tokens_of_nonzero_advantages(tiny_policy, small_env):
    tok, model = tiny_policy.tokenizer, tiny_policy.model
    trajs = [_replayed(small_env, tok, i) for i in range(4)]
    adv = torch.tensor([0.8, -0.5, 0.0, 1.2])
    credit = TokenCredit(CreditConfig(name="flowtracer", batch_size=3), model, tok)
    assert credit.layers == [0, 1]  # 2-layer policy: [L/3, 2L/3] = [0, 1]
    res = credit(trajs, adv, step=0, want_samples=True)
    for t, w, a in zip(trajs, res.weights, adv.tolist()):
        mask = torch.tensor(t.loss_mask, dtype=torch.bool)
        assert torch.all(w[~mask] == 1)  # prompt and observations are never weighted
        if a == 0:
            assert torch.all(w == 1)
        else:
            assert int((w == 1.5).sum()) == math.ceil(0.4 * int(mask.sum()))
    total = sum(sum(t.loss_mask) for t in trajs)
    boosted = sum(math.ceil(0.4 * sum(t.loss_mask)) for t, a in zip(trajs, adv.tolist()) if a != 0)
    assert res.metrics["credit_hub_frac"] == pytest.approx(boosted / total)
    assert res.metrics["credit_weight_mean"] == pytest.approx(1 + 0.5 * boosted / total)
    assert res.metrics["credit_rows"] == 3 and res.metrics["credit_answer_found"] == 1.0
    # the boosted tokens are those with the highest throughput of the row
    s = res.samples[0]
    assert len(s["tokens"]) == len(s["weight"]) == len(s["score"]) == len(s["kind"])
    hub = [x for x, w in zip(s["score"], s["weight"]) if w > 1]
    rest = [x for x, w, k in zip(s["score"], s["weight"], s["kind"]) if w == 1 and k != "o"]
    assert min(hub) >= max(rest) and max(hub) > 0 and len(set(s["score"])) > 3
    assert {"g", "o", "a"} <= set(s["kind"])

    nonneg = TokenCredit(CreditConfig(name="flowtracer", nonneg_only=True), model, tok)(trajs, adv, step=0)
    assert torch.all(nonneg.weights[1] == 1) and torch.equal(nonneg.weights[0], res.weights[0])
    assert TokenCredit(CreditConfig(), model, tok)(trajs, adv, step=0) is None  # credit.name = none
    too_long = TokenCredit(CreditConfig(name="flowtracer", max_len=50), model, tok)(trajs, adv, step=0)
    assert all(torch.all(w == 1) for w in too_long.weights) and too_long.metrics["credit_rows"] == 0
    rnd = TokenCredit(CreditConfig(name="random"), model, tok)
    assert rnd.layers == [] and rnd.start(trajs, adv, step=0).pending == set()  # no attention needed
    for t, w, a in zip(trajs, rnd(trajs, adv, step=0).weights, adv.tolist()):
        assert int((w == 1.5).sum()) == (math.ceil(0.4 * sum(t.loss_mask)) if a else 0)
