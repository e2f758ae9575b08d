#!/usr/bin/env bash
# Smoke test of distributed training on the GPUs of this machine (docs/gpu_recipe.md §5).
#
#   bash bench/gpu_smoke.sh                    # one rank per visible GPU, ~103M-parameter model, 3 steps
#   bash bench/gpu_smoke.sh --cpu              # 2 gloo ranks on CPU, 0.66M-parameter model, 2 steps
#   bash bench/gpu_smoke.sh --keep             # keep the run directory (deleted after a passing run otherwise)
#   bash bench/gpu_smoke.sh trainer.steps=5    # extra config overrides go last
#   NPROC=2 bash bench/gpu_smoke.sh            # fewer ranks than GPUs
#
# Runs `torchrun -m tracerl.cli train` on the built-in multi-hop world with the tiny preset (a Qwen3 built
# from config; sizes in bench/gpu_smoke.env), so nothing is downloaded and nothing is installed. It uses
# Tree-GRPO rollouts, a KL term (so each rank also holds the reference model) and a small entropy bonus
# (so a random policy, whose rewards are all 0, still has a nonzero gradient), evaluates on 8 questions
# and checkpoints at the end. Then it prints steps/s and the peak GPU memory, and fails (exit status not 0)
# when the launch fails, a step is missing or the final checkpoint is incomplete. Needs `make setup`
# (a .venv whose torch sees CUDA); on one GPU torchrun starts a single process (no FSDP2, no NCCL).
set -euo pipefail

die() { echo "gpu_smoke: $*" >&2; exit 2; }

CPU=0
KEEP=0
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *=*) EXTRA+=("$1") ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/gpu_smoke.env
source bench/gpu_smoke.env

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3) || die "no .venv/bin/python and no python3; run make setup"; fi
if [ -x .venv/bin/torchrun ]; then TORCHRUN=(.venv/bin/torchrun); else TORCHRUN=("$PY" -m torch.distributed.run); fi
"$PY" -c "import tracerl" 2>/dev/null || die "$PY cannot import tracerl; run make setup"

if [ "$CPU" = 1 ]; then
  NPROC=${NPROC:-$CPU_RANKS}
  STEPS=$CPU_STEPS
  MODEL=(model.hidden_size="$CPU_HIDDEN_SIZE" model.num_layers="$CPU_NUM_LAYERS" model.num_heads="$CPU_NUM_HEADS"
         model.num_kv_heads="$CPU_NUM_KV_HEADS" model.vocab_size="$CPU_VOCAB_SIZE" model.max_context="$CPU_MAX_CONTEXT")
  DEVICE=(run.device=cpu run.threads=1 trainer.bf16=false)
  export OMP_NUM_THREADS=1
else
  N_SMI=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    N_SMI=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  [ "${N_SMI:-0}" -gt 0 ] || die "no NVIDIA GPU found (nvidia-smi is missing or lists none); --cpu runs this script on CPU"
  N_TORCH=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
  [ "$N_TORCH" -gt 0 ] || die "nvidia-smi lists $N_SMI GPU(s) but torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) in $PY sees none (a CPU-only build, or CUDA_VISIBLE_DEVICES hides them)"
  NPROC=${NPROC:-$N_TORCH}
  [ "$NPROC" -le "$N_TORCH" ] || die "NPROC=$NPROC but torch sees $N_TORCH GPU(s)"
  STEPS=$GPU_STEPS
  MODEL=(model.hidden_size="$GPU_HIDDEN_SIZE" model.num_layers="$GPU_NUM_LAYERS" model.num_heads="$GPU_NUM_HEADS"
         model.num_kv_heads="$GPU_NUM_KV_HEADS" model.vocab_size="$GPU_VOCAB_SIZE" model.max_context="$GPU_MAX_CONTEXT")
  # fp32 master weights + bf16 compute (FSDP2 mixed precision under torchrun, autocast in one process)
  DEVICE=(run.device=cuda trainer.bf16=true)
