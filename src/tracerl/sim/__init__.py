"""A rollout-free simulator for measuring the shipped allocators at equal token budget (no model).

    tracerl sim --allocator all --difficulty beta:2,5 --predictor-noise 0.5 --seeds 3 --json alloc.epsilon=0

Prompts have a known success probability at every prefix (world.py). The allocators of
`tracerl.allocate` (docs/trace.md; the simulator: §11) run unchanged, with the training config's rollout / alloc
options, on a simulated engine and predictor (engine.py) that implement the interfaces they use in
training (`tracerl.allocate.engine`); run.py measures the contrast each one buys (effective ratio, mixed
anchors, expected and realised contrast).
"""

from tracerl.sim.engine import SimEngine, SimFeatures, SimPredictor
from tracerl.sim.run import (METRICS, SIM_DEFAULTS, SimBatch, allocator_names, batch_metrics, build_config,
                             default_token_budget, run_batch, simulate, summary_table)
from tracerl.sim.world import PromptStream, SimConfig, Turn, World

__all__ = ["METRICS", "SIM_DEFAULTS", "PromptStream", "SimBatch", "SimConfig", "SimEngine", "SimFeatures",
           "SimPredictor", "Turn", "World", "allocator_names", "batch_metrics", "build_config",
           "default_token_budget", "run_batch", "simulate", "summary_table"]
