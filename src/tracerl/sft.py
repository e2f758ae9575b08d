"""Warm starts by supervised fine-tuning on noisy oracle demonstrations, cached by a hash of everything
that shapes the result.

The tiny preset gets a BPE tokenizer trained on the world's text and a model built from its config.
A pretrained policy (`smollm2-135m` or a model path) keeps its tokenizer and weights and is fine-tuned
on the environment's demonstrations when `sft.pretrained` is on (off by default: pretrained policies
start RL as shipped). Either way the demonstrations are tokenized by the rollout engine's own path
(`replay_turns`), so the SFT model sees exactly the token layout it will later sample in.

The recipe gets what it is made from as `SFTInputs` (the environment, the pretrained base, the note
demos of sft.teacher_share), built only on a cache miss; `tracerl.setup.warm_start` supplies them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from tracerl.config import Config, ConfigError
from tracerl.envs.base import Environment, Task
from tracerl.errors import DataError
from tracerl.models.io import atomic_save_pretrained, cache_dir, file_lock, load_policy
from tracerl.models.tiny import build_tiny_model, train_tokenizer
from tracerl.padding import right_pad
from tracerl.rollout import replay_turns

SFT_VERSION = 1  # bump when the recipe changes so old caches are not reused


class NoteDemos(Protocol):
    """The private notes of the sft.teacher_share demos (`tracerl.distill.teacher.TeacherNoteDemos`)."""

    def draw(self, env: Environment, task: Task, rng: random.Random) -> str:
        """A note for one demo of `task`, drawn with the demos' `rng`."""

    def show(self, env: Environment, note: str) -> Environment:
        """`env` with `note` placed ahead of its user message."""


@dataclass(frozen=True)
class SFTInputs:
    """What a warm start is made from; each is built only when the cache misses."""

    env: Callable[[], Environment]  # the config's environment
    base: Callable[[], Path]  # the pretrained policy (non-tiny presets)
    notes: NoteDemos | None = None  # needed when sft.teacher_share > 0


