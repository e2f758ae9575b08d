"""Benchmark: one GRPO training step on the CPU, tracerl against TRL's `GRPOTrainer`, side by side.

Both frameworks train the same randomly initialised ~29M-parameter Qwen3 (hidden 384, 6 layers, 6
heads / 2 KV heads, MLP 2048, tied embeddings, a 32k byte-level BPE vocabulary trained offline with
`tracerl.models.tiny.train_tokenizer` on the arithmetic prompts and the Python standard library's
source), float32, one torch thread, on the same arithmetic word problems (`env.name=arith`,
single turn; at step s both see the 8 prompts tracerl's trainer draws for step s). One step = 8 prompts
× 8 sampled completions of at most 64 new tokens at temperature 1 (top-p 1, no top-k), group-normalised
advantages (GRPO), PPO-clip 0.2 token-mean loss (TRL `loss_type="dapo"`), no KL (beta 0), one PPO
epoch over one mini-batch of all 64 completions, forward/backward in one micro-batch of 64 (TRL:
`per_device_train_batch_size=64`, `gradient_accumulation_steps=1`, so `generation_batch_size=64`
and `steps_per_generation=1`: one generation and one optimizer step per step), gradient clipping at 1,
one `torch.optim.AdamW` step at the same constant learning rate (TRL `optim="adamw_torch"`, no
warm-up, no gradient checkpointing, bf16 off).

Measured: CPU seconds of the framework's process (`time.process_time`; with one torch thread this is
about the wall time on an idle machine, and unlike wall time it does not count waiting for a core
that other jobs hold) per step, split into

* generation: tracerl `Trainer.rollout` (chat-template prompts, batched KV-cache sampling, the
  environment's scoring); TRL `GRPOTrainer._generate` (chat-template tokenisation, `model.generate`,
  decoding, completion-length metrics);
* update: the rest of the step. tracerl: the rest of `Trainer.train_step` (trajectories, advantages,
  metrics, forward + backward, clip, AdamW). TRL: the rest of one trainer step from the batch fetch to
  `on_step_end` (reward function, advantages, padding, forward + backward with its entropy, clip,
  AdamW, scheduler);
* total: the whole step.

Each framework runs in its own long-lived worker process (this script with `--worker`): it sets
up once, then runs one step per "go" from this parent and reports its times, so the two never run at
the same time and each measures steps 2, 3, ... of a real run (optimizer state and allocator caches
warm, as in training). One process per framework, not one for both, because both would share torch's
global state (threads, RNG, allocator) and TRL/accelerate set some of it. Steps are interleaved
A B, B A, A B, ... (`--warmup` untimed rounds first), and the medians over `--repeats` rounds are
reported, with the ratio tracerl / TRL of each median.

    .venv/bin/pip install -e '.[bench]'                                   # TRL (bench-only extra)
    .venv/bin/python bench/trl_step.py                                    # writes bench/results/trl_step.json
    .venv/bin/python bench/trl_step.py --repeats 2 --hidden 128 --layers 2 --vocab 4096 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

MARK = "@@TRL_STEP "  # prefix of the worker's protocol lines on stdout (everything else is its own output)
TRL_MISSING = ("trl is not installed: `.venv/bin/pip install -e '.[bench]'` "
               "(bench/trl_step.py compares against TRL's GRPOTrainer)")
# tracerl_packed: the same tracerl step with algo.dedup_prefix=true (each prompt's G chains packed as one
# tree: the prompt runs once in the update); "tracerl" is the default layout (one row per completion)
FRAMEWORKS = ("tracerl", "tracerl_packed", "trl")
TRACERL = ("tracerl", "tracerl_packed")


# ---------------------------------------------------------------- the shared model

def model_key(args) -> dict:
    return dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                intermediate=args.intermediate, vocab=args.vocab, model_seed=args.model_seed,
                python=platform.python_version())


def corpus() -> list[str]:
    """Tokenizer training text, all offline: every arithmetic prompt of the train and validation splits
    and the Python standard library's source (sorted paths, tests left out)."""
    import sysconfig

    from tracerl.envs import make_env

    env = make_env("arith", seed=0)
    texts = [env.user_prompt(t) for split in ("train", "validation") for t in env.tasks(split)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if "site-packages" not in p.parts and not any("test" in part for part in p.parts))
    texts += [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return texts


def build_model_dir(args) -> tuple[Path, dict]:
    """The randomly initialised policy + tokenizer as a Hugging Face directory (built once, cached)."""
    key = model_key(args)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(args.cache) / f"model-{digest}"
    meta_file = out / "bench_model.json"
    if meta_file.is_file():
        return out, json.loads(meta_file.read_text())
    from tracerl.models.io import atomic_save_pretrained
    from tracerl.models.tiny import build_tiny_model, train_tokenizer

    t0 = time.time()
    tok = train_tokenizer(corpus(), vocab_size=args.vocab)
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, seed=args.model_seed)
    meta = dict(key, parameters=sum(p.numel() for p in model.parameters()), tokenizer_len=len(tok),
                model_type=model.config.model_type, build_s=round(time.time() - t0, 1))
    atomic_save_pretrained(model, tok, out, extra_json={"bench_model.json": meta})
    return out, meta