fi
for kv in ${EXTRA[@]+"${EXTRA[@]}"}; do  # an override of the step count changes what is checked
  case "$kv" in trainer.steps=*) STEPS=${kv#trainer.steps=} ;; esac
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tracerl_gpu_smoke.XXXXXX")
RUN_DIR=$WORK/run
LOG=$WORK/train.log
export TRACERL_CACHE=$WORK/cache   # the smoke model's warm start stays in the scratch directory

SAMPLER=""
cleanup() {
  if [ -n "$SAMPLER" ]; then kill "$SAMPLER" 2>/dev/null || true; wait "$SAMPLER" 2>/dev/null || true; fi
}
trap cleanup EXIT

# The tiny preset always goes through its SFT warm start; one step on 2 demos keeps the policy almost at
# its random init and costs seconds (the tokenizer is still trained on the default 3000 demos' text).
CONFIG=(
  "${MODEL[@]}" "${DEVICE[@]}"
  run.dir="$RUN_DIR" run.seed=0 run.dist_timeout_s=300 model.preset=tiny model.dtype=float32
  sft.enabled=false sft.steps=1 sft.batch_size=2
  rollout.prompts_per_step=$((2 * NPROC)) rollout.batch_size=64
  rollout.allocator=tree_grpo rollout.trees_per_prompt=2 rollout.expansions=2 rollout.rounds=1
  algo.advantage=tree_grpo algo.kl_coef=0.001 algo.entropy_coef=0.01 algo.skip_uniform_groups=false
  trainer.steps="$STEPS" trainer.lr=1e-5 trainer.warmup_steps=0 trainer.micro_batch_size=8
  trainer.eval_at_start=false trainer.eval_every=0 trainer.eval_size=8
  trainer.checkpoint_every=0 trainer.keep_checkpoints=1 trainer.tensorboard=false trainer.tree_log_every=0
  trainer.progress=false
)

echo "gpu_smoke: $NPROC rank(s) on $([ "$CPU" = 1 ] && echo "CPU (gloo)" || echo "GPU"), $STEPS steps, run directory $RUN_DIR"
if [ "$CPU" = 0 ]; then
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits > "$WORK/gpu_mem_before.csv" 2>/dev/null || true
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/gpu_mem.csv" 2>/dev/null &
  SAMPLER=$!
fi

START=$(date +%s)
RC=0
"${TORCHRUN[@]}" --standalone --nproc-per-node "$NPROC" -m tracerl.cli train --overwrite \
  "${CONFIG[@]}" ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$LOG" || RC=$?
WALL=$(( $(date +%s) - START ))
cleanup
SAMPLER=""

if [ "$RC" != 0 ]; then
  echo "gpu_smoke: FAILED: torchrun exited with status $RC after ${WALL}s; log and run directory kept in $WORK" >&2
  exit "$RC"
fi

RC=0
"$PY" - "$RUN_DIR" "$STEPS" "$WALL" "$WORK/gpu_mem_before.csv" "$WORK/gpu_mem.csv" <<'PYEOF' || RC=$?
import json
import math
import sys
from pathlib import Path

from safetensors import safe_open

from tracerl.checkpoint import latest_checkpoint
from tracerl.rundir import CHECKPOINT_DIR, CHECKPOINT_MODEL_DIR, METRICS_FILE
from tracerl.runlog import read_jsonl

run_dir, steps, wall = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
problems = []
rows = read_jsonl(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
if len(rows) != steps:
    problems.append(f"{METRICS_FILE} has {len(rows)} step rows, expected {steps}")
ckpt = latest_checkpoint(run_dir / CHECKPOINT_DIR)
if ckpt is None or not ckpt.name.endswith(f"{steps:06d}"):
    problems.append(f"no complete checkpoint for step {steps} under {run_dir / CHECKPOINT_DIR}")
for r in rows:
    for key in ("loss", "grad_norm"):
        if key in r and (r[key] is None or not math.isfinite(r[key])):
            problems.append(f"step {r['step']}: {key} is {r[key]}")

if ckpt is not None:
    n = 0
    for f in sorted((ckpt / CHECKPOINT_MODEL_DIR).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    print(f"model: {n:,} parameters (checkpoint {ckpt.name})")
if rows:
    step_s = [sum(r.get(k) or 0.0 for k in ("rollout_s", "update_s", "predictor_s", "credit_s")) for r in rows]
    later = step_s[1:] or step_s  # the first step includes CUDA warm-up
    mean = sum(later) / len(later)
    print(f"steps/s: {1 / mean:.3f} ({mean:.1f} s/step over steps {rows[-len(later)]['step']}..{rows[-1]['step']}, "
          f"rollout + update of the slowest rank; launch wall time {wall} s including start-up, warm start, "
          f"evaluation and checkpoint)")
    gen = sum(r.get("gen_tokens") or 0 for r in rows[-len(later):])
    roll = sum(r.get("rollout_s") or 0.0 for r in rows[-len(later):])
    if roll:
        print(f"generated tokens/s (all ranks): {gen / roll:.0f}")
    last = rows[-1]
    print("last step: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "grad_norm", "kl", "leaves", "train_tokens")
                                     if isinstance(last.get(k), (int, float))))
    mem_keys = sorted({k for r in rows for k in r if "mem" in k.lower()})
    for k in mem_keys:
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            print(f"{k} (metrics.jsonl, max over steps): {max(vals):.4g}")


def gpu_table(path: str) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        parts = [s.strip() for s in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out.setdefault(int(parts[0]), []).append(int(parts[1]))
    return out


before, during = gpu_table(sys.argv[4]), gpu_table(sys.argv[5])
if during:
    peaks = {i: max(v) - min(before.get(i, [0])) for i, v in during.items()}
    shown = {i: p for i, p in peaks.items() if p > 0}
    print("peak GPU memory per GPU (nvidia-smi memory.used every 0.5 s, minus the use before the launch; "
          "includes the CUDA context and PyTorch's cache): "
          + (", ".join(f"GPU {i} {p / 1024:.2f} GiB" for i, p in sorted(shown.items())) or "none seen"))
elif Path(sys.argv[5]).parent.joinpath("gpu_mem_before.csv").exists():
    print("peak GPU memory: nvidia-smi sampling gave no readings")

if problems:
    for p in problems:
        print(f"gpu_smoke: FAILED: {p}", file=sys.stderr)
    sys.exit(1)
PYEOF

if [ "$RC" != 0 ]; then
  echo "gpu_smoke: FAILED; log and run directory kept in $WORK" >&2
  exit "$RC"
fi
if [ "$KEEP" = 1 ]; then
  echo "gpu_smoke: passed; run directory kept: $RUN_DIR (log: $LOG)"
else
  rm -rf "$WORK"
  echo "gpu_smoke: passed"
fi
