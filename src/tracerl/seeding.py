"""Named random streams: every seeded draw of a run is one stream at one (seed, step).

    seeding.generator(cfg.run.seed, step, "rollout")   # torch.Generator of the step's sampling
    seeding.rng(cfg.run.seed, step, "allocator")        # random.Random of the step's allocation

A stream's integer seed is `seed * a + step * b + c` with the stream's (a, b, c) from `STREAMS`;
`generator` reduces it modulo 2**63 (torch's seed range), `rng` does not (random.Random takes any int).
Each draw is then a pure function of (run seed, step, stream): a resumed run repeats the draws of an
uninterrupted one, and two streams of one step are never the same sequence.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from tracerl.errors import OptionError

if TYPE_CHECKING:
    import torch

# name: (a, b, c) in `seed * a + step * b + c`.
# The numbers are the ones each stream was seeded with before it had a name, kept as they were so that
# earlier runs (and the recorded golden numbers) reproduce bit for bit; new streams should follow the
# main pattern. In it, 1_000_003 and 7919 are primes, so different (seed, step) pairs give different
# integers for the seeds and steps of real runs, and the offset c (below 7919) tells apart the streams
# drawn at the same (seed, step).
STREAMS: dict[str, tuple[int, int, int]] = {
    "rollout": (1_000_003, 7919, 0),  # train: the rollout engine's token sampling
    "calibrate_chains": (1_000_003, 7919, 1),  # calibrate: sampling of the G chains per prompt
    "calibrate_trees": (1_000_003, 7919, 2),  # calibrate: sampling of the Tree-GRPO trees
    "predictor": (1_000_003, 7919, 5),  # success predictor: minibatch order of its training passes
    "allocator": (1_000_003, 7919, 17),  # train: the allocator's draws (expanded nodes, kept leaves, ...)
    "drawer": (1_000_003, 7919, 31),  # train: order of the extra prompts drawn for pools and refills
    "annotator": (1_000_003, 7919, 101),  # distillation: sampling of the self / external annotator
    "credit": (1_000_003, 7919, 4242),  # token credit: the `random` rule's choice of boosted tokens
    "predictor_eval": (1_000_003, 7919, 211),  # predictor-eval: Monte-Carlo continuations, bootstrap, value model
    # earlier patterns, each kept for its stream
    "prompts": (1_000_003, 1, 0),  # train: the step's prompts from the train split
    "credit_samples": (7919, 1, 0),  # token credit: which weighted rows go to RUN_DIR/credit/
    "calibrate_prompts": (7, 1, 0),  # calibrate: the prompts of one measured batch
    "predictor_init": (7_368_787, 0, 11),  # success predictor: initial head weights (no step)
}


# Under torchrun, rank r > 0 draws its own streams: the integer seed is shifted by r times this prime
# (rank 0 keeps the single-process numbers).
RANK_SHIFT = 15_485_863


def seed_of(seed: int, step: int, stream: str, rank: int = 0) -> int:
    """The integer seed of `stream` at (seed, step) on `rank`; an unknown stream fails with the valid names."""
    try:
        a, b, c = STREAMS[stream]
    except KeyError:
        raise OptionError(f"unknown random stream {stream!r}; valid: {', '.join(sorted(STREAMS))}") from None
    return seed * a + step * b + c + rank * RANK_SHIFT


def generator(seed: int, step: int, stream: str, rank: int = 0) -> "torch.Generator":
    """A CPU torch.Generator seeded for `stream` at (seed, step) on `rank`."""
    import torch  # here, not at the top: torch-free code (allocators, the simulator) uses `rng`

    return torch.Generator().manual_seed(seed_of(seed, step, stream, rank) % (2**63))


def rng(seed: int, step: int, stream: str, rank: int = 0) -> random.Random:
    """A random.Random seeded for `stream` at (seed, step) on `rank`."""
    return random.Random(seed_of(seed, step, stream, rank))
