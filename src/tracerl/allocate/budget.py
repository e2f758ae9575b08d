"""The step's generated-token budget, the meter that keeps every allocator within it, and the running
cost estimates carried across steps (docs/cost.md §5–§6).

Budget. With `rollout.token_budget` set, a step may generate `token_budget × B` tokens (B prompts in
the batch). Every allocator sends all its generation through a `Meter`, which runs the allocator's
jobs in priority order as waves and stops launching once the budget is met, so a step spends

    budget ≤ spent ≤ budget + (the longest trajectory of the last wave)

(DAPO excepted: it may stop below the budget once it holds B mixed groups or has run its rounds).
Waves run in parallel, so a wave of many trajectories could pass the budget by more than one of
them; a wave is therefore sized from the budget left and the step's measured trajectory lengths:
the largest prefix of the job list that passes the budget by more than its longest trajectory only
with probability ≈ 0.1 % (expected tokens + `SAFETY_Z` standard deviations, counting the trajectories'
spread and the error of the estimated mean lengths; see `Meter._fit`). The waves shrink quickly to one
or two trajectories. Before anything is measured in the step (and no running estimate
exists), the first wave is a pilot of B jobs. Without a budget the meter runs every job list as one
wave, exactly what the allocator asked for.

Tokens are measured on the trees (the turns each job attached below its node), not on the engine's
counters, so under torchrun, where `engine.cost` is per rank, every rank sees the same numbers and
takes the same decisions; in one process the two agree exactly. A job from the root is a bare chain
(Tree-GRPO's root draws and TRACE's root restarts included), any other a continuation.

Running estimates (`CostModel`): exponential moving averages over steps of the measured continuation
fraction f (mean tokens of a continuation / of a bare chain) and of the mean bare-chain tokens. They
live with the success predictor (`SuccessPredictor.costs`, saved in its checkpoint state) for the
allocators that use one, else with the trainer (`AllocationContext.costs`, saved in the trainer state),
so a resumed run continues with the same values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from tracerl.allocate.engine import continuation_flags
from tracerl.tree import RolloutTree

SAFETY_Z = 3.0  # a wave passes the budget left with probability ≈ 0.1 % (normal approximation)
MIN_CV = 0.25  # least coefficient of variation assumed for a trajectory's tokens (small samples)

# A job: (tree, node) to grow one trajectory from; the tree may be a callable that makes it, called
# only if the job is launched (a new bare rollout that the budget may never reach plants no tree).
Job = tuple["RolloutTree | Callable[[], RolloutTree]", int]


@dataclass
class CostModel:
    """Running (EMA) estimates across steps of f and of the mean bare-chain tokens; None = never measured."""

    f: float | None = None
    chain_tokens: float | None = None
    steps: int = 0  # steps that measured something

    def continuation_fraction(self, prior: float) -> float:
        """The running f, or `prior` (alloc.continuation_fraction) before any measurement."""
        return prior if self.f is None else self.f

    def observe(self, f: float | None, chain_tokens: float | None, weight: float, prior_f: float) -> None:
        """One step's measurements (None: not measured); the first f is blended with the prior."""
        if f is not None:
            self.f = (1 - weight) * self.continuation_fraction(prior_f) + weight * f
        if chain_tokens is not None:
            self.chain_tokens = chain_tokens if self.chain_tokens is None else \
                (1 - weight) * self.chain_tokens + weight * chain_tokens
        if f is not None or chain_tokens is not None:
            self.steps += 1

    def as_dict(self) -> dict[str, Any]:
        return {"f": self.f, "chain_tokens": self.chain_tokens, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "CostModel":
        d = d or {}
        return cls(d.get("f"), d.get("chain_tokens"), int(d.get("steps", 0)))


@runtime_checkable
class CarriesCosts(Protocol):
    """A predictor that carries the running cost estimates in its checkpointed state."""

    costs: CostModel


@dataclass
class _Stat:
    n: int = 0
    total: float = 0.0
    sq: float = 0.0

    def add(self, x: float) -> None:
        self.n, self.total, self.sq = self.n + 1, self.total + x, self.sq + x * x

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def var(self) -> float:
        return max(self.sq / self.n - self.mean ** 2, 0.0) * self.n / (self.n - 1)


@dataclass
class Meter:
    """Runs an allocator's jobs through the engine within the step budget (see the module doc)."""

    engine: Any  # a TreeEngine
    budget: int | None  # generated tokens the step may spend; None: no budget
    prompts: int  # B: the pilot wave's size
    costs: CostModel
    prior_f: float  # alloc.continuation_fraction: f before any measurement
    max_waves: int = 8  # rollout.max_budget_waves: top-up waves (and Tree-GRPO rounds past L) the budget may add
    ema: float = 0.3  # alloc.cost_ema: weight of one step's measurement in the running estimates
    spent: int = 0
    chains: _Stat = field(default_factory=_Stat)  # tokens of jobs from the root
    conts: _Stat = field(default_factory=_Stat)  # tokens of jobs from a prefix
    waves: int = 0  # generation waves run
    added_waves: int = 0  # top-up waves and rounds the budget added (at most max_waves)
    last_wave_max: int = 0  # longest trajectory of the last wave (the overshoot bound)

    # ------------------------------------------------------------------ state
    @property
    def met(self) -> bool:
        return self.budget is not None and self.spent >= self.budget

    @property
    def exhausted(self) -> bool:
        """No more spending: the budget is met, or the budget's waves are used up."""
        return self.met or (self.budget is not None and self.added_waves >= self.max_waves)

    @property
    def f(self) -> float:
        """f for planning: the running estimate (the prior before any)."""
        return self.costs.continuation_fraction(self.prior_f)

    def chain_estimate(self) -> tuple[float, float, float] | None:
        """(mean, variance, variance of the mean) of a bare chain's tokens: this step's measurement, else
        the running mean (taken as worth a pilot's B chains); None if nothing is known."""
        c = self.chains
        if c.n >= 2:
            var = max(c.var, (MIN_CV * c.mean) ** 2)
            return max(c.mean, 1.0), var, var / c.n
        mean = c.mean if c.n else self.costs.chain_tokens
        if mean is None:
            return None
        var = (mean / 2) ** 2
        return max(mean, 1.0), var, var / max(c.n, self.prompts, 1)

    def _estimates(self) -> dict[bool, tuple[float, float, float]] | None:
        """Per kind (True: a bare chain, False: a continuation from a prefix): (mean, variance, variance
        of the mean) of its tokens; a continuation is f × a chain until two were measured."""
        chain = self.chain_estimate()
        if chain is None:
            return None
        k = self.conts
        if k.n >= 2:
            var = max(k.var, (MIN_CV * k.mean) ** 2)
            cont = (max(k.mean, 1.0), var, var / k.n)
        else:
            f = self.f
            cont = (max(chain[0] * f, 1.0), chain[1] * f * f, chain[2] * f * f)
        return {True: chain, False: cont}

    # ------------------------------------------------------------------ running jobs
    def wave_size(self, nodes: Sequence[int]) -> int:
        """How many of these jobs (by their start nodes, in order) the next wave may launch."""
        if not nodes or self.exhausted:
            return 0
        if self.budget is None:
            return len(nodes)
        return self._fit(nodes, len(nodes))

    def _fit(self, nodes: Iterable[int], available: int) -> int:
        """The largest wave (a prefix of the jobs, at least one so the budget is always met) that passes the
        budget by more than its longest trajectory only with probability ≈ 0.1 %. That happens only if
        both (a) its first n − 1 jobs overrun what is left, and (b) its sum overruns left·n/(n − 1) (the
        longest is at least the mean); each bound is tested as expected tokens + SAFETY_Z standard
        deviations, which count each trajectory's spread and the error of the estimated means (shared
        by every job of a kind, so it grows with n, not with its root)."""
        est = self._estimates()
        if est is None:  # nothing known about trajectory lengths yet: a pilot
            return min(available, max(1, self.prompts))
        left = self.budget - self.spent
        mean = var = 0.0  # of the jobs taken so far
        count = {True: 0, False: 0}
        n = 1
        for k, node in enumerate(nodes):
            if k == available:
                break
            if k:  # may job k join (n = k + 1)? (a): jobs 0..k−1 fit; (b): jobs 0..k fit in left·(k+1)/k
                sd_a = math.sqrt(var + sum(count[c] ** 2 * est[c][2] for c in count))
                m, v, _ = est[node == 0]
                count[node == 0] += 1
                sd_b = math.sqrt(var + v + sum(count[c] ** 2 * est[c][2] for c in count))
                count[node == 0] -= 1
                if mean + SAFETY_Z * sd_a > left and mean + m + SAFETY_Z * sd_b > left * (k + 1) / k:
                    break
                n = k + 1
            m, v, _ = est[node == 0]
            mean, var = mean + m, var + v
            count[node == 0] += 1
        return min(n, available)

    def launch(self, jobs: Sequence[Job], continuation: bool | Sequence[bool] = False) -> list[int]:
        """One wave of exactly these jobs (one engine call, no budget check); returns each job's generated
        tokens. `continuation`: one flag for all jobs, or one per job (see `TreeEngine.grow`)."""
        if not jobs:
            return []
        jobs = [(t() if callable(t) else t, node) for t, node in jobs]
        depth = [t.nodes[node].depth for t, node in jobs]
        leaves = self.engine.grow(jobs, continuation)
        out = []
        for (t, node), d, leaf in zip(jobs, depth, leaves):
            tokens = sum(len(n.gen_ids) for n in t.path(leaf)[d + 1:])
            (self.chains if node == 0 else self.conts).add(tokens)
            out.append(tokens)
        self.spent += sum(out)
        self.waves += 1
        self.last_wave_max = max(out)
        return out

    def run(self, jobs: Sequence[Job], continuation: bool | Sequence[bool] = False,
            top_up: Callable[[int], list[Job]] | None = None) -> list[int]:
        """Jobs in priority order: all in one wave without a budget; with one, in waves sized by
        `wave_size` until they are done or the budget is met. Returns the generated tokens of the jobs
        launched (a prefix of `jobs`; the rest were not run). `continuation`: one flag, or one per job.

        `top_up` (with a budget; `make` of `fill`): once the jobs left fit in one wave with room to spare,
        that wave takes as many top-up chains as the room allows, and `fill` waves follow until the budget
        is met, so the plan's last wave and the budget's first top-up share one generation call."""
        flags = continuation_flags(continuation, len(jobs))
        out: list[int] = []
        while len(out) < len(jobs):
            rest = jobs[len(out):]
            n = self.wave_size([node for _, node in rest])
            if not n:
                break
            wave, wave_flags = list(rest[:n]), flags[len(out):len(out) + n]
            if top_up is not None and self.budget is not None and n == len(rest):
                left = self.budget - self.spent  # > 0: the budget is not met, or wave_size would be 0
                room = self._fit(itertools.chain((node for _, node in rest), itertools.repeat(0, left)), n + left) - n
                extra = top_up(room) if room > 0 else []
                wave, wave_flags = wave + extra, wave_flags + [False] * len(extra)
            out += self.launch(wave, wave_flags)[:n]
        if top_up is not None:
            self.fill(top_up)
        return out

    def fill(self, make: Callable[[int], list[Job]], continuation: bool = False) -> int:
        """With a budget: waves of bare chains from `make(n)` (n jobs from the root, fewer if it has no
        more) until the budget is met or its waves are used up. Returns the chains run."""
        done = 0
        while self.budget is not None and not self.exhausted:
            left = self.budget - self.spent
            jobs = make(self._fit(itertools.repeat(0, left), left))  # at most one chain per token left
            if not jobs:
                break
            done += len(self.launch(jobs, continuation))
            self.added_waves += 1
        return done

    # ------------------------------------------------------------------ end of step
    def step_f(self) -> float | None:
        """f measured this step (continuations from a prefix / bare chains), None without both."""
        if not self.conts.n or not self.chains.n or not self.chains.total:
            return None
        return self.conts.mean / self.chains.mean

    def finish(self, metrics: dict[str, float]) -> None:
        """Fold this step's measurements into the running estimates; add the budget's metrics."""
        self.costs.observe(self.step_f(), self.chains.mean if self.chains.n else None, self.ema, self.prior_f)
        metrics.update(gen_waves=float(self.waves), budget_waves=float(self.added_waves), f_running=self.f)
        if self.budget is not None:
            metrics.update(budget_overshoot=float(self.spent - self.budget),
                           budget_last_wave_max=float(self.last_wave_max))
