"""The agent loop: model turns, tool observations, masks and cost counters.

This is the one place where text becomes tokens for training. A trajectory's `token_ids` are the
prompt ids, then each turn's *sampled* ids, then each observation's ids; the trainer trains on
exactly these ids (loss mask 1 on sampled tokens only), so there is no re-tokenisation drift.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tracerl.allocate.engine import RolloutCost, continuation_flags, trees_like  # the cost meter lives with the engine interface
from tracerl.backends.base import GenerationBackend, HiddenStates, SamplingParams
from tracerl.errors import EnvironmentStepError, TracerlError
from tracerl.envs.base import Environment, StepResult, Task
from tracerl.tree import RolloutTree, TurnRecord


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
    turns: list[dict[str, Any]] = field(default_factory=list)  # text, action, format_error, observation, span
    turn_states: list[dict[str, Any]] = field(default_factory=list)  # environment state after each turn
    done: bool = False
    reward: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # final em, f1, truncated ...
    tree: RolloutTree | None = None  # the tree this leaf belongs to (tree rollouts)
    node: int = -1  # its leaf node id in that tree
    # run_turns(capture_hidden=True): turns done -> last-layer hidden state at the prefix's last token
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

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


def _apply_turn(traj: Trajectory, tokenizer, env: Environment, gen_ids, gen_logprobs, turn_text, truncated,
                max_context: int) -> StepResult:
    """Append one model turn (and its observation) to a trajectory; the env decides what follows."""
    start = len(traj.token_ids)
    traj.token_ids += gen_ids
    traj.loss_mask += [1] * len(gen_ids)
    traj.logprobs += gen_logprobs
    try:
        traj.state, res = env.step(traj.state, turn_text, truncated=truncated)
    except Exception as e:  # a bug in the environment or its reward function, not in model output
        raise EnvironmentStepError(
            f"environment {env.name!r} raised {type(e).__name__}: {e} (task {traj.task.id}, turn {len(traj.turns) + 1})"
        ) from e
    # cut: generation hit the turn's token cap; span: [turn start, end of the sampled tokens, end of the
    # observation tokens) in token_ids
    turn = {"text": turn_text, "action": res.info.get("action"), "format_error": res.info.get("format_error"),
            "tool_call": bool(res.info.get("tool_call")), "observation": res.observation, "cut": bool(truncated),
            "span": [start, len(traj.token_ids), len(traj.token_ids)]}
    traj.turns.append(turn)
    traj.turn_states.append(traj.state)
    if not res.done and res.observation:
        obs_ids = tokenizer.encode(res.observation, add_special_tokens=False)
        traj.token_ids += obs_ids
        traj.loss_mask += [0] * len(obs_ids)
        traj.logprobs += [0.0] * len(obs_ids)
        turn["span"][2] = len(traj.token_ids)
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


def new_trajectory(task: Task, group: int, prompt_ids: list[int], state: dict[str, Any]) -> Trajectory:
    return Trajectory(task, group, list(prompt_ids), [0] * len(prompt_ids), [0.0] * len(prompt_ids), len(prompt_ids),
                      state)


def turn_params(params: SamplingParams, env: Environment) -> SamplingParams:
    """The sampling parameters of one turn: the environment's stop strings unless given."""
    return SamplingParams(params.max_new_tokens, params.temperature, params.top_p,
                          tuple(params.stop_strings) or tuple(env.stop_strings))


