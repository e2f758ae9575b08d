#!/usr/bin/env bash
# Smoke test of the vLLM generation backend (docs/engines.md §7): a short Tree-GRPO training whose rollouts
# go through a vLLM engine, once plain and once with truncated importance sampling (GPU: also with the
# weights synced by CUDA IPC, and with 2+ GPUs by NCCL to an engine on cuda:1), a check of what the metrics
# say, then bench/weight_sync_check.py: after a sync by each engine.weight_sync the engine's greedy outputs
# must equal those after a file sync.
#
#   bash bench/vllm_smoke.sh              # GPU: engine in its own process, bf16 on both sides, ~103M model
#   bash bench/vllm_smoke.sh --cpu        # CPU: .venv-vllm, in-process engine, fp32, 0.66M model (file sync only)
#   PY=/path/to/python bash bench/vllm_smoke.sh   # a Python whose environment has tracerl and vLLM
#
# Nothing is downloaded: the model is the tiny preset built from config (sizes in bench/gpu_smoke.env).
# Prints per run: steps, rollout tokens/s, the engine's prefix-cache hit rate, weight-sync seconds, the
# sampler/trainer log-prob drift and (TIS) the mean importance weight; per sync mode: sync seconds and the
# agreement with the file path. Fails (exit status not 0) when a run fails, a step is missing, a metric is
# missing or not finite, or a sync mode's outputs differ from the file path's. On one GPU the NCCL checks
# are skipped and say so.
set -euo pipefail
die() { echo "vllm_smoke: $*" >&2; exit 2; }
CPU=0
for a in "$@"; do
  case "$a" in
    --cpu) CPU=1 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$a' (see --help)" ;;
  esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=bench/gpu_smoke.env
source bench/gpu_smoke.env
PY=${PY:-$([ -x .venv-vllm/bin/python ] && echo .venv-vllm/bin/python || command -v python3)}
"$PY" -c "import tracerl, vllm" 2>/dev/null || die "$PY cannot import tracerl and vllm (GPU: pip install -e '.[vllm]'; CPU: make setup-vllm)"
export VLLM_HOST_IP=127.0.0.1
if [ "$CPU" = 1 ]; then
  MODEL=(model.hidden_size="$CPU_HIDDEN_SIZE" model.num_layers="$CPU_NUM_LAYERS" model.num_heads="$CPU_NUM_HEADS"
         model.num_kv_heads="$CPU_NUM_KV_HEADS" model.vocab_size="$CPU_VOCAB_SIZE" model.max_context="$CPU_MAX_CONTEXT")
  DEVICE=(run.device=cpu model.dtype=float32 engine.in_process=true)
  STEPS=$CPU_STEPS
else
  "$PY" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || die "torch in $PY sees no GPU; --cpu runs this on CPU"
  MODEL=(model.hidden_size="$GPU_HIDDEN_SIZE" model.num_layers="$GPU_NUM_LAYERS" model.num_heads="$GPU_NUM_HEADS"
         model.num_kv_heads="$GPU_NUM_KV_HEADS" model.vocab_size="$GPU_VOCAB_SIZE" model.max_context="$GPU_MAX_CONTEXT")
  DEVICE=(run.device=cuda model.dtype=bfloat16 engine.gpu_memory_utilization=0.3 engine.sleep_during_update=true)
  STEPS=$GPU_STEPS
  N_GPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tracerl_vllm_smoke.XXXXXX")
export TRACERL_CACHE=$WORK/cache
CONFIG=("${MODEL[@]}" "${DEVICE[@]}" engine.name=vllm run.seed=0 model.preset=tiny sft.enabled=false sft.steps=1
        sft.batch_size=2 rollout.prompts_per_step=4 rollout.allocator=tree_grpo rollout.trees_per_prompt=2
        rollout.expansions=2 algo.advantage=tree_grpo algo.entropy_coef=0.01 algo.skip_uniform_groups=false
        trainer.steps="$STEPS" trainer.lr=1e-5 trainer.warmup_steps=0 trainer.eval_at_start=false trainer.eval_every=0
        trainer.checkpoint_every=0 trainer.tensorboard=false trainer.tree_log_every=0 trainer.progress=false)
