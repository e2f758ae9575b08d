"""The rollout engine: exact token layout, observation masking, cost counters, bad input."""

import pytest
import torch

from tracerl.backends.hf import SamplingParams
from tracerl.errors import EnvironmentStepError
from tracerl.rollout import PromptError, encode_prompt, replay_turns, run_chains


def test_observation_tokens_are_masked_and_exact(tiny_policy, small_env):
    tok = tiny_policy.tokenizer
    task = small_env.tasks("train")[0]
    turns = small_env.oracle_turns(task, __import__("random").Random(0), {})
    traj = replay_turns(tok, small_env, task, turns)
    assert traj.done and traj.reward == 1.0
    prompt = encode_prompt(tok, small_env, task)
    assert traj.token_ids[: len(prompt)] == prompt and traj.prompt_len == len(prompt)
    # Rebuild the expected layout piece by piece: turn ids (mask 1) then observation ids (mask 0).
    ids, mask = list(prompt), [0] * len(prompt)
    for turn in traj.turns:
        t = tok.encode(turn["text"], add_special_tokens=False)
        ids += t
        mask += [1] * len(t)
        if turn["observation"]:
            o = tok.encode(turn["observation"], add_special_tokens=False)
            ids += o
            mask += [0] * len(o)
    assert traj.token_ids == ids and traj.loss_mask == mask
    trained = tok.decode([i for i, m in zip(traj.token_ids, traj.loss_mask) if m])
    assert "<information>" not in trained and "Doc 1" not in trained
    assert sum(traj.loss_mask) == sum(len(tok.encode(t, add_special_tokens=False)) for t in turns)


def test_run_chains_shapes_costs_and_masks(tiny_policy, small_env):
    tasks = small_env.tasks("train")[:3]
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    trajs, cost = run_chains(tiny_policy, small_env, tasks, 2, params, torch.Generator().manual_seed(0), batch_size=4)
    assert len(trajs) == 6 and cost.trajectories == 6
    assert [t.group for t in trajs] == [0, 0, 1, 1, 2, 2]
    assert all(t.done for t in trajs)
    assert cost.gen_tokens == sum(sum(t.loss_mask) for t in trajs)
    assert cost.tool_calls == sum(t.tool_calls for t in trajs)
    for t in trajs:
        assert len(t.token_ids) == len(t.loss_mask) == len(t.logprobs)
        assert all(lp == 0.0 for lp, m in zip(t.logprobs, t.loss_mask) if not m)
        assert 1 <= t.num_turns <= small_env.max_turns
        assert t.reward in (0.0, 1.0)


def test_same_seed_same_rollouts(tiny_policy, small_env):
    tasks = small_env.tasks("train")[:2]
    params = SamplingParams(max_new_tokens=16)
    a, _ = run_chains(tiny_policy, small_env, tasks, 2, params, torch.Generator().manual_seed(3))
    b, _ = run_chains(tiny_policy, small_env, tasks, 2, params, torch.Generator().manual_seed(3))
    assert [t.token_ids for t in a] == [t.token_ids for t in b]


class _RaisingEnv:
    """Wraps an environment whose reward function fails."""

    def __init__(self, env):
        self._env = env
        self.name, self.max_turns, self.stop_strings = "broken", env.max_turns, env.stop_strings

    def __getattr__(self, k):
        return getattr(self._env, k)

    def step(self, state, text, truncated=False):
        raise ZeroDivisionError("reward blew up")


def test_a_raising_reward_function_is_one_clear_error(tiny_policy, small_env):
    env = _RaisingEnv(small_env)
    with pytest.raises(EnvironmentStepError) as e:
        run_chains(tiny_policy, env, small_env.tasks("train")[:1], 1, SamplingParams(max_new_tokens=4))
    msg = str(e.value)
    assert "\n" not in msg and "broken" in msg and "ZeroDivisionError" in msg and "turn 1" in msg


def test_tokenizer_without_chat_template(tiny_policy, small_env):
    tok = tiny_policy.tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(PromptError, match="no chat template.*model.chat_template=none"):
            encode_prompt(tok, small_env, small_env.tasks("train")[0])
        plain = encode_prompt(tok, small_env, small_env.tasks("train")[0], chat_template="none")
        assert small_env.tasks("train")[0].question in tok.decode(plain)
    finally:
        tok.chat_template = saved
