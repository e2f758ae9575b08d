"""The HF backend samples exactly what it reports: ids, log-probs and stops."""

import torch

from tracerl.algos.losses import token_logprobs
from tracerl.backends.hf import SamplingParams
from tracerl.rollout import encode_prompt


def _prompts(policy, env, n):
    return [encode_prompt(policy.tokenizer, env, t) for t in env.tasks("validation")[:n]]


def _full_logprobs(model, prompt, gen):
    ids = torch.tensor([prompt + gen])
    logits = model(input_ids=ids).logits[:, :-1].float()
    return token_logprobs(logits, ids[:, 1:])[0, len(prompt) - 1:]


def test_reported_logprobs_equal_a_fresh_forward(tiny_policy, small_env):
    prompts = _prompts(tiny_policy, small_env, 5)  # different lengths: exercises left padding
    assert len({len(p) for p in prompts}) > 1
    g = torch.Generator().manual_seed(0)
    gens, prefill = tiny_policy.generate(prompts, SamplingParams(max_new_tokens=12), g)
    assert prefill.computed == sum(len(p) for p in prompts) and prefill.saved == 0
    with torch.no_grad():
        for p, gen in zip(prompts, gens):
            assert 1 <= len(gen.token_ids) <= 12 and len(gen.logprobs) == len(gen.token_ids)
            ref = _full_logprobs(tiny_policy.model, p, gen.token_ids)
            torch.testing.assert_close(torch.tensor(gen.logprobs), ref, atol=2e-4, rtol=0)


def test_greedy_batched_equals_one_by_one(tiny_policy, small_env):
    prompts = _prompts(tiny_policy, small_env, 4)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched, _ = tiny_policy.generate(prompts, params)
    for p, b in zip(prompts, batched):
        single, _ = tiny_policy.generate([p], params)
        assert single[0].token_ids == b.token_ids


def test_seeded_sampling_replays_and_top_p_narrows(tiny_policy, small_env):
    prompts = _prompts(tiny_policy, small_env, 3)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a, _ = tiny_policy.generate(prompts, params, torch.Generator().manual_seed(7))
    b, _ = tiny_policy.generate(prompts, params, torch.Generator().manual_seed(7))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    # top_p -> 0 keeps only the most likely token: identical to greedy
    nucleus, _ = tiny_policy.generate(prompts, SamplingParams(8, 1.0, 1e-6), torch.Generator().manual_seed(1))
    greedy, _ = tiny_policy.generate(prompts, SamplingParams(8, 0.0))
    assert [x.token_ids for x in nucleus] == [x.token_ids for x in greedy]


def test_stop_strings_end_a_turn(tiny_policy, small_env):
    # Teach nothing: force the stop by making the stop string a substring of any decoded text.
    prompts = _prompts(tiny_policy, small_env, 2)
    gens, _ = tiny_policy.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0, stop_strings=("",)))
    assert all(g.stopped == "stop" and len(g.token_ids) == 1 for g in gens)
    gens, _ = tiny_policy.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert all(g.stopped in ("length", "eos") for g in gens)
    assert all(len(g.token_ids) == 5 for g in gens if g.stopped == "length")


def test_context_cap_is_respected(tiny_policy, small_env):
    p = _prompts(tiny_policy, small_env, 1)[0]
    cap = tiny_policy.max_context
    try:
        tiny_policy.max_context = len(p) + 3
        gens, _ = tiny_policy.generate([p], SamplingParams(max_new_tokens=50, temperature=0.0))
        assert len(gens[0].token_ids) <= 3
    finally:
        tiny_policy.max_context = cap


def test_sampler_draws_the_tempered_nucleus_law():
    from tracerl.backends.hf import _sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).repeat(40_000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(_sample(logits, SamplingParams(temperature=1.0), g), minlength=5) / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01, rtol=0)
    # T = 0.5 squares and renormalises the probabilities
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]) ** 2
    freq = torch.bincount(_sample(logits, SamplingParams(temperature=0.5), g), minlength=5) / 40_000
    torch.testing.assert_close(freq, p2 / p2.sum(), atol=0.01, rtol=0)
    # top_p = 0.7 keeps {0.5, 0.3}: renormalised to 0.625 / 0.375, the tail is never drawn
    freq = torch.bincount(_sample(logits, SamplingParams(temperature=1.0, top_p=0.7), g), minlength=5) / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0, 0.0, 0.0]), atol=0.01, rtol=0)
