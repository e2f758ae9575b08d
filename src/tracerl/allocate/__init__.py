"""Allocators: where a step's rollouts go (which prompts, how many chains, which nodes to branch from).

Every allocator has the same signature and returns the step's trees; the engine measures the cost:

    fn(ctx: AllocationContext, tasks: list[Task]) -> list[RolloutTree]

`ctx` carries the engine, the rollout / alloc sections, the step's RNG and, for allocators with
the `uses_predictor` trait, the success predictor and per-prompt statistics (see `AllocationContext`).
The rollout engine executes what the allocator asks for (`engine.grow([(tree, node), ...])`), so
an allocator never touches models or token ids.
"""

from tracerl.allocate.basic import ALLOCATORS, AllocationContext, check_tree_shape, match_tree_shape
from tracerl.allocate import budgeted  # noqa: F401  (registers dapo, pcl, knapsack, trace)

__all__ = ["ALLOCATORS", "AllocationContext", "check_tree_shape", "match_tree_shape"]
