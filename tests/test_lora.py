"""LoRA through peft (issue 20 item 5): only the adapters learn, a LoRA run resumes exactly from its adapter
checkpoints, `tracerl export` merges the adapter into a plain Hugging Face model with the adapted model's
logits, and bad LoRA settings stop with one line before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_LEARNING
from tracerl.cli import main
from tracerl.config import load_config
from tracerl.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_adapters, adapted_model, trainable_parameters
from tracerl.runlog import read_jsonl
from tracerl.train import train

LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]
# a LoRA run with a KL term (its reference: the base, adapters off) and a final evaluation only
RUN = [*TINY_LEARNING, *LORA, "algo.kl_coef=0.05", "trainer.eval_every=0", "trainer.eval_at_start=false",
       "trainer.tensorboard=false", "trainer.keep_checkpoints=2"]
TIMING = {"rollout_s", "update_s"}


def _tiny(tiny_policy):
    """A fresh copy of the session's tiny random Qwen3 (2 layers, hidden 64)."""
    from tracerl.models.tiny import build_tiny_model

    return build_tiny_model(tiny_policy.tokenizer, hidden_size=64, num_layers=2, seed=0)


def test_only_the_adapters_get_gradients_and_move(tiny_policy):
    cfg = load_config(None, LORA)
    model = _tiny(tiny_policy)
    wrapper = add_adapters(model, cfg.lora, "unused-base-dir", seed=0)
    assert adapted_model(wrapper) is model  # adapters injected in place: the trainer keeps its model object
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r · (in + out) per adapted projection: q (64→64), k (64→32), v (64→32), o (64→64), 2 layers
    n, total = trainable_parameters(model)
    assert n == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64)) and total > 30 * n

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == trainable
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
        opt.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert all(after[n].abs().sum() > 0 for n in trainable if "lora_B" in n)  # B starts at 0 and moved


def test_the_adapters_init_is_seeded_and_leaves_the_global_rng(tiny_policy):
    cfg = load_config(None, LORA)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = dict(adapted_model(add_adapters(_tiny(tiny_policy), cfg.lora, "b", seed=5)).named_parameters())
    assert torch.equal(torch.rand(3), expected)
    b = dict(adapted_model(add_adapters(_tiny(tiny_policy), cfg.lora, "b", seed=5)).named_parameters())
    c = dict(adapted_model(add_adapters(_tiny(tiny_policy), cfg.lora, "b", seed=6)).named_parameters())
    key = next(n for n in a if "lora_A" in n)
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model" / ADAPTER_WEIGHTS))


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_exports_a_merged_model(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tracerl.models.io import load_policy

    full, _ = train(None, [*RUN, f"run.dir={tmp_path / 'full'}"], log=lambda *_: None)
    ckpts = full / "checkpoints"
    final = ckpts / "step_000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004"]
    assert not (final / "model" / "model.safetensors").exists()  # the adapter only: the base is never copied
    rows = read_jsonl(full / "metrics.jsonl")
    assert all(r["grad_norm"] > 0 for r in rows)
    assert rows[0]["kl"] == 0.0 and any(r["kl"] > 0 for r in rows[1:])  # the reference is the base: B = 0 at step 1
    state = json.loads((final / "trainer_state.json").read_text())
    base_dir = Path(state["model_path"])
    assert json.loads((final / "model" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(base_dir)
    start, end = _adapter(ckpts / "step_000002"), _adapter(final)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # the adapters kept learning
    assert all(v.abs().sum() > 0 for k, v in end.items() if "lora_B" in k)

    # resume from step 2 of a copy: the same adapters, optimizer moments and rows as the uninterrupted run
    half = tmp_path / "half"
    shutil.copytree(full, half)
    shutil.rmtree(half / "checkpoints" / "step_000004")
    resumed, _ = train(None, [], resume=str(half), log=lambda *_: None)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(read_jsonl(resumed / "metrics.jsonl")) == strip(rows)
    again = _adapter(resumed / "checkpoints" / "step_000004")
    assert again.keys() == end.keys() and all(torch.equal(again[k], end[k]) for k in end)
    opt_a, opt_b = (load_file(str(d / "optimizer.safetensors")) for d in (final, resumed / "checkpoints" / "step_000004"))
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)

    # export: base + adapter merged; plain transformers loads it and gives the adapted model's logits
    assert main(["export", str(full)]) == 0
    out = full / "export"
    assert (out / "model.safetensors").is_file() and not (out / ADAPTER_CONFIG).exists()
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    base, tok = load_policy(base_dir)
    adapted = PeftModel.from_pretrained(base, str(final / "model")).eval()
    ids = tok("<search> capital of </search> answer", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(plain, want, atol=1e-4, rtol=0)  # the adapter does change the model
    assert json.loads((out / "tracerl_export.json").read_text())["kind"] == "lora-merged"
    # `tracerl eval` of a LoRA run reads the adapter on its base
    assert main(["eval", str(full), "--n", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


def test_export_of_a_full_model_copies_it(tmp_path, tiny_policy, capsys):
    from tracerl.models.io import atomic_save_pretrained

    src = atomic_save_pretrained(_tiny(tiny_policy), tiny_policy.tokenizer, tmp_path / "model")
    assert main(["export", str(src)]) == 2
    assert "pass --out DIR" in capsys.readouterr().err
    assert main(["export", str(src), "--out", str(tmp_path / "out")]) == 0
    for f in src.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes()
    assert json.loads((tmp_path / "out" / "tracerl_export.json").read_text())["kind"] == "full"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(src), "--out", str(tmp_path / "busy")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a tracerl export" in err and len(err.splitlines()) == 1
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["lora.rank=0"], "config key 'lora.rank': must be >= 1"),
    (["lora.dropout=1"], "config key 'lora.dropout': must be < 1"),
    (["lora.alpha=0"], "config key 'lora.alpha': must be > 0"),
    (["lora.target_modules=[]"], "must name at least one module"),
    (["lora.target_modules=qv"], "must be a list of module names or all-linear, got 'qv'"),
    (["engine.name=server", "engine.url=http://127.0.0.1:9"], "lora.enabled=true samples with engine.name=hf only"),
])
def test_bad_lora_values_are_one_line(tmp_path, capsys, args, message):
    assert main(["train", *LORA, *args, f"run.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_unknown_target_module_stops_before_the_run_directory(tmp_path, capsys):
    # the tiny preset's cached warm start (TINY_LEARNING's SFT keys) is the base; its modules are checked
    # on an empty copy before anything is written
    assert main(["train", *TINY_LEARNING, *LORA, "lora.target_modules=[q_proj, qkv_proj]", f"run.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'qkv_proj' names no module of Qwen3ForCausalLM" in err and "q_proj" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_lora_under_torchrun_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    # what torchrun sets for a worker; the refusal comes before any process group or model exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", *LORA, f"run.dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error (rank 0): lora.enabled=true is not supported under torchrun") and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