# ---------------------------------------------------------------- worker side

def emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        sys.exit(0)  # the parent closed the pipe or asked us to stop


def scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, bool, str, type(None)))}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tracerl_worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    from tracerl.config import load_config
    from tracerl.train import Trainer

    run_dir = Path(args.work) / "tracerl_run"
    overrides = [
        "env.name=arith", "env.max_turns=1", "env.options={}",
        "model.preset=path", f"model.path={args.model_dir}", "model.dtype=float32", "sft.pretrained=false",
        f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group}",
        f"rollout.max_turn_tokens={args.max_new}", f"rollout.temperature={args.temperature}", "rollout.top_p=1.0",
        f"rollout.batch_size={args.prompts * args.group}",
        "algo.skip_uniform_groups=false", "algo.aggregation=token-mean", "algo.kl_coef=0.0",
        f"trainer.micro_batch_size={args.prompts * args.group}", "trainer.ppo_epochs=1", "trainer.mini_batches=1",
        f"trainer.lr={args.lr}", "trainer.warmup_steps=0", "trainer.weight_decay=0.0", "trainer.grad_clip=1.0",
        "trainer.bf16=false", "trainer.eval_at_start=false", "trainer.progress=false", "trainer.tensorboard=false",
        "trainer.tree_log_every=0", "run.threads=1", f"run.seed={args.seed}", f"run.dir={run_dir}",
        f"algo.dedup_prefix={'true' if args.worker == 'tracerl_packed' else 'false'}",
    ]
    cfg = load_config(None, overrides)
    tr = Trainer(cfg, overwrite=True, log=lambda *a, **k: None)
    tr.setup()

    rec: dict = {}
    rollout, generate = tr.rollout, tr.policy.generate

    def timed_rollout(step):
        c0, w0 = time.process_time(), time.perf_counter()
        out = rollout(step)
        rec["gen_cpu"], rec["gen_wall"] = time.process_time() - c0, time.perf_counter() - w0
        return out

    def timed_generate(prompts, params, generator=None, **kw):
        c0 = time.process_time()
        gens, stats = generate(prompts, params, generator, **kw)
        rec["gen_call_cpu"] = rec.get("gen_call_cpu", 0.0) + time.process_time() - c0
        rec["completions"] = rec.get("completions", 0) + len(gens)
        rec["gen_tokens"] = rec.get("gen_tokens", 0) + sum(len(g.token_ids) for g in gens)
        rec["prompt_tokens"] = rec.get("prompt_tokens", 0) + sum(len(p) for p in prompts)
        rec["stopped_early"] = rec.get("stopped_early", 0) + sum(g.stopped != "length" for g in gens)
        return gens, stats

    tr.rollout, tr.policy.generate = timed_rollout, timed_generate
    emit({"ready": True, "parameters": sum(p.numel() for p in tr.model.parameters()),
          "optimizer": type(tr.optimizer).__name__, "optimizer_defaults": scalars(tr.optimizer.defaults),
          "group_weight_decay": sorted({g["weight_decay"] for g in tr.optimizer.param_groups})})
    for step in range(args.steps):
        wait_go()
        rec.clear()
        c0, w0 = time.process_time(), time.perf_counter()
        m = tr.train_step(step)
        total_cpu, total_wall = time.process_time() - c0, time.perf_counter() - w0
        emit(dict(rec, step=step, total_cpu=total_cpu, total_wall=total_wall, update_cpu=total_cpu - rec["gen_cpu"],
                  update_wall=total_wall - rec["gen_wall"], rollout_s=m["rollout_s"], update_s=m["update_s"],
                  train_tokens=m.get("train_tokens"), trained=m.get("trained_trajectories"),
                  reward_mean=m.get("reward_mean"), peak_rss_mib=peak_rss_mib()))


