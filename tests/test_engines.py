"""The generation interface in the main environment (no vLLM here): the HF backend implements it and
stamps the policy version; choosing an engine that cannot run gives one line. The vLLM backend's own
tests run in .venv-vllm (tests_vllm/)."""

from __future__ import annotations

import importlib.util
import socket

import pytest
import torch

from tracerl.backends.base import GenerationBackend, SamplingParams, shared_free_state
from tracerl.config import EngineConfig


def test_hf_backend_implements_the_interface_and_stamps_versions(tiny_policy, small_env):
    from tracerl.rollout import encode_prompt

    assert isinstance(tiny_policy, GenerationBackend) and tiny_policy.returns_hidden
    prompts = [encode_prompt(tiny_policy.tokenizer, small_env, t, "none") for t in small_env.tasks("train")[:2]]
    try:
        tiny_policy.load_weights(None, 7)  # shares the trainer's module: only the version moves
        gens, _ = tiny_policy.generate(prompts, SamplingParams(4, 0.0))
        assert {g.version for g in gens} == {7}
        state = {k: v.clone() for k, v in tiny_policy.model.state_dict().items()}
        tiny_policy.load_weights(state, 8)
        assert tiny_policy.version == 8
    finally:
        tiny_policy.load_weights(None, 0)


def test_shared_free_state_drops_the_tied_head(tiny_policy):
    state = tiny_policy.model.state_dict()
    free = shared_free_state(state)
    assert "lm_head.weight" in state and "lm_head.weight" not in free  # tied to the embedding
    assert set(free) == set(state) - {"lm_head.weight"}
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in free.values())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the message without vLLM installed")
def test_vllm_engine_without_vllm_is_one_line(tmp_path):
    from tracerl.backends.vllm_engine import EngineError, import_vllm

    with pytest.raises(EngineError, match=r"engine.name=vllm needs vLLM \(0.32.0\): pip install 'tracerl\[vllm\]'"):
        import_vllm()


def test_head_size_vllm_cpu_lacks_is_one_line():
    from transformers import Qwen3Config

    from tracerl.backends.vllm_engine import EngineError, check_vllm_model

    with pytest.raises(EngineError, match="this model's is 16 .*model.hidden_size / model.num_heads"):
        check_vllm_model(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16), "cpu")
    check_vllm_model(Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16), "cuda")  # GPU kernels differ


def test_server_that_is_down_is_one_line_after_bounded_retries(tiny_policy):
    from tracerl.backends.server import ServerError, ServerPolicy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServerError, match=rf"completion server http://127.0.0.1:{port} is not reachable \(/v1/models, 2 attempts"):
        ServerPolicy(f"http://127.0.0.1:{port}", tiny_policy.tokenizer, 512, EngineConfig(name="server", timeout_s=2, retries=1))


def test_engine_config_is_typed():
    from tracerl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="engine.name"):
        load_config(None, ["engine.name=sglang"])
    with pytest.raises(ConfigError, match="algo.sampler_correction"):
        from tracerl.methods import check_methods

        check_methods(load_config(None, ["algo.sampler_correction=mis"]))
    assert torch.is_tensor(torch.zeros(1))


