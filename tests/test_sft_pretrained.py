"""SFT warm start of a pretrained policy (preset=path with sft.pretrained): keeps the base tokenizer,
lowers the demonstrations' loss, is cached by the base model, and is what training starts from."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN

from tracerl.config import load_config
from tracerl.config import ConfigError
from tracerl.models.io import atomic_save_pretrained, load_policy
from tracerl.rollout import replay_turns
from tracerl.setup import build_env, resolve_model_path, uses_sft, warm_start
from tracerl.sft import _demos, sft_dir, sft_key


def _demo_nll(model, tok, env, demos) -> float:
    total = count = 0.0
    with torch.no_grad():
        for task, turns, _ in demos:
            traj = replay_turns(tok, env, task, turns, "auto")
            ids = torch.tensor([traj.token_ids])
            mask = torch.tensor(traj.loss_mask[1:], dtype=torch.float32)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
            total, count = total + float((nll * mask).sum()), count + float(mask.sum())
    return total / count


@pytest.fixture()
def base_dir(tmp_path, tiny_policy):
    """The session's random tiny policy saved as a plain Hugging Face model directory (a 'pretrained' base)."""
    out = tmp_path / "base"
    atomic_save_pretrained(tiny_policy.model, tiny_policy.tokenizer, out)
    return out


def test_sft_of_a_pretrained_path_keeps_its_tokenizer_and_lowers_the_demo_loss(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACERL_CACHE", str(tmp_path / "cache"))
    over = [*TINY_RUN, "model.preset=path", f"model.path={base_dir}", "sft.pretrained=true", "sft.steps=20",
            "sft.lr=3e-3", "sft.demos=60"]
    cfg = load_config(None, over)
    assert uses_sft(cfg) and not uses_sft(load_config(None, over[:-3] + ["sft.pretrained=false"]))
    out = warm_start(cfg, log=lambda *a: None)
    assert out == sft_dir(cfg) and out.name.startswith("path-") and (out / "model.safetensors").is_file()
    meta = json.loads((out / "sft_meta.json").read_text())
    assert meta["steps"] == 20 and meta["key"] == sft_key(cfg)

    base_model, base_tok = load_policy(base_dir)
    model, tok = load_policy(out)
    assert tok.get_vocab() == base_tok.get_vocab()  # the base tokenizer, not a newly trained one
    env = build_env(cfg)
    held = _demos(env, load_config(None, over[:-1] + ["sft.demos=8", "sft.seed=5"]))
    before, after = _demo_nll(base_model, base_tok, env, held), _demo_nll(model, tok, env, held)
    assert after < 0.85 * before, (before, after)  # measured: 6.41 -> 4.87 nats per demo token (20 steps)

    # training starts from the SFT model, and a second call reuses the cache
    assert resolve_model_path(cfg, log=lambda *a: None) == out
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert warm_start(cfg, log=lambda *a: None) == out and (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_sft_cache_key_tracks_the_base_model_and_leaves_tiny_keys_alone(base_dir, tmp_path, tiny_policy):
    def key(path) -> str:
        return sft_key(load_config(None, [*TINY_RUN, "model.preset=path", f"model.path={path}", "sft.pretrained=true"]))

    link = tmp_path / "link"
    link.symlink_to(base_dir, target_is_directory=True)
    assert key(link) == key(base_dir)  # the same model under another name
    copy = tmp_path / "copy"
    atomic_save_pretrained(tiny_policy.model, tiny_policy.tokenizer, copy)
    assert key(copy) != key(base_dir)  # another directory
    before = key(copy)
    atomic_save_pretrained(tiny_policy.model, tiny_policy.tokenizer, copy)  # weights rewritten in place
    assert key(copy) != before
    tiny = load_config(None, TINY_RUN)
    assert sft_key(tiny) == sft_key(load_config(None, [*TINY_RUN, "sft.pretrained=false"]))
    assert sft_dir(tiny).name.startswith("tiny-")


def test_sft_of_a_pretrained_policy_needs_the_switch(base_dir):
    cfg = load_config(None, [*TINY_RUN, "model.preset=path", f"model.path={base_dir}"])
    with pytest.raises(ConfigError, match="sft.pretrained"):
        warm_start(cfg, log=lambda *a: None)