def trl_worker(args) -> None:
    if importlib.util.find_spec("trl") is None:
        emit({"error": TRL_MISSING})
        return
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tracerl.envs import make_env
    from tracerl.envs.arith import parse_number

    env = make_env("arith", seed=0)
    tasks = env.tasks("train")
    rows = []
    for step in range(args.steps):
        # the prompts tracerl's Trainer.sample_tasks draws for this step (run.seed, whole train split)
        for t in random.Random(args.seed * 1_000_003 + step).sample(tasks, args.prompts):
            rows.append({"prompt": [{"role": "user", "content": env.user_prompt(t)}], "answer": t.answers[0]})
    answer_re = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

    def arith_reward(completions, answer, **_):
        """The arithmetic environment's check: 1 if <answer>NUMBER</answer> holds the gold number."""
        out = []
        for c, gold in zip(completions, answer):
            text = c[0]["content"] if isinstance(c, list) else c
            m = answer_re.search(text)
            v = parse_number(m.group(1)) if m else None
            out.append(float(v is not None and abs(v - float(gold)) < 1e-9))
        return out

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    n = args.prompts * args.group
    # transformers >= 5.24 renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    fields = GRPOConfig.__dataclass_fields__
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    no_ckpt = {ckpt_key: False}
    config = GRPOConfig(
        output_dir=str(Path(args.work) / "trl_run"), num_generations=args.group,
        per_device_train_batch_size=n, gradient_accumulation_steps=1,  # generation batch = train batch = 64
        max_completion_length=args.max_new, num_iterations=1, beta=0.0, loss_type="dapo", scale_rewards="group",
        epsilon=0.2, temperature=args.temperature, top_p=1.0, top_k=0, use_vllm=False,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, bf16=False, fp16=False, use_cpu=True,
        **no_ckpt, logging_strategy="no", save_strategy="no", report_to=[],
        disable_tqdm=True, shuffle_dataset=False, seed=args.seed, dataloader_num_workers=0, log_completions=False,
    )
    rec: dict = {}
    clock: dict = {}

    class Gate(TrainerCallback):
        """Blocks before each step until the parent says go; reports the step's times at its end."""

        def on_train_begin(self, a, state, control, **kw):
            emit({"ready": True, "parameters": sum(p.numel() for p in model.parameters()),
                  "checkpointing": any(bool(getattr(m, "gradient_checkpointing", False)) for m in model.modules()),
                  "optimizer": type(trainer.optimizer).__name__,
                  "optimizer_defaults": scalars(trainer.optimizer.defaults),
                  "group_weight_decay": sorted({g["weight_decay"] for g in trainer.optimizer.param_groups})})
            wait_go()
            rec.clear()
            clock["c"], clock["w"] = time.process_time(), time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            total_cpu, total_wall = time.process_time() - clock["c"], time.perf_counter() - clock["w"]
            emit(dict(rec, step=state.global_step - 1, total_cpu=total_cpu, total_wall=total_wall,
                      update_cpu=total_cpu - rec["gen_cpu"], update_wall=total_wall - rec["gen_wall"],
                      peak_rss_mib=peak_rss_mib()))
            if state.global_step < args.steps:
                wait_go()
                rec.clear()
                clock["c"], clock["w"] = time.process_time(), time.perf_counter()

    trainer = GRPOTrainer(model=model, reward_funcs=arith_reward, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Gate()])
    generate_fn, model_generate = trainer._generate, trainer.model.generate

    def timed_generate(prompts):
        c0, w0 = time.process_time(), time.perf_counter()
        out = generate_fn(prompts)
        rec["gen_cpu"] = rec.get("gen_cpu", 0.0) + time.process_time() - c0
        rec["gen_wall"] = rec.get("gen_wall", 0.0) + time.perf_counter() - w0
        prompt_ids, completion_ids = out[0], out[1]
        eos = {tok.eos_token_id}
        rec["completions"] = rec.get("completions", 0) + len(completion_ids)
        rec["gen_tokens"] = rec.get("gen_tokens", 0) + sum(len(c) for c in completion_ids)
        rec["prompt_tokens"] = rec.get("prompt_tokens", 0) + sum(len(p) for p in prompt_ids)
        rec["stopped_early"] = rec.get("stopped_early", 0) + sum(bool(c) and c[-1] in eos for c in completion_ids)
        return out

    def timed_model_generate(*a, **kw):
        c0 = time.process_time()
        out = model_generate(*a, **kw)
        rec["gen_call_cpu"] = rec.get("gen_call_cpu", 0.0) + time.process_time() - c0
        return out

    trainer._generate, trainer.model.generate = timed_generate, timed_model_generate
    trainer.train()