def run_turns(policy: GenerationBackend, env: Environment, trajs: list[Trajectory], params: SamplingParams,
              generator: torch.Generator | None = None, batch_size: int = 64,
              capture_hidden: bool = False, features: HiddenStates | None = None) -> RolloutCost:
    """Continue every unfinished trajectory to its end, all turns batched across trajectories.

    Trajectories may start anywhere: at their prompt, or at a restored prefix (a tree node), in which
    case the environment state they carry decides how many turns remain. Rows with identical token
    prefixes in one generation call share their prefill (see `HFPolicy.generate`). With
    `capture_hidden`, each turn's prefill also leaves the prefix's last-layer hidden state in
    `traj.hidden[turns done]` (no extra forward) — or, for a backend that does not return hidden states
    (an inference engine), a prefill-only pass of `features` (the trainer's model) over the chunk's
    prefixes does, charged to the prefill counters."""
    tok = policy.tokenizer
    params = turn_params(params, env)
    cost = RolloutCost()
    for t in trajs:
        if not t.done and len(t.token_ids) >= policy.max_context:  # the prompt alone fills the context
            t.done, t.info = True, {"truncated": True, "context_full": True}
    active = [t for t in trajs if not t.done]
    for _ in range(env.max_turns):
        if not active:
            break
        for start in range(0, len(active), batch_size):
            chunk = active[start:start + batch_size]
            prompts = [t.token_ids for t in chunk]
            if capture_hidden and not policy.returns_hidden:
                if features is None:
                    raise ValueError("capture_hidden with a backend that returns no hidden states needs `features`")
                states, stats = features.prefix_hidden(prompts, batch_size)
                cost.prefill_tokens += stats.computed
                cost.prefill_saved += stats.saved
                for t, h in zip(chunk, states):
                    t.hidden[len(t.turns)] = h
            if capture_hidden and policy.returns_hidden:
                gens, prefill = policy.generate(prompts, params, generator, return_hidden=True)
            else:
                gens, prefill = policy.generate(prompts, params, generator)
            cost.prefill_tokens += prefill.computed
            cost.prefill_saved += prefill.saved
            for t, gen in zip(chunk, gens):
                if gen.prefix_hidden is not None:
                    t.hidden[len(t.turns)] = gen.prefix_hidden
                cost.gen_tokens += len(gen.token_ids)
                text = policy.decode(gen.token_ids)
                res = _apply_turn(t, tok, env, gen.token_ids, gen.logprobs, text, gen.stopped == "length",
                                  policy.max_context)
                cost.tool_calls += int(bool(res.info.get("tool_call")))
        active = [t for t in active if not t.done]
    for t in active:  # an environment that did not end its episodes at max_turns: count as failures
        t.done, t.reward, t.info = True, 0.0, {**t.info, "truncated": True}
    return cost


def run_chains(
    policy: GenerationBackend,
    env: Environment,
    tasks: list[Task],
    group_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    chat_template: str = "auto",
    batch_size: int = 64,
) -> tuple[list[Trajectory], RolloutCost]:
    """Sample `group_size` independent chains per task, all turns batched across trajectories."""
    trajs: list[Trajectory] = []
    for g, task in enumerate(tasks):
        prompt = encode_prompt(policy.tokenizer, env, task, chat_template)
        trajs += [new_trajectory(task, g, prompt, env.initial_state(task)) for _ in range(group_size)]
    cost = run_turns(policy, env, trajs, params, generator, batch_size)
    cost.trajectories = len(trajs)
    return trajs, cost


# ---------------------------------------------------------------------------------------------------
# Trees: the engine that executes an allocation plan (which node to continue from, how many times)


def restore(tree: RolloutTree, node_id: int) -> Trajectory:
    """A trajectory positioned at a tree node: its exact token prefix (observations included),
    loss mask, log-probs, turns and the environment state saved after the node."""
    ids, mask, logp = tree.prefix(node_id)
    node = tree.nodes[node_id]
    traj = Trajectory(tree.task, tree.group, ids, mask, logp, tree.prompt_len, copy.deepcopy(node.state))
    traj.turns = tree.turns(node_id)
    traj.turn_states = [n.state for n in tree.path(node_id)[1:]]
    return traj


def turn_records(traj: Trajectory, start_turn: int) -> list[TurnRecord]:
    """The turns of `traj` from `start_turn` on, cut into tree-node records by their token spans."""
    out = []
    for turn, state in zip(traj.turns[start_turn:], traj.turn_states[start_turn:]):
        a, b, c = turn["span"]
        out.append(TurnRecord(traj.token_ids[a:b], traj.logprobs[a:b], traj.token_ids[b:c],
                              {k: v for k, v in turn.items() if k != "span"}, state))
    return out