def sft_key(cfg: Config) -> str:
    m = cfg.model
    sft = cfg.sft.model_dump(mode="json")
    for key, neutral in (("rl_share", 0.0), ("pretrained", False), ("teacher_share", 0.0)):  # added later: at their neutral values
        if sft[key] == neutral:  # they stay out, so older caches stay valid
            del sft[key]
    if m.preset == "tiny":
        model = {k: getattr(m, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")}
    else:  # a pretrained base: which one, and how its demos are cut
        base = Path(m.path).resolve() if m.preset == "path" else None
        model = {"preset": m.preset, "path": str(base) if base else None, "max_context": m.max_context,
                 "weights_mtime": max((f.stat().st_mtime_ns for f in base.glob("*.safetensors")), default=0) if base else 0}
    env = cfg.env.model_dump(mode="json")
    del env["reward"]  # the demos' text does not depend on the reward function
    if not env["tools"]:  # added later: without tools (and data) the key stays what it was
        del env["tools"]
    payload = {"v": SFT_VERSION, "env": env, "sft": sft, "model": model, "chat_template": m.chat_template}
    if cfg.data.given():  # the dataset's tasks are the demos' questions
        payload["data"] = cfg.data.model_dump(mode="json")
    contents = named_contents(cfg)
    if contents:  # added later: built-in environments without a dataset keep their keys
        payload["contents"] = contents
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


HASHED_BYTES = 256 << 20  # larger files are known by size and modification time (hashing GBs on every start)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        st = f.stat()
        if st.st_size > HASHED_BYTES:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            continue
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def named_contents(cfg: Config) -> dict[str, str]:
    """Digests of what the demos are made from but the config names only by path: the train dataset's
    files (data.train_files; a directory: every file under it; files over HASHED_BYTES by size and
    mtime) and user code named by reference (env.name, env.tools; the file itself, not what it imports).
    Without them a regenerated dataset or an edited environment would reuse a stale warm start
    (`tracerl sft --force` rebuilds by hand)."""
    from tracerl.registry import is_reference, reference_source

    out: dict[str, str] = {}
    files = cfg.data.train_files
    for f in [files] if isinstance(files, str) else files or []:
        path = Path(f).expanduser()
        out[f"data:{f}"] = _file_digest(path) if path.exists() else "missing"
    for ref in [cfg.env.name, *cfg.env.tools]:
        if is_reference(ref):
            source = reference_source(ref)
            out[f"code:{ref}"] = _file_digest(source) if source else "missing"
    return out


def sft_dir(cfg: Config) -> Path:
    prefix = "tiny" if cfg.model.preset == "tiny" else cfg.model.preset
    return cache_dir() / "sft" / f"{prefix}-{sft_key(cfg)}"


def split_train(tasks: list, rl_share: float, seed: int) -> tuple[list, list]:
    """(SFT questions, RL questions) of the train split: a seeded draw of round(rl_share·n) questions is
    kept for RL only, so RL practises on questions the warm start never memorised; rl_share 0 gives
    (tasks, tasks). Both keep the split's order."""
    if rl_share <= 0:
        return tasks, tasks
    ids = sorted(t.id for t in tasks)
    random.Random(f"rl_share:{seed}").shuffle(ids)
    rl_ids = set(ids[: round(rl_share * len(ids))])
    sft, rl = [t for t in tasks if t.id not in rl_ids], [t for t in tasks if t.id in rl_ids]
    if not sft or not rl:
        raise DataError(f"config key 'sft.rl_share' = {rl_share} leaves no question for "
                        f"{'SFT' if not sft else 'RL'} out of {len(tasks)} train questions")
    return sft, rl


def _demos(env: Environment, cfg: Config, notes: NoteDemos | None = None) -> list[tuple]:
    """(task, turns, note) demonstrations: note None for plain ones; with sft.teacher_share, that share
    carries a private note from `notes` (the distillation teacher's: a reference, an assessment label or
    none) and is always answered correctly, so the model learns to use the note."""
    if cfg.sft.teacher_share and notes is None:
        raise ValueError("sft.teacher_share > 0 needs note demos (tracerl.setup.warm_start passes the teacher's)")
    tasks = env.tasks("train")
    if not tasks:
        raise DataError(f"train split of environment {env.name!r} is empty")
    tasks, _ = split_train(tasks, cfg.sft.rl_share, cfg.env.seed)
    demo_task = getattr(env, "demo_task", None)  # an environment may keep some questions out of the demos
    if demo_task is not None:
        tasks = [t for t in tasks if demo_task(t)]
        if not tasks:
            raise DataError(f"environment {env.name!r} allows SFT demos of none of its train questions")
    rng = random.Random(cfg.sft.seed)
    noise = {"useless_search": cfg.sft.useless_search, "wrong_answer": cfg.sft.wrong_answer}
    out = []
    for _ in range(cfg.sft.demos):
        task = rng.choice(tasks)
        if cfg.sft.teacher_share and rng.random() < cfg.sft.teacher_share:
            note = notes.draw(env, task, rng)
            out.append((task, env.oracle_turns(task, rng, {**noise, "wrong_answer": 0.0}), note))
        else:
            out.append((task, env.oracle_turns(task, rng, noise), None))
    return out


def _corpus(env: Environment, demos) -> list[str]:
    """Text the tokenizer is trained on: prompts, demo turns and the observations they produce."""
    texts = []
    for task, turns, note in demos:
        texts += [env.system_prompt() or "", env.user_prompt(task), note or ""]
        state = env.initial_state(task)
        for turn in turns:
            state, res = env.step(state, turn)
            texts += [turn, res.observation or ""]
    return [t for t in texts if t]


def _batches(rows, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(rows), (batch_size,), generator=g).tolist()
        yield [rows[i] for i in idx]


def _collate(rows, pad_id: int):
    """Right-padded ids (B, L) and loss mask (B, L); right padding needs no attention mask."""
    return right_pad([ids for ids, _ in rows], pad_id), right_pad([lm for _, lm in rows], 0.0, torch.float32)


def run_sft(cfg: Config, inputs: SFTInputs, force: bool = False, log=print) -> Path:
    """Train (or reuse) the warm-start model of cfg's preset; returns the cached model directory."""
    if cfg.model.preset != "tiny" and not cfg.sft.pretrained:
        raise ConfigError(f"model.preset={cfg.model.preset} is pretrained: set sft.pretrained=true to fine-tune it "
                          "on the environment's demonstrations (and a small sft.lr, e.g. 1e-5)")
    out = sft_dir(cfg)
    with file_lock(out.parent / f".{out.name}.lock"):  # one trainer per key; the others wait and reuse
        if (out / "sft_meta.json").is_file() and not force:
            return out
        return _train_sft(cfg, inputs, out, log)


def _train_sft(cfg: Config, inputs: SFTInputs, out: Path, log) -> Path:
    t0 = time.time()
    env = inputs.env()
    demos = _demos(env, cfg, inputs.notes)
    m = cfg.model
    torch.manual_seed(cfg.sft.seed)
    if m.preset == "tiny":
        tokenizer = train_tokenizer(_corpus(env, demos), vocab_size=m.vocab_size)
        model = build_tiny_model(tokenizer, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                                 num_kv_heads=m.num_kv_heads, max_position_embeddings=max(m.max_context, 1024),
                                 seed=cfg.sft.seed)
    else:
        base = inputs.base()
        log(f"SFT of the pretrained policy at {base} (lr {cfg.sft.lr:g}"
            + ("; that is high for a pretrained model, 1e-5 is typical)" if cfg.sft.lr > 1e-4 else ")"))
        model, tokenizer = load_policy(base)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    rows = []
    for task, turns, note in demos:
        traj = replay_turns(tokenizer, env if note is None else inputs.notes.show(env, note), task, turns,
                            m.chat_template)
        rows.append((traj.token_ids[: m.max_context], traj.loss_mask[: m.max_context]))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"SFT: {len(rows)} demos, mean {sum(len(r[0]) for r in rows) / len(rows):.0f} tokens, "
        f"model {n_params / 1e6:.2f}M params, {cfg.sft.steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft.lr, weight_decay=0.01)
    warm = max(1, cfg.sft.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.sft.steps))))
    model.train()
    losses = []
    for step, batch in enumerate(_batches(rows, cfg.sft.batch_size, cfg.sft.steps, cfg.sft.seed)):
        ids, lm = _collate(batch, tokenizer.pad_token_id)
        logits = model(input_ids=ids).logits[:, :-1].float()  # right padding: no mask needed
        target, w = ids[:, 1:], lm[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
        loss = (nll * w.reshape(-1)).sum() / w.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.sft.steps // 10) == 0:
            log(f"SFT step {step + 1}/{cfg.sft.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"({time.time() - t0:.0f}s)")
    model.eval()
    # the key is sft_dir's suffix (hashing the train files again would read them twice)
    meta = {"key": out.name.rpartition("-")[2], "seconds": round(time.time() - t0, 1), "params": n_params,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]), "demos": len(rows), "steps": cfg.sft.steps}
    atomic_save_pretrained(model, tokenizer, out, extra_json={"sft_meta.json": meta})
    log(f"SFT done in {meta['seconds']}s, cached at {out}")
    return out
