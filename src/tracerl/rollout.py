"""The agent loop: model turns, tool observations, masks and cost counters.

This is the one place where text becomes tokens for training. A trajectory's `token_ids` are the
prompt ids, then each turn's *sampled* ids, then each observation's ids; the trainer trains on
exactly these ids (loss mask 1 on sampled tokens only), so there is no re-tokenisation drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tracerl.backends.hf import HFPolicy, SamplingParams
from tracerl.errors import EnvironmentStepError, TracerlError
from tracerl.envs.base import Environment, StepResult, Task


class PromptError(TracerlError):
    """The prompt cannot be built (e.g. the tokenizer has no chat template)."""


def encode_prompt(tokenizer, env: Environment, task: Task, chat_template: str = "auto") -> list[int]:
    """Prompt token ids: the chat template with a generation prompt, or plain text when disabled."""
    system, user = env.system_prompt(), env.user_prompt(task)
    if chat_template == "none":
        text = (system + "\n\n" if system else "") + user + "\n"
        return tokenizer.encode(text, add_special_tokens=False)
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "set model.chat_template=none to use plain-text prompts"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Trajectory:
    """One finished (or running) episode, as the exact token ids the model saw and produced."""

    task: Task
    group: int  # index of the prompt group in the step
    token_ids: list[int]
    loss_mask: list[int]  # 1 = sampled by the policy (trained on), 0 = prompt / observation
    logprobs: list[float]  # sampling-time log-probs, 0.0 where loss_mask == 0
    prompt_len: int
    state: dict[str, Any]
    turns: list[dict[str, Any]] = field(default_factory=list)  # text, action, format_error, observation
    done: bool = False
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # final em, f1, truncated ...

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def format_errors(self) -> int:
        return sum(1 for t in self.turns if t.get("format_error"))

    @property
    def tool_calls(self) -> int:
        return sum(1 for t in self.turns if t.get("tool_call"))

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.token_ids[self.prompt_len:], skip_special_tokens=False)


@dataclass
class RolloutCost:
    gen_tokens: int = 0
    prefill_tokens: int = 0
    tool_calls: int = 0
    trajectories: int = 0

    def add(self, other: "RolloutCost") -> None:
        self.gen_tokens += other.gen_tokens
        self.prefill_tokens += other.prefill_tokens
        self.tool_calls += other.tool_calls
        self.trajectories += other.trajectories


def _apply_turn(traj: Trajectory, tokenizer, env: Environment, gen_ids, gen_logprobs, turn_text, truncated,
                max_context: int) -> StepResult:
    """Append one model turn (and its observation) to a trajectory; the env decides what follows."""
    traj.token_ids += gen_ids
    traj.loss_mask += [1] * len(gen_ids)
    traj.logprobs += gen_logprobs
    try:
        traj.state, res = env.step(traj.state, turn_text, truncated=truncated)
    except Exception as e:  # a bug in the environment or its reward function, not in model output
        raise EnvironmentStepError(
            f"environment {env.name!r} raised {type(e).__name__}: {e} (task {traj.task.id}, turn {len(traj.turns) + 1})"
        ) from e
    turn = {"text": turn_text, "action": res.info.get("action"), "format_error": res.info.get("format_error"),
            "tool_call": bool(res.info.get("tool_call")), "observation": res.observation}
    traj.turns.append(turn)
    if not res.done and res.observation:
        obs_ids = tokenizer.encode(res.observation, add_special_tokens=False)
        traj.token_ids += obs_ids
        traj.loss_mask += [0] * len(obs_ids)
        traj.logprobs += [0.0] * len(obs_ids)
        if len(traj.token_ids) >= max_context:  # no room for another turn: a failure, never a crash
            res = StepResult(observation=None, done=True, reward=0.0, info={**res.info, "truncated": True, "context_full": True})
    if res.done:
        traj.done, traj.reward = True, float(res.reward)
        traj.info = dict(res.info)
    return res


def replay_turns(tokenizer, env: Environment, task: Task, turn_texts: list[str], chat_template: str = "auto",
                 max_context: int = 1 << 30) -> Trajectory:
    """Build a trajectory from given turn texts (SFT demonstrations) through the same token path."""
    prompt = encode_prompt(tokenizer, env, task, chat_template)
    traj = Trajectory(task, 0, list(prompt), [0] * len(prompt), [0.0] * len(prompt), len(prompt), env.initial_state(task))
    for text in turn_texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        _apply_turn(traj, tokenizer, env, ids, [0.0] * len(ids), text, False, max_context)
        if traj.done:
            break
    return traj


def run_chains(
    policy: HFPolicy,
    env: Environment,
    tasks: list[Task],
    group_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    chat_template: str = "auto",
    batch_size: int = 64,
) -> tuple[list[Trajectory], RolloutCost]:
    """Sample `group_size` independent chains per task, all turns batched across trajectories."""
    tok = policy.tokenizer
    params = SamplingParams(params.max_new_tokens, params.temperature, params.top_p,
                            tuple(params.stop_strings) or tuple(env.stop_strings))
    trajs: list[Trajectory] = []
    for g, task in enumerate(tasks):
        prompt = encode_prompt(tok, env, task, chat_template)
        for _ in range(group_size):
            trajs.append(Trajectory(task, g, list(prompt), [0] * len(prompt), [0.0] * len(prompt), len(prompt),
                                    env.initial_state(task)))
    cost = RolloutCost(trajectories=len(trajs))
    for t in trajs:
        if len(t.token_ids) >= policy.max_context:  # the prompt alone fills the context
            t.done, t.info = True, {"truncated": True, "context_full": True}
    active = [t for t in trajs if not t.done]
    for _ in range(env.max_turns):
        if not active:
            break
        for start in range(0, len(active), batch_size):
            chunk = active[start:start + batch_size]
            gens, prefill = policy.generate([t.token_ids for t in chunk], params, generator)
            cost.prefill_tokens += prefill
            for t, gen in zip(chunk, gens):
                cost.gen_tokens += len(gen.token_ids)
                text = policy.decode(gen.token_ids)
                res = _apply_turn(t, tok, env, gen.token_ids, gen.logprobs, text, gen.stopped == "length",
                                  policy.max_context)
                cost.tool_calls += int(bool(res.info.get("tool_call")))
        active = [t for t in active if not t.done]
    for t in active:  # an environment that did not end its episodes at max_turns: count as failures
        t.done, t.reward, t.info = True, 0.0, {**t.info, "truncated": True}
    return trajs, cost