class RolloutEngine:
    """Grows rollout trees for a step: seed chains from roots and continuations from any
    non-leaf node, batched across all jobs of a call, with measured cost (`self.cost`).

    Branches from the same node share their token prefix exactly and are sent in one generation call,
    so the backend prefills it once (HF: copies its KV cache to each branch; vLLM: its prefix cache) —
    `prefill_saved` counts what that avoided.

    With `capture_hidden`, every node a generation starts from gets the policy's last-layer hidden
    state at its last token in `tree.hidden[node id]` (features of the success predictor; in memory
    only), taken from the prefill the generation runs anyway when the backend returns hidden states,
    otherwise from a prefill-only pass of `features` (the trainer's model)."""

    def __init__(self, policy: GenerationBackend, env: Environment, params: SamplingParams,
                 generator: torch.Generator | None = None, chat_template: str = "auto", batch_size: int = 64,
                 capture_hidden: bool = False, features: HiddenStates | None = None):
        self.policy, self.env, self.params = policy, env, params
        self.generator, self.chat_template, self.batch_size = generator, chat_template, batch_size
        self.capture_hidden = capture_hidden
        self.features = features if features is not None else (policy if policy.returns_hidden else None)
        self.cost = RolloutCost()

    def plant(self, tasks: list[Task], trees_per_prompt: int | list[int] = 1, first_group: int = 0) -> list[RolloutTree]:
        """Empty trees (roots only): `trees_per_prompt` per task (one count, or one per task), grouped
        by task; task k gets group id `first_group + k` and tree indices 0, 1, ..."""
        counts = trees_per_prompt if isinstance(trees_per_prompt, list) else [trees_per_prompt] * len(tasks)
        trees = []
        for g, (task, m) in enumerate(zip(tasks, counts)):
            prompt = encode_prompt(self.policy.tokenizer, self.env, task, self.chat_template)
            trees += [RolloutTree(task, first_group + g, j, prompt, self.env.initial_state(task)) for j in range(m)]
        return trees

    def more_trees(self, like: RolloutTree, n: int, first_index: int) -> list[RolloutTree]:
        """n more empty trees of the same prompt and group (indices first_index, ...), sharing the root's
        hidden state if `like` has one."""
        return trees_like(like, n, first_index)

    def root_hidden(self, trees: list[RolloutTree]) -> None:
        """A prefill-only pass over the roots (identical prompts once) that fills `tree.hidden[0]`;
        charged to `prefill_tokens` / `prefill_saved` like any prefill."""
        todo = [t for t in trees if 0 not in t.hidden]
        if not todo:
            return
        states, stats = self.features.prefix_hidden([t.root.obs_ids for t in todo], self.batch_size)
        for t, h in zip(todo, states):
            t.hidden[0] = h
        self.cost.prefill_tokens += stats.computed
        self.cost.prefill_saved += stats.saved

    def grow(self, jobs: list[tuple[RolloutTree, int]], continuation: bool | Sequence[bool] = False) -> list[int]:
        """Run one trajectory per (tree, node) job to its end and hang it below the node, all jobs in one
        batched generation.

        Returns each job's new leaf id. `continuation` (one flag, or one per job) marks expansions
        (counted for the measured continuation cost fraction f)."""
        flags = continuation_flags(continuation, len(jobs))
        # a deterministic order that puts branches of one node next to each other (one shared prefill)
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i][0].group, jobs[i][0].index, jobs[i][1]))
        trajs = [restore(*jobs[i]) for i in order]
        starts = [len(t.turns) for t in trajs]
        cost = run_turns(self.policy, self.env, trajs, self.params, self.generator, self.batch_size,
                         self.capture_hidden, self.features)
        cost.trajectories = len(jobs)
        leaves = [0] * len(jobs)
        for i, t, n_turns in zip(order, trajs, starts):
            tree, node = jobs[i]
            records = turn_records(t, n_turns)
            leaves[i] = tree.attach(node, records, t.done, t.reward, t.info)
            if flags[i]:
                cost.continuations += 1
                cost.continuation_gen_tokens += sum(len(r.gen_ids) for r in records)
            if t.hidden:  # the state after k turns belongs to the path's node at depth k
                for n in tree.path(leaves[i])[n_turns:]:
                    if n.depth in t.hidden:
                        tree.hidden.setdefault(n.id, t.hidden[n.depth])
        self.cost.add(cost)
        return leaves


def leaf_trajectories(trees: list[RolloutTree]) -> list[Trajectory]:
    """One training trajectory per leaf (a prefix shared by n leaves appears in n of them)."""
    out = []
    for tree in trees:
        for leaf in tree.leaf_ids():
            traj = restore(tree, leaf)
            node = tree.nodes[leaf]
            traj.done, traj.reward, traj.info = True, float(node.reward or 0.0), dict(node.info)
            traj.tree, traj.node = tree, leaf
            out.append(traj)
    return out
