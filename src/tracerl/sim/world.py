"""The simulated world: prompts as random trees whose success probability is known at every prefix.

A prompt has a difficulty v0 = V(x). A turn moves the success probability as a martingale: given
V(H_t) = v, the next value V(H_{t+1}) is drawn from a Beta with mean v and variance s·v(1 − v), where
s = `turn_strength` ∈ [0, 1] is the share of the outcome variance left at H_t that one turn resolves
(s = 0: turns reveal nothing, s = 1: the first turn decides the outcome). The expectation is preserved
and every value stays a probability. After each turn but the last the trajectory ends with
probability `early_stop`; at a leaf R ~ Bernoulli(V(leaf)). So V(H_t) = P(R = 1 | H_t) exactly.

Cost is in token units like real training: each turn costs a uniform integer in `turn_tokens`; a
continuation from a prefix at depth t pays only the turns it generates. The root costs nothing.

The predictor sees V through noise: Ṽ = sigmoid(logit(V) + σ·ε), ε ~ N(0, 1) drawn once per node
(the same node always gets the same prediction); `oracle` gives Ṽ = V.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields

from tracerl.errors import OptionError


@dataclass
class SimConfig:
    prompts: int = 64  # B: prompts per batch for uniform, tree_grpo, dapo (first round), knapsack, pcl
    difficulty: str = "beta:0.5,0.5"  # v0 distribution: beta:A,B | uniform | point:V
    turns: int = 3  # T: turns of a full trajectory
    turn_tokens: str = "20-60"  # generated tokens of one turn: LO-HI (uniform integer) or N
    turn_strength: float = 0.3  # s: share of the remaining outcome variance one turn resolves
    early_stop: float = 0.0  # chance a trajectory ends after each turn but the last
    group_size: int = 8  # G: chains per prompt (uniform, dapo, pcl); sets the default budget
    trees: int = 2  # M: Tree-GRPO trees per prompt
    expansions: int = 2  # N: continuations per seed chain per round (tree_grpo) / per bare rollout (trace)
    pool_factor: int = 4  # PCL and TRACE score a pool of pool_factor·B prompts
    predictor_noise: float = 0.5  # σ on the logit of the predicted success probability
    oracle: bool = False  # the predictor returns the true V
    budget: int = 0  # generated tokens per batch (0: G chains for each of B prompts, in expectation)
    root_cap: int = 16  # Stage 1 / knapsack cap per prompt (METHODS §4.2)
    anchor_cap: int = 4  # Stage 2 cap per prefix (§4.3)
    explore: float = 0.1  # TRACE: 2⌊εM/2⌋ rollouts go to random pool prompts, 2 each (§4.2)
    root_solver: str = "dp"  # TRACE Stage 1 solver: dp | greedy
    rounds: int = 2  # TRACE Stage 2 rounds: the continuation budget in R slices, anchors re-scored after each
    stage2_root: bool = True  # TRACE Stage 2 may also restart a prompt from its root (a new bare chain)
    dapo_rounds: int = 3  # DAPO: generation rounds at most
    continuation_fraction: float = 0.5  # f assumed by TRACE to size its root budget M = C / (1 + N·f)

    def __post_init__(self) -> None:
        self.turn_range = parse_turn_tokens(self.turn_tokens)
        self.sample_v0 = parse_difficulty(self.difficulty)
        checks = {
            "prompts ≥ 1": self.prompts >= 1, "turns ≥ 1": self.turns >= 1,
            "0 ≤ turn_strength ≤ 1": 0 <= self.turn_strength <= 1, "0 ≤ early_stop < 1": 0 <= self.early_stop < 1,
            "group_size ≥ 1": self.group_size >= 1, "trees ≥ 1": self.trees >= 1, "expansions ≥ 0": self.expansions >= 0,
            "pool_factor ≥ 1": self.pool_factor >= 1, "predictor_noise ≥ 0": self.predictor_noise >= 0,
            "budget ≥ 0": self.budget >= 0, "root_cap ≥ 2": self.root_cap >= 2, "anchor_cap ≥ 0": self.anchor_cap >= 0,
            "0 ≤ explore < 1": 0 <= self.explore < 1, "root_solver dp or greedy": self.root_solver in ("dp", "greedy"),
            "dapo_rounds ≥ 1": self.dapo_rounds >= 1, "rounds ≥ 1": self.rounds >= 1, "continuation_fraction > 0": self.continuation_fraction > 0,
        }
        bad = [msg for msg, ok in checks.items() if not ok]
        if bad:
            raise OptionError("simulator options out of range: need " + "; ".join(bad))

    def expected_turns(self) -> float:
        keep = 1 - self.early_stop
        return float(self.turns) if self.early_stop == 0 else (1 - keep ** self.turns) / self.early_stop

    def expected_chain_tokens(self) -> float:
        return self.expected_turns() * sum(self.turn_range) / 2

    def token_budget(self) -> int:
        """Generated tokens per batch: `budget`, or G chains for each of the B prompts in expectation."""
        return self.budget or round(self.prompts * self.group_size * self.expected_chain_tokens())

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


def _logit(v: float) -> float:
    v = min(max(v, 1e-6), 1 - 1e-6)
    return math.log(v / (1 - v))


def predict(v: float, z: float, noise: float, oracle: bool) -> float:
    return v if oracle else 1 / (1 + math.exp(-(_logit(v) + noise * z)))


@dataclass(frozen=True)
class SimPrompt:
    index: int  # position in the batch's prompt stream
    v0: float  # true success probability V(x)
    predicted: float  # the predictor's Ṽ(x)
    last_rate: float  # empirical success rate of its last visit (G chains, an earlier epoch: not charged)


class PromptStream:
    """The batch's prompts, drawn lazily in a fixed order: prompt i is the same for every allocator."""

    def __init__(self, cfg: SimConfig, seed: int, batch: int):
        self.cfg, self._rng, self._items = cfg, random.Random(f"prompts/{seed}/{batch}"), []

    def __getitem__(self, i: int) -> SimPrompt:
        while len(self._items) <= i:
            c, rng = self.cfg, self._rng
            v0 = c.sample_v0(rng)
            z = rng.gauss(0.0, 1.0)
            last = sum(rng.random() < v0 for _ in range(c.group_size)) / c.group_size
            self._items.append(SimPrompt(len(self._items), v0, predict(v0, z, c.predictor_noise, c.oracle), last))
        return self._items[i]

    def take(self, start: int, n: int) -> list[SimPrompt]:
        return [self[i] for i in range(start, start + n)]


