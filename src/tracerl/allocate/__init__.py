"""Allocators: where a step's rollouts go (which prompts, how many chains, which nodes to branch from).

Every allocator has the same signature and returns the step's trees; the engine measures the cost:

    fn(engine: RolloutEngine, tasks: list[Task], cfg: RolloutConfig, rng: random.Random) -> list[RolloutTree]

The rollout engine executes what the allocator asks for (`engine.grow([(tree, node), ...])`), so
an allocator never touches models or token ids.
"""

from tracerl.allocate.basic import ALLOCATORS, check_tree_shape, match_tree_shape

__all__ = ["ALLOCATORS", "check_tree_shape", "match_tree_shape"]
