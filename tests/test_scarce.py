"""The scarce-contrast testbed preset (configs/scarce.yaml, issue 18): it loads and validates, and the
world it builds has the intended difficulty structure. No training (bench/scarce_testbed.py measures)."""

from collections import Counter
from pathlib import Path

import pytest

from tracerl.config import load_config
from tracerl.envs import check_options, make_env
from tracerl.errors import OptionError
from tracerl.setup import build_env, preflight
from tracerl.sft import _demos

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs" / "scarce.yaml")


@pytest.fixture(scope="module")
def env(cfg):
    return build_env(cfg)


def test_preset_loads_and_validates(cfg):
    preflight(cfg)
    assert cfg.rollout.allocator == "uniform" and cfg.algo.advantage == "grpo"
    # cost as the quickstart's: same model, SFT and RL budget
    quick = load_config(REPO / "configs" / "quickstart.yaml")
    assert cfg.model == quick.model and cfg.trainer.steps == quick.trainer.steps
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (quick.rollout.prompts_per_step, quick.rollout.group_size)
    assert (cfg.sft.steps, cfg.sft.demos) == (quick.sft.steps, quick.sft.demos)


def test_pool_mixes_easy_and_hard(env):
    train = Counter(t.meta["hops"] for t in env.tasks("train"))
    assert set(train) == {1, 2, 3}
    n = sum(train.values())
    assert train[1] / n == pytest.approx(0.4, abs=0.02)  # easy
    assert train[2] / n == pytest.approx(0.1, abs=0.02)  # in between: a minority
    assert train[3] / n == pytest.approx(0.5, abs=0.02)  # hard, never demonstrated
    val = Counter(t.meta["hops"] for t in env.tasks("validation"))
    assert set(val) == {1, 2, 3} and val[3] >= 50  # EM by hops is measurable


def test_warm_start_demos_skip_hard_questions(cfg, env):
    demos = _demos(env, cfg)
    hops = Counter(task.meta["hops"] for task, _, _ in demos)
    assert 3 not in hops and hops[1] > 2 * hops[2] > 0
    assert sum(1 for task, turns, _ in demos if turns[-1].split("<answer>")[1].split("</answer>")[0] not in task.answers) == 0


def test_demo_max_hops_option():
    opts = dict(n_entities=120, train_size=100, validation_size=10, test_size=10, heldout_size=10)
    env = make_env("multihop", seed=0, max_turns=4, hop_mix={1: 0.5, 3: 0.5}, demo_max_hops=1, **opts)
    assert {t.meta["hops"] for t in env.tasks("train") if env.demo_task(t)} == {1}
    assert all(make_env("multihop", seed=0, max_turns=4, **opts).demo_task(t) for t in env.tasks("train"))
    with pytest.raises(OptionError, match="demo_max_hops"):
        check_options("multihop", {"hop_mix": {3: 1.0}, "demo_max_hops": 2}, 4)
    with pytest.raises(OptionError, match="demo_max_hops"):
        check_options("multihop", {"demo_max_hops": 0}, 4)