# ---------------------------------------------------------------- parent side

class Worker:
    def __init__(self, name: str, args, model_dir: Path, log_dir: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--model-dir", str(model_dir),
               "--work", str(log_dir / name), "--steps", str(args.warmup + args.repeats)]
        for k in ("prompts", "group", "max_new", "temperature", "lr", "seed"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   HF_HOME=str(log_dir / "hf_home"), TRACERL_CACHE=str(log_dir / "tracerl_cache"))
        (log_dir / name).mkdir(parents=True, exist_ok=True)
        self.name, self.stderr_path = name, log_dir / f"{name}.stderr"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.stderr_path, "w"), text=True, env=env, cwd=str(REPO))
        self.other: list[str] = []

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                msg = json.loads(line[len(MARK):])
                if "error" in msg:
                    raise SystemExit(msg["error"])
                return msg
            self.other.append(line.rstrip())
        tail = self.stderr_path.read_text(errors="replace").strip().splitlines()[-25:]
        raise SystemExit(f"{self.name} worker exited (rc {self.proc.wait()}); stderr tail:\n" + "\n".join(tail))

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "trl", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_state() -> dict:
    """The commit the tracerl code was read from, and whether the working tree had uncommitted edits."""
    def run(*cmd):  # read-only plumbing (no index refresh, unlike `git status`)
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
    head, diff = run("rev-parse", "--short", "HEAD"), run("diff-index", "--quiet", "HEAD", "--", "src")
    return {"head": head.stdout.strip() if head and head.returncode == 0 else None,
            "dirty": None if diff is None else diff.returncode == 1}


