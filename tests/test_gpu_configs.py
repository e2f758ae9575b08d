"""The GPU recipe's files, checked on CPU: configs/gpu/*.yaml load, bench/gpu_smoke.sh parses, and its
smoke model has the size docs/gpu_recipe.md states (~100M parameters). Nothing here needs a GPU."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_CONFIGS = sorted((REPO / "configs" / "gpu").glob("*.yaml"))
SMOKE_SCRIPT = REPO / "bench" / "gpu_smoke.sh"
SMOKE_ENV = REPO / "bench" / "gpu_smoke.env"
MODEL_KEYS = ("HIDDEN_SIZE", "NUM_LAYERS", "NUM_HEADS", "NUM_KV_HEADS", "VOCAB_SIZE")


def smoke_settings() -> dict[str, int]:
    """The KEY=VALUE lines of bench/gpu_smoke.env (the script sources the same file)."""
    pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(\d+)\s*$", SMOKE_ENV.read_text(), flags=re.MULTILINE)
    return {k: int(v) for k, v in pairs}


def tiny_parameters(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> int:
    """Parameters of the tiny preset (`tracerl.models.tiny.build_tiny_model`: a Qwen3 with MLP width
    3·hidden, head_dim hidden/heads, no biases, RMSNorm on q and k, embeddings tied to the LM head).
    Counted by formula: building it, even on the meta device, costs a ~4 s transformers import; the two
    agreed when this was written (102,778,880 and 656,128)."""
    head_dim, mlp = hidden // heads, 3 * hidden
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    layer = attention + 3 * hidden * mlp + 2 * hidden + 2 * head_dim  # + MLP, two norms, q/k norms
    return vocab * hidden + layers * layer + hidden  # + tied embeddings, final norm


def smoke_parameters(prefix: str) -> int:
    s = smoke_settings()
    return tiny_parameters(*(s[f"{prefix}_{k}"] for k in ("VOCAB_SIZE", "HIDDEN_SIZE", "NUM_LAYERS", "NUM_HEADS",
                                                           "NUM_KV_HEADS")))


def test_there_are_gpu_configs():
    names = {p.name for p in GPU_CONFIGS}
    assert {"tree_grpo_qwen2.5_3b.yaml", "trace_qwen3_8b.yaml"} <= names


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_config_loads_on_cuda(path):
    from tracerl.config import load_config
    from tracerl.methods import check_methods

    cfg = load_config(path, [])
    assert cfg.run.device.startswith("cuda")
    assert cfg.model.preset == "path" and cfg.model.path
    # fp32 master weights: with model.dtype=bfloat16 the trainer keeps weights and AdamW states in bf16
    assert cfg.model.dtype == "float32" and cfg.trainer.bf16
    check_methods(cfg)  # method names and combinations, as `tracerl train` checks them before building anything


def test_gpu_configs_give_their_launch_commands():
    """Every GPU preset's header says how to launch it on one 8-GPU node and on two nodes."""
    for path in GPU_CONFIGS:
        text = path.read_text()
        assert "--nproc-per-node 8" in text and "--nnodes 2" in text and "--auto-resume" in text, path.name


def test_smoke_script_parses():
    bash = shutil.which("bash")
    assert bash is not None
    res = subprocess.run([bash, "-n", str(SMOKE_SCRIPT)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_smoke_script_uses_every_model_setting():
    script = SMOKE_SCRIPT.read_text()
    assert "source bench/gpu_smoke.env" in script
    settings = smoke_settings()
    for prefix in ("GPU", "CPU"):
        for key in MODEL_KEYS:
            assert f"{prefix}_{key}" in settings
            assert f'model.{key.lower()}="${prefix}_{key}"' in script


def test_smoke_model_is_about_100m_parameters():
    n = smoke_parameters("GPU")
    assert 80e6 <= n <= 130e6, n
    assert n == 102_778_880  # the count written in bench/gpu_smoke.env and docs/gpu_recipe.md


@pytest.mark.parametrize("prefix", ["GPU", "CPU"])
def test_smoke_model_shapes(prefix):
    s = smoke_settings()
    hidden, heads, kv = s[f"{prefix}_HIDDEN_SIZE"], s[f"{prefix}_NUM_HEADS"], s[f"{prefix}_NUM_KV_HEADS"]
    assert hidden % heads == 0 and heads % kv == 0
    assert hidden // heads >= 32  # attention kernels (and vLLM's CPU backend) want head_dim >= 32


def test_cpu_smoke_model_is_small():
    s = smoke_settings()
    assert (s["CPU_HIDDEN_SIZE"], s["CPU_NUM_LAYERS"], s["CPU_RANKS"]) == (128, 2, 2)
    assert smoke_parameters("CPU") == 656_128


@pytest.mark.slow
def test_the_smoke_script_runs_on_cpu_with_two_gloo_ranks():
    """`bench/gpu_smoke.sh --cpu`: the script's own flow (launch, checks, summary) with 2 gloo ranks."""
    out = subprocess.run(["bash", str(SMOKE_SCRIPT), "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gpu_smoke: passed" in out.stdout
    assert f"model: {smoke_parameters('CPU'):,} parameters" in out.stdout
    assert "steps/s:" in out.stdout and "last step: loss" in out.stdout
