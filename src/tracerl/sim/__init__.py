"""A rollout-free simulator for comparing allocators at equal token budget (no models, no torch).

    tracerl sim --allocator all --difficulty beta:2,5 --predictor-noise 0.5 --seeds 3 --json

Prompts are random trees whose success probability is known at every prefix (world.py); the
allocators of METHODS.md §2–4 spend the same generated-token budget per batch on them
(allocators.py); run.py measures the contrast each one buys (effective ratio, mixed anchors,
expected and realised contrast).
"""

from tracerl.sim.allocators import ORDER, SIM_ALLOCATORS
from tracerl.sim.run import METRICS, batch_metrics, run_batch, simulate, summary_table
from tracerl.sim.world import PromptStream, SimConfig, SimTree, TokenBudget, World

__all__ = ["METRICS", "ORDER", "SIM_ALLOCATORS", "PromptStream", "SimConfig", "SimTree", "TokenBudget", "World",
           "batch_metrics", "run_batch", "simulate", "summary_table"]