def summarize(rows: list[dict]) -> dict:
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    n = sum(r["completions"] for r in rows)
    return {
        "generation_cpu_s": med("gen_cpu"), "update_cpu_s": med("update_cpu"), "total_cpu_s": med("total_cpu"),
        "generation_wall_s": med("gen_wall"), "update_wall_s": med("update_wall"), "total_wall_s": med("total_wall"),
        "generate_call_cpu_s": med("gen_call_cpu"),
        "gen_tokens_per_completion": sum(r["gen_tokens"] for r in rows) / n,
        "prompt_tokens_per_completion": sum(r["prompt_tokens"] for r in rows) / n,
        "stopped_early_share": sum(r["stopped_early"] for r in rows) / n,
        "completions_per_step": n / len(rows),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per framework (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per framework first")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "trl_step.json"))
    ap.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary size (tokens, tags included)")
    ap.add_argument("--model-seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(REPO / ".cache" / "trl_step"), help="where the built model is kept")
    ap.add_argument("--json", action="store_true", help="also print the result as JSON")
    # worker mode (internal)
    ap.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        (tracerl_worker if args.worker in TRACERL else trl_worker)(args)
        return
    if "trl" in args.frameworks and importlib.util.find_spec("trl") is None:
        print(TRL_MISSING)
        raise SystemExit(1)

    from _results import save_result

    git = git_state()  # read before the steps: the code the workers import
    model_dir, meta = build_model_dir(args)
    print(f"model: {meta['model_type']} hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} KV, MLP {args.intermediate}, vocab {meta['tokenizer_len']}: "
          f"{meta['parameters'] / 1e6:.2f}M parameters ({model_dir})", flush=True)
    rows: dict[str, list[dict]] = {f: [] for f in args.frameworks}
    warm: dict[str, list[dict]] = {f: [] for f in args.frameworks}
    order_log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="trl_step-") as tmp:
        workers = {f: Worker(f, args, model_dir, Path(tmp)) for f in args.frameworks}  # set up in parallel
        try:
            ready = {f: w.read() for f, w in workers.items()}
            for i in range(args.warmup + args.repeats):
                order = list(args.frameworks) if i % 2 == 0 else list(reversed(args.frameworks))
                for f in order:
                    r = workers[f].step()
                    (warm if i < args.warmup else rows)[f].append(r)
                    order_log.append(f)
                    tag = "warm-up" if i < args.warmup else f"repeat {i - args.warmup + 1}"
                    print(f"  {tag:9s} {f:14s} generation {r['gen_cpu']:7.2f}  update {r['update_cpu']:7.2f}  "
                          f"total {r['total_cpu']:7.2f} CPU s  (wall {r['total_wall']:.2f} s, "
                          f"{r['gen_tokens'] / r['completions']:.1f} tok/completion)", flush=True)
        finally:
            for w in workers.values():
                w.close()

    med = {f: summarize(rows[f]) for f in args.frameworks}
    ratio = None
    if "trl" in med:
        ratio = {f: {k: med[f][f"{k}_cpu_s"] / med["trl"][f"{k}_cpu_s"] for k in ("generation", "update", "total")}
                 for f in TRACERL if f in med}

    names = {"trl": "TRL GRPOTrainer", "tracerl": "tracerl (rows)", "tracerl_packed": "tracerl (packed)"}
    print(f"\nCPU seconds per step, median of {args.repeats} (1 torch thread; "
          f"{args.prompts} prompts x {args.group} completions, <= {args.max_new} new tokens, T={args.temperature})")
    print(f"{'':26s} {'generation':>10s} {'update':>8s} {'total':>8s} {'gen tok/compl':>14s} {'prompt tok':>10s}")
    for f in [f for f in ("trl", *TRACERL) if f in med]:
        s = med[f]
        print(f"{names[f]:26s} {s['generation_cpu_s']:10.2f} {s['update_cpu_s']:8.2f} {s['total_cpu_s']:8.2f} "
              f"{s['gen_tokens_per_completion']:14.1f} {s['prompt_tokens_per_completion']:10.1f}")
    for f, r in (ratio or {}).items():
        print(f"{names[f] + ' / TRL':26s} {r['generation']:10.2f} {r['update']:8.2f} {r['total']:8.2f}")

    result = {
        "benchmark": "trl_step",
        "command": " ".join([".venv/bin/python", "bench/trl_step.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": 1},
        "versions": versions(),
        "git": git,
        "model": {**meta, "dir": str(model_dir)},
        "setting": {k: getattr(args, k) for k in ("prompts", "group", "max_new", "temperature", "lr", "seed",
                                                   "repeats", "warmup")},
        "timing": "CPU seconds of each framework's own process (time.process_time); wall seconds too",
        "order": order_log,
        "ready": ready,
        "warmup_steps": warm,
        "raw": rows,
        "median": med,
        "ratio_tracerl_over_trl": ratio,
    }
    save_result(result, args.out, args.json)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
