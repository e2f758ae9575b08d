"""Which methods a config names, and whether they fit together — asked of the registries' traits.

`config.py` validates types and ranges without knowing any method; this module, above both the config
and the registries, checks the names and their combinations before a command builds anything. A new
estimator or allocator declares its traits where it is registered and needs no change here.
"""

from __future__ import annotations

from tracerl.algos import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, SAMPLER_CORRECTIONS
from tracerl.allocate import ALLOCATORS
from tracerl.config import Config, ConfigError
from tracerl.credit import CREDIT

NAMED = (("rollout.allocator", ALLOCATORS), ("algo.advantage", ADVANTAGES), ("algo.policy_loss", POLICY_LOSSES),
         ("algo.aggregation", AGGREGATIONS), ("algo.kl_estimator", KL_ESTIMATORS), ("credit.name", CREDIT),
         ("algo.sampler_correction", SAMPLER_CORRECTIONS))


def check_methods(cfg: Config) -> None:
    """One-line ConfigError for an unknown method name or a combination that cannot work."""
    for key, registry in NAMED:
        section, field = key.split(".")
        name = getattr(getattr(cfg, section), field)
        if name not in registry:
            raise ConfigError(f"config key '{key}': unknown name {name!r}; valid: {', '.join(registry.names())}")
    adv, alloc = cfg.algo.advantage, cfg.rollout.allocator
    if ADVANTAGES.trait(adv, "needs_trees") and not ALLOCATORS.trait(alloc, "makes_trees"):
        tree_allocators = ", ".join(ALLOCATORS.having(makes_trees=True))
        chain_estimators = ", ".join(ADVANTAGES.having(needs_trees=False))
        raise ConfigError(f"algo.advantage={adv} needs tree rollouts; set rollout.allocator to one of "
                          f"{tree_allocators} (or use {chain_estimators})")
    check = ALLOCATORS.trait(alloc, "check")
    if check is not None:
        problem = check(cfg.rollout, cfg.alloc)
        if problem:
            raise ConfigError(problem)
