"""The simulated world: prompts whose success probability is known at every prefix.

A prompt has a difficulty v0 = V(x). A turn moves the success probability as a martingale: given
V(H_t) = v, the next value V(H_{t+1}) is drawn from a Beta with mean v and variance s·v(1 − v), where
s = `turn_strength` ∈ [0, 1] is the share of the outcome variance left at H_t that one turn resolves
(s = 0: turns reveal nothing, s = 1: the first turn decides the outcome). The expectation is preserved
and every value stays a probability. After each turn but the last the trajectory ends with
probability `early_stop`; at a leaf R ~ Bernoulli(V(leaf)). So V(H_t) = P(R = 1 | H_t) exactly.

Cost is in token units like real training: each turn costs a uniform integer in `turn_tokens`; a
continuation from a prefix at depth t pays only the turns it generates. The root costs nothing.

Every turn also draws ε ~ N(0, 1), and every prompt one for its root: the noise the simulator's
success predictor adds to that node (engine.SimPredictor), drawn once per node.

Only the world lives here; where rollouts go is decided by the shipped allocators
(`tracerl.allocate`), run through the simulated engine (engine.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

from tracerl.envs.base import Task
from tracerl.errors import OptionError


@dataclass
class SimConfig:
    """The simulator's own options: the world and the predictor's noise. How many prompts, chains,
    trees, continuations ... and the token budget are the training config's `rollout.*` / `alloc.*`."""

    difficulty: str = "beta:0.5,0.5"  # v0 distribution: beta:A,B | uniform | point:V
    turns: int = 3  # T: turns of a full trajectory
    turn_tokens: str = "20-60"  # generated tokens of one turn: LO-HI (uniform integer) or N
    turn_strength: float = 0.3  # s: share of the remaining outcome variance one turn resolves
    early_stop: float = 0.0  # chance a trajectory ends after each turn but the last
    predictor_noise: float = 0.5  # σ on the logit of the predicted success probability
    oracle: bool = False  # the predictor returns the true V

    def __post_init__(self) -> None:
        self.turn_range = parse_turn_tokens(self.turn_tokens)
        self.sample_v0 = parse_difficulty(self.difficulty)
        checks = {
            "turns ≥ 1": self.turns >= 1, "0 ≤ turn_strength ≤ 1": 0 <= self.turn_strength <= 1,
            "0 ≤ early_stop < 1": 0 <= self.early_stop < 1, "predictor_noise ≥ 0": self.predictor_noise >= 0,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise OptionError("simulator options out of range: need " + "; ".join(bad))

    def expected_turns(self) -> float:
        keep = 1 - self.early_stop
        return float(self.turns) if self.early_stop == 0 else (1 - keep ** self.turns) / self.early_stop

    def expected_chain_tokens(self) -> float:
        return self.expected_turns() * sum(self.turn_range) / 2

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_difficulty(spec: str):
    """`beta:A,B`, `uniform` or `point:V` -> a function rng -> v0."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "beta":
            a, b = (float(x) for x in arg.split(","))
            if a > 0 and b > 0:
                return lambda rng: rng.betavariate(a, b)
        elif kind == "uniform" and not arg:
            return lambda rng: rng.random()
        elif kind == "point":
            v = float(arg)
            if 0 <= v <= 1:
                return lambda rng: v
    except ValueError:
        pass
    raise OptionError(f"difficulty {spec!r} not understood; use beta:A,B (A, B > 0), uniform or point:V (0 ≤ V ≤ 1)")


def parse_turn_tokens(spec: str) -> tuple[int, int]:
    lo, _, hi = str(spec).partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        lo_i = hi_i = 0
    if not 1 <= lo_i <= hi_i:
        raise OptionError(f"turn tokens {spec!r} not understood; use LO-HI with 1 ≤ LO ≤ HI, e.g. 20-60, or one number")
    return lo_i, hi_i


class PromptStream:
    """A batch's prompts as tasks, drawn lazily in a fixed order: prompt i is the same for every
    allocator (common random numbers). `task.meta` holds its true success probability `v0`, its
    predictor noise `z` and `last_rate`, the success rate of `group_size` chains at an earlier visit
    (what Knapsack-style allocation reads; never charged)."""

    def __init__(self, cfg: SimConfig, group_size: int, seed: int, batch: int):
        self.cfg, self.group_size, self._tag = cfg, group_size, f"{seed}/{batch}"
        self._rng, self._items = random.Random(f"prompts/{seed}/{batch}"), []
        self.drawn = 0  # prompts handed out by `draw`

    def __getitem__(self, i: int) -> Task:
        while len(self._items) <= i:
            rng, k = self._rng, len(self._items)
            v0 = self.cfg.sample_v0(rng)
            z = rng.gauss(0.0, 1.0)
            last = sum(rng.random() < v0 for _ in range(self.group_size)) / self.group_size
            self._items.append(Task(f"sim/{self._tag}/{k}", f"simulated prompt {k}", (),
                                    {"v0": v0, "z": z, "last_rate": last}))
        return self._items[i]

    def take(self, start: int, n: int) -> list[Task]:
        return [self[i] for i in range(start, start + n)]

    def batch(self, n: int) -> list[Task]:
        """The step's batch: the first n prompts (`draw` hands out the ones after them)."""
        self.drawn = max(self.drawn, n)
        return self.take(0, n)

    def draw(self, n: int) -> list[Task]:
        """The next n prompts not handed out yet: pools and refills (`AllocationContext.draw`)."""
        out = self.take(self.drawn, n)
        self.drawn += n
        return out


@dataclass(frozen=True)
class Turn:
    """One generated turn: the success probability after it, its predictor noise, its tokens, and
    for the last turn of a trajectory its reward."""

    value: float
    z: float
    tokens: int
    done: bool
    reward: int | None


class World:
    """Samples trajectories from any prefix with one random stream."""

    def __init__(self, cfg: SimConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng

    def _next_value(self, v: float) -> float:
        s = self.cfg.turn_strength
        if s == 0 or v in (0.0, 1.0):
            return v
        if s == 1:
            return float(self.rng.random() < v)
        kappa = 1 / s - 1  # Beta(κv, κ(1−v)) has mean v and variance v(1−v)/(κ+1) = s·v(1−v)
        return self.rng.betavariate(kappa * v, kappa * (1 - v))

    def trajectory(self, value: float, depth: int) -> list[Turn]:
        """The turns below a prefix with success probability `value` after `depth` turns, to the end."""
        c, rng = self.cfg, self.rng
        if depth >= c.turns:
            raise ValueError(f"a prefix of {depth} turns is finished (T = {c.turns}); nothing can follow it")
        out = []
        while True:
            value = self._next_value(value)
            z = rng.gauss(0.0, 1.0)
            tokens = rng.randint(*c.turn_range)
            depth += 1
            done = depth >= c.turns or rng.random() < c.early_stop
            reward = int(rng.random() < value) if done else None
            out.append(Turn(value, z, tokens, done, reward))
            if done:
                return out