# run name -> its own overrides (ipc / nccl: the weights of every update reach the engine by vLLM's transfer)
declare -A RUNS=([none]="algo.sampler_correction=none" [tis]="algo.sampler_correction=tis")
SYNC_MODES=(file)
if [ "$CPU" = 0 ]; then
  RUNS[ipc]="algo.sampler_correction=none engine.weight_sync=ipc"
  SYNC_MODES+=(ipc)
  if [ "$N_GPU" -ge 2 ]; then
    RUNS[nccl]="algo.sampler_correction=none engine.weight_sync=nccl engine.device=cuda:1"
    SYNC_MODES+=(nccl)
  else
    echo "vllm_smoke: engine.weight_sync=nccl SKIPPED: it needs 2 GPUs (the engine on another GPU than the trainer); this machine has $N_GPU"
  fi
fi
for run in "${!RUNS[@]}"; do
  # shellcheck disable=SC2086
  "$PY" -m tracerl.cli train --overwrite "${CONFIG[@]}" run.dir="$WORK/$run" ${RUNS[$run]} \
    > "$WORK/$run.log" 2>&1 || { tail -30 "$WORK/$run.log"; die "the $run run failed (log: $WORK/$run.log)"; }
done
"$PY" - "$WORK" "$STEPS" "${!RUNS[@]}" <<'PYEOF'
import json, math, sys
work, steps = sys.argv[1], int(sys.argv[2])
bad = False
for corr in sorted(sys.argv[3:]):
    rows = [json.loads(l) for l in open(f"{work}/{corr}/metrics.jsonl")]
    keys = ["logp_drift", "engine_cache_hit_rate", "sync_s", "gen_tokens", "rollout_s"] + (["is_weight_mean"] if corr == "tis" else [])
    missing = [k for k in keys for r in rows if not isinstance(r.get(k), (int, float)) or not math.isfinite(r[k])]
    if len(rows) != steps or missing:
        print(f"vllm_smoke: FAILED ({corr}): {len(rows)} of {steps} steps, missing/non-finite {sorted(set(missing))}")
        bad = True
        continue
    tps = sum(r["gen_tokens"] for r in rows) / sum(r["rollout_s"] for r in rows)
    print(f"vllm_smoke {corr}: {steps} steps, rollout {tps:.0f} tokens/s, prefix-cache hit rate "
          f"{sum(r['engine_cache_hit_rate'] for r in rows) / steps:.3f}, sync {max(r['sync_s'] for r in rows):.2f} s max, "
          f"logp drift {sum(r['logp_drift'] for r in rows) / steps:.2e}"
          + (f", mean IS weight {sum(r['is_weight_mean'] for r in rows) / steps:.4f}" if corr == "tis" else ""))
sys.exit(1 if bad else 0)
PYEOF
# the warm start the runs trained (cached in $WORK/cache): every sync mode starts from it
MODEL_DIR=$("$PY" -c 'import sys
from tracerl.config import load_config
from tracerl.setup import resolve_model_path
print(resolve_model_path(load_config(None, sys.argv[1:]), log=lambda *a, **k: None))' "${CONFIG[@]}")
for mode in "${SYNC_MODES[@]}"; do
  ARGS=(--mode "$mode" --out "$WORK/sync_$mode.json")
  if [ "$CPU" = 1 ]; then ARGS+=(--cpu); fi
  if [ "$mode" = nccl ]; then ARGS+=(--engine-device cuda:1); fi
  "$PY" bench/weight_sync_check.py "$MODEL_DIR" "${ARGS[@]}" > "$WORK/sync_$mode.log" 2>&1 \
    || { tail -30 "$WORK/sync_$mode.log"; die "the weight_sync=$mode check failed (log: $WORK/sync_$mode.log)"; }
done
JSONS=()
for mode in "${SYNC_MODES[@]}"; do JSONS+=("$WORK/sync_$mode.json"); done
"$PY" bench/weight_sync_check.py --compare "${JSONS[@]}" \
  || die "a weight_sync mode disagrees with the file path (logs in $WORK)"
rm -rf "$WORK"