class SimTree:
    """One prompt's rollouts: node 0 is the root; parallel lists hold each node's parent, depth, true
    value V, predicted value Ṽ, generated tokens, leaf flag, reward and `branch` (which Tree-GRPO tree,
    or which chain from the root, it belongs to: continuations inherit their anchor's branch).
    Children always have larger ids than their parent."""

    def __init__(self, prompt: SimPrompt):
        self.prompt, self.kept = prompt, True  # DAPO marks dropped groups kept = False
        self.parent, self.depth, self.value = [-1], [0], [prompt.v0]
        self.pred, self.tokens, self.done = [prompt.predicted], [0], [False]
        self.reward: list[int | None] = [None]
        self.branch = [-1]
        self.root_chains = 0  # trajectories started at the root

    def __len__(self) -> int:
        return len(self.parent)

    def add(self, parent: int, value: float, pred: float, tokens: int, done: bool, reward: int | None,
            branch: int) -> int:
        self.parent.append(parent)
        self.root_chains += parent == 0
        self.depth.append(self.depth[parent] + 1)
        for lst, x in ((self.value, value), (self.pred, pred), (self.tokens, tokens), (self.done, done),
                       (self.reward, reward), (self.branch, branch)):
            lst.append(x)
        return len(self.parent) - 1

    def anchors(self, branch: int | None = None) -> list[int]:
        """The root and every non-leaf node (of one branch, if given)."""
        return [i for i in range(len(self))
                if not self.done[i] and (i == 0 or branch is None or self.branch[i] == branch)]

    def leaves(self) -> list[int]:
        return [i for i in range(len(self)) if self.done[i]]

    def total_tokens(self) -> int:
        return sum(self.tokens)

    def path(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parent[node]
        return out[::-1]


class World:
    """Generates trajectories from any node of a SimTree with one random stream."""

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

    def continue_from(self, tree: SimTree, node: int, branch: int) -> tuple[int, int]:
        """Sample turns below `node` to the end of the trajectory; returns (leaf id, tokens generated)."""
        c, rng = self.cfg, self.rng
        if tree.done[node]:
            raise ValueError(f"node {node} is a leaf; continuations start from the root or a non-leaf node")
        cost = 0
        while True:
            v = self._next_value(tree.value[node])
            pred = predict(v, rng.gauss(0.0, 1.0), c.predictor_noise, c.oracle)
            tokens = rng.randint(*c.turn_range)
            done = tree.depth[node] + 1 >= c.turns or rng.random() < c.early_stop
            reward = int(rng.random() < v) if done else None
            node = tree.add(node, v, pred, tokens, done, reward, branch)
            cost += tokens
            if done:
                return node, cost


class TokenBudget:
    """The one overshoot rule every allocator follows: a trajectory (chain or continuation) may start
    only while the tokens spent are below the limit, and then runs to its end and is charged in full.
    Hence spent < limit + the cost of the last trajectory ≤ limit + T·max turn tokens."""

    def __init__(self, limit: int, world: World):
        self.limit, self.world = limit, world
        self.spent = self.jobs = self.last_cost = 0

    @property
    def open(self) -> bool:
        return self.spent < self.limit

    def grow(self, tree: SimTree, node: int, branch: int) -> int | None:
        """Generate one trajectory below `node` if the budget is open; returns its leaf or None."""
        if not self.open:
            return None
        leaf, cost = self.world.continue_from(tree, node, branch)
        self.spent += cost
        self.jobs += 1
        self.last_cost = cost
        return leaf
