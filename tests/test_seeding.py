"""Named random streams reproduce the seeds their call sites used before they had names (so earlier
runs and the golden numbers stay bit-identical), and differ from each other."""

import random

import pytest
import torch

from tracerl import seeding
from tracerl.errors import OptionError

# the expressions the call sites used, verbatim
BEFORE = {
    "rollout": lambda seed, step: (seed * 1_000_003 + step * 7919 + 0) % (2**63),
    "calibrate_chains": lambda seed, step: (seed * 1_000_003 + step * 7919 + 1) % (2**63),
    "calibrate_trees": lambda seed, step: (seed * 1_000_003 + step * 7919 + 2) % (2**63),
    "predictor": lambda seed, step: (seed * 1_000_003 + step * 7919 + 5) % (2**63),
    "annotator": lambda seed, step: (seed * 1_000_003 + step * 7919 + 101) % (2**63),
    "credit": lambda seed, step: (seed * 1_000_003 + step * 7919 + 4242) % (2**63),
    "allocator": lambda seed, step: seed * 1_000_003 + step * 7919 + 17,
    "drawer": lambda seed, step: seed * 1_000_003 + step * 7919 + 31,
    "predictor_eval": lambda seed, step: seed * 1_000_003 + step * 7919 + 211,  # new with tracerl predictor-eval
    "prompts": lambda seed, step: seed * 1_000_003 + step,
    "credit_samples": lambda seed, step: seed * 7919 + step,
    "calibrate_prompts": lambda seed, step: seed * 7 + step,
    "predictor_init": lambda seed, step: seed * 7_368_787 + 11,
}
TORCH = {"rollout", "calibrate_chains", "calibrate_trees", "predictor", "annotator", "credit"}
SEEDS = [(0, 0), (0, 1), (3, 17), (-2, 5), (123_456_789, 10_000), (-(2**40), 3)]


def test_every_stream_is_pinned_here():
    assert set(BEFORE) == set(seeding.STREAMS)


@pytest.mark.parametrize("stream", sorted(TORCH))
def test_generators_draw_what_the_old_seeds_drew(stream):
    for seed, step in SEEDS:
        old = torch.Generator().manual_seed(BEFORE[stream](seed, step))
        new = seeding.generator(seed, step, stream)
        assert torch.equal(torch.randint(1 << 30, (8,), generator=new), torch.randint(1 << 30, (8,), generator=old))


@pytest.mark.parametrize("stream", sorted(set(BEFORE) - TORCH))
def test_rngs_and_plain_seeds_are_the_old_integers(stream):
    for seed, step in SEEDS:
        step = 0 if stream == "predictor_init" else step  # the initial weights have no step
        assert seeding.seed_of(seed, step, stream) == BEFORE[stream](seed, step)
        old, new = random.Random(BEFORE[stream](seed, step)), seeding.rng(seed, step, stream)
        assert [new.random() for _ in range(4)] == [old.random() for _ in range(4)]


def test_streams_of_one_step_differ_and_unknown_names_fail():
    ints = {seeding.seed_of(7, 3, s) for s in seeding.STREAMS}
    assert len(ints) == len(seeding.STREAMS)
    with pytest.raises(OptionError, match="valid: .*rollout"):
        seeding.rng(0, 0, "rolout")