@pytest.mark.parametrize("overrides,cuda,error", [
    ([], 0, None),
    (["run.device=cuda:0", "engine.name=vllm", "engine.weight_sync=ipc"], 1, None),
    (["run.device=cuda:0", "engine.name=vllm", "engine.weight_sync=nccl", "engine.device=cuda:1"], 2, None),
    (["run.device=cuda:1", "engine.name=vllm", "engine.weight_sync=ipc", "engine.device=cuda:1"], 2, None),
    (["engine.weight_sync=nccl"], 2, "'engine.weight_sync': engine.weight_sync=nccl .* engine.name=hf has none"),
    (["engine.name=server", "engine.weight_sync=ipc"], 1, "engine.name=server has none"),
    (["engine.name=vllm", "engine.weight_sync=ipc"], 1, "is GPU-only .* run.device=cpu;"),
    (["run.device=cuda", "engine.name=vllm", "engine.weight_sync=nccl"], 0, "torch sees no CUDA device"),
    (["run.device=cuda", "engine.name=vllm", "engine.weight_sync=ipc", "engine.in_process=true"], 1,
     "needs the engine in its own process"),
    (["run.device=cuda:0", "engine.name=vllm", "engine.weight_sync=nccl"], 2, "needs the engine on another GPU"),
    (["run.device=cuda:1", "engine.name=vllm", "engine.weight_sync=nccl", "engine.device=cuda:1"], 2,
     "needs the engine on another GPU"),
    (["run.device=cuda:0", "engine.name=vllm", "engine.weight_sync=ipc", "engine.device=cuda:1"], 2,
     "needs the engine on the trainer's GPU"),
    (["run.device=cuda:0", "engine.name=vllm", "engine.device=cuda:2"], 2, "'engine.device': cuda:2 does not exist"),
    (["run.device=cuda", "engine.device=cuda:1"], 2, "engine.name=hf has none"),
    (["run.device=cuda", "engine.name=vllm", "engine.device=cuda:1", "engine.in_process=true"], 2,
     "engine.in_process=true runs it in this one"),
])
def test_weight_sync_rules(overrides, cuda, error):
    """engine.weight_sync / engine.device against the machine (preflight; the rows without CUDA are also in
    docs/bad_input.md): nccl to another GPU, ipc on the trainer's, both GPU-only and out of process."""
    from tracerl.config import ConfigError, check_weight_sync, load_config

    cfg = load_config(None, overrides)
    if error is None:
        check_weight_sync(cfg, cuda_count=cuda)
    else:
        with pytest.raises(ConfigError, match=error):
            check_weight_sync(cfg, cuda_count=cuda)


def test_engine_arguments_select_the_weight_transfer(tmp_path):
    """engine.weight_sync picks what the engine is started with (file: no transfer engine, the worker
    extension's reload) and which side sends; engine.device maps onto the engine process's CUDA_VISIBLE_DEVICES."""
    from tracerl.backends.vllm_engine import EngineError, engine_kwargs, visible_devices

    def kwargs(sync, device="cuda:0"):
        return engine_kwargs(tmp_path, 512, EngineConfig(name="vllm", weight_sync=sync), device, 0, "bfloat16", 8)

    assert "weight_transfer_config" not in kwargs("file") and "weight_transfer_config" not in kwargs("file", "cpu")
    assert kwargs("nccl")["weight_transfer_config"] == {"backend": "nccl"}
    assert kwargs("ipc")["weight_transfer_config"] == {"backend": "ipc"}
    assert {k: v for k, v in kwargs("ipc").items() if k != "weight_transfer_config"} == kwargs("file")
    assert kwargs("file")["worker_extension_cls"] == "tracerl.backends.vllm_worker.TracerlWeightSync"
    assert visible_devices("cuda:1", None) == "1" and visible_devices("cuda", "") == "0"
    assert visible_devices("cuda:1", "4,6,7") == "6" and visible_devices("cuda", "GPU-ab12, GPU-cd34") == "GPU-ab12"
    with pytest.raises(EngineError, match="cuda:3 is not among this process's CUDA_VISIBLE_DEVICES=4,6"):
        visible_devices("cuda:3", "4,6")


def test_features_pass_is_timed(tiny_policy, small_env):
    """features_s (metrics.jsonl): seconds of prefill-only passes since the last step_metrics; absent
    until the first pass, 0 for a step without one."""
    from tracerl.rollout import encode_prompt

    fresh = type(tiny_policy)(tiny_policy.model, tiny_policy.tokenizer, "cpu", tiny_policy.max_context)
    assert fresh.step_metrics() == {}
    prompts = [encode_prompt(fresh.tokenizer, small_env, t, "none") for t in small_env.tasks("train")[:3]]
    fresh.prefix_hidden(prompts)
    first = fresh.step_metrics()["features_s"]
    assert first > 0
    assert fresh.step_metrics() == {"features_s": 0.0}
