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
