"""The built-in multi-hop search environment (Search-R1 turn format) over a synthetic world.

Each model turn is `<think>...</think>` followed by either `<search>query</search>`, answered with
`<information>Doc 1 (Title): text ...</information>` from a BM25 index of the world's documents, or
`<answer>...</answer>`, which ends the episode with a binary exact-match reward. Malformed turns get
a corrective message in the same `<information>` wrapper and cost a turn, so the policy learns the
format from the reward rather than from a crash.
"""

from __future__ import annotations

import copy
import functools
import random
from typing import Any, Callable

from pydantic import Field, field_validator

from tracerl.envs.answers import exact_match, f1_score
from tracerl.envs.base import EnvOptions, StepResult, Task, TrainSize
from tracerl.envs.tags import strip_think, tag_body
from tracerl.envs.world import RELATIONS, SPLITS, WorldConfig, build_world, with_articles
from tracerl.errors import OptionError

INSTRUCTION = (
    "Answer the question. Think inside <think></think>, then either look up an entity with "
    "<search>name</search> or give the final answer with <answer>text</answer>."
)

# Corrective observations for malformed turns; short, and each says how to fix the turn.
FORMAT_MESSAGES = {
    "no_action": "Invalid turn: end it with <search>name</search> or <answer>text</answer>.",
    "unclosed_tag": "Invalid turn: close the tag, e.g. <search>name</search> or <answer>text</answer>.",
    "empty_query": "Invalid turn: the search query is empty. Write <search>name</search>.",
    "both_tags": "Invalid turn: use either <search> or <answer> in one turn, not both.",
    "too_long": "Invalid turn: it was too long. Think briefly, then search or answer.",
}

def parse_turn(text: str, truncated: bool = False, max_chars: int | None = None) -> tuple[str, str]:
    """Classify a turn as ("search", query), ("answer", text) or ("invalid", format error kind)."""
    if truncated or (max_chars is not None and len(text) > max_chars):
        return "invalid", "too_long"
    # Tags mentioned while thinking are not actions; a missing think block is tolerated.
    body = strip_think(text)
    has_search, has_answer = "<search>" in body, "<answer>" in body
    if has_search and has_answer:
        return "invalid", "both_tags"
    if has_search:
        inside = tag_body(body, "search")
        if inside is None:
            return "invalid", "unclosed_tag"
        query = " ".join(inside.split())
        return ("search", query) if query else ("invalid", "empty_query")
    if has_answer:
        inside = tag_body(body, "answer")
        return ("answer", inside.strip()) if inside is not None else ("invalid", "unclosed_tag")
    return "invalid", "no_action"


def protocol_step(state: dict[str, Any], turn_text: str, truncated: bool, max_turns: int, max_turn_chars: int | None,
                  search: Callable[[dict[str, Any], str], str]) -> tuple[dict[str, Any], StepResult]:
    """One turn of the Search-R1 protocol on a JSON state (task, turn, history, done), shared by the
    search environments: an answer ends the episode with its exact match; a search calls
    `search(new_state, query)` for the observation (it may record what it retrieved in the new state);
    anything else is a format error told back to the model. A turn at max_turns ends the episode
    (reward 0) without an observation. Never raises on model text."""
    if not isinstance(turn_text, str):
        turn_text = ""
    new = copy.deepcopy(state)
    new["turn"] = turn = state.get("turn", 0) + 1
    info = {"format_error": None, "tool_call": False, "em": 0.0, "f1": 0.0, "action": "invalid",
            "truncated": False}
    if state.get("done"):
        info["format_error"] = "episode_over"
        new["history"].append({"action": "invalid", "format_error": "episode_over"})
        return new, StepResult(None, True, 0.0, info)

    action, arg = parse_turn(turn_text, truncated, max_turn_chars)
    info["action"] = action
    out_of_turns = turn >= max_turns
    if action == "answer":
        answers = state["task"]["answers"]
        info["em"], info["f1"] = exact_match(arg, answers), f1_score(arg, answers)
        new["history"].append({"action": "answer", "answer": arg})
        new["done"] = True
        return new, StepResult(None, True, info["em"], info)
    if action == "search":
        new["history"].append({"action": "search", "query": arg})
        observation = None if out_of_turns else search(new, arg)
        info["tool_call"] = not out_of_turns
    else:
        info["format_error"] = arg
        new["history"].append({"action": "invalid", "format_error": arg})
        observation = None if out_of_turns else f"\n<information>{FORMAT_MESSAGES[arg]}</information>\n"
    if out_of_turns:
        new["done"] = True
        info["truncated"] = True
        return new, StepResult(None, True, 0.0, info)
    return new, StepResult(observation, False, 0.0, info)


def format_docs(docs: list[dict[str, Any]]) -> str:
    """The observation shown after a search."""
    body = "\n".join(f"Doc {i} ({d['title']}): {d['text']}" for i, d in enumerate(docs, 1))
    return f"\n<information>{body or 'No results.'}</information>\n"


def _sentence(text: str) -> str:
    return with_articles(text[:1].upper() + text[1:])


class MultiHopOptions(EnvOptions):
    """env.options of `multihop`: retrieval, turn length and the generated world's size and question mix."""

    top_k: int = Field(3, ge=1, description="Documents returned per search.")
    max_turn_chars: int | None = Field(None, ge=1, description="Longest model turn in characters; longer turns are format errors (None: no cap).")
    n_entities: int = Field(WorldConfig.n_entities, ge=40, description="Entities in the world (people, organisations, cities, works, countries).")
    hop_mix: dict[int, float] = Field(default_factory=lambda: dict(WorldConfig.hop_mix), description="Share of k-hop questions, {hops: weight} with hops in 1..4 (4 needs env.max_turns >= 5).")
    train_size: TrainSize = Field(WorldConfig.train_size, description="Questions in the train split (>= 1).")
    validation_size: int = Field(WorldConfig.validation_size, ge=0, description="Questions in the validation split.")
    test_size: int = Field(WorldConfig.test_size, ge=0, description="Questions in the test split.")
    heldout_size: int = Field(WorldConfig.heldout_size, ge=0, description="Questions in the heldout split (relation chains never trained on).")
    heldout_fraction: float = Field(WorldConfig.heldout_fraction, gt=0, lt=1, description="Share of the 2+ hop relation chains reserved for heldout.")
    demo_max_hops: int | None = Field(None, ge=1, le=4, description="SFT demonstrations only from train questions with at most this many hops (None: all); RL still draws from the whole train split.")

    @field_validator("hop_mix", mode="before")
    @classmethod
    def _hop_weights(cls, v: Any) -> Any:
        try:
            mix = {int(k): float(w) for k, w in (v.items() if isinstance(v, dict) else v)}
        except (TypeError, ValueError):
            raise ValueError(f"must map hop counts to weights, e.g. {{1: 0.2, 2: 0.8}}, got {v!r}"[:160]) from None
        if not mix or any(k not in (1, 2, 3, 4) or w < 0 for k, w in mix.items()) or sum(mix.values()) <= 0:
            raise ValueError(f"needs hop counts in 1..4 with weights >= 0 and one > 0, got {mix}")
        return mix

    def check(self, max_turns: int) -> None:
        hops = max(k for k, w in self.hop_mix.items() if w > 0)
        if hops + 1 > max_turns:
            raise ValueError(f"env.max_turns={max_turns} is too few for the {hops}-hop questions of env.options.hop_mix "
                             f"(a search per hop, then the answer): raise env.max_turns to {hops + 1} or drop them from hop_mix")
        if self.demo_max_hops is not None and not any(k <= self.demo_max_hops for k, w in self.hop_mix.items() if w > 0):
            raise ValueError(f"env.options.demo_max_hops={self.demo_max_hops} leaves no SFT demos: hop_mix has no questions "
                             f"with that few hops ({sorted(k for k, w in self.hop_mix.items() if w > 0)})")


class MultiHopEnv:
    """Multi-hop question answering with a BM25 search tool over a generated world."""

    name = "multihop"
    stop_strings = ("</search>", "</answer>")
    extra_options = WorldConfig.option_names()  # accepted as keyword arguments (see make_env)

    def __init__(self, seed: int = 0, top_k: int = 3, max_turns: int = 4, max_turn_chars: int | None = None,
                 demo_max_hops: int | None = None, **world_options: Any):
        unknown = sorted(set(world_options) - set(self.extra_options))
        if unknown:
            raise OptionError(f"unknown multihop option {unknown[0]!r}; valid world options: {', '.join(self.extra_options)}")
        if max_turns < 1:
            raise OptionError(f"max_turns must be >= 1, got {max_turns}")
        if top_k < 1:
            raise OptionError(f"top_k must be >= 1, got {top_k}")
        config = WorldConfig(**world_options)
        if config.max_hops + 1 > max_turns:
            raise OptionError(f"{config.max_hops}-hop questions need max_turns >= {config.max_hops + 1}, "
                              f"got max_turns={max_turns}; raise max_turns or drop them from hop_mix")
        if demo_max_hops is not None and demo_max_hops < 1:
            raise OptionError(f"demo_max_hops must be >= 1 or None, got {demo_max_hops}")
        self.seed, self.top_k, self.max_turns, self.max_turn_chars = seed, top_k, max_turns, max_turn_chars
        self.demo_max_hops = demo_max_hops
        self.world = build_world(seed, config, top_k)
        # Retrieval is deterministic, so repeated queries (common in RL) can share one observation.
        self._observation = functools.lru_cache(maxsize=4096)(self._search)

    # -- prompts and tasks ---------------------------------------------------------------------

    def tasks(self, split: str) -> list[Task]:
        """All tasks of a split ("train", "validation", "test", "heldout")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return self.world.tasks(split)

    def system_prompt(self) -> str | None:
        """None: the short instruction goes in the user message to save context."""
        return None

    def user_prompt(self, task: Task) -> str:
        """The instruction followed by the question."""
        return f"{INSTRUCTION}\nQuestion: {task.question}"

    def initial_state(self, task: Task) -> dict[str, Any]:
        """JSON-serialisable state before the first turn."""
        return {"task": task.to_dict(), "turn": 0, "history": [], "done": False}

    # -- stepping -----------------------------------------------------------------------------

    def _search(self, query: str) -> str:
        return format_docs(self.world.retriever.search(query, self.top_k))

    def step(self, state: dict[str, Any], turn_text: str, truncated: bool = False) -> tuple[dict[str, Any], StepResult]:
        """Apply one model turn; return the new state and the result. Never raises on model text."""
        return protocol_step(state, turn_text, truncated, self.max_turns, self.max_turn_chars,
                             lambda new, query: self._observation(query))

    # -- demonstrations -----------------------------------------------------------------------

    def demo_task(self, task: Task) -> bool:
        """Whether SFT may draw a demonstration of `task` (env.options.demo_max_hops; all when unset)."""
        return self.demo_max_hops is None or task.meta.get("hops", 0) <= self.demo_max_hops

    def reference_solution(self, task: Task) -> str | None:
        """The entities to look up, in order."""
        chain = task.meta.get("chain", [])
        return f"Look up, in order: {', '.join(chain)}." if chain else None

    def oracle_turns(self, task: Task, rng: random.Random, noise: dict[str, float] | None = None) -> list[str]:
        """A demonstration: one search per bridge entity, then the answer (optionally noisy).

        noise["useless_search"]: probability of one extra search for an irrelevant entity (only when it
        fits in max_turns); noise["wrong_answer"]: probability that the final answer is wrong but of
        the right type."""
        noise = noise or {}
        # Both coins are tossed up front, whatever the noise levels, so demos stay aligned across them.
        add_useless = rng.random() < noise.get("useless_search", 0.0)
        answer_wrong = rng.random() < noise.get("wrong_answer", 0.0)
        relations = [RELATIONS[r] for r in task.meta["relations"]]
        chain = task.meta["chain"]
        answer = self.world.wrong_answer(task, rng) if answer_wrong else task.answers[0]
        turns = []
        for i, name in enumerate(chain):
            # Short thoughts: the first names what is needed, later ones restate the fact just read,
            # which is where the bridge entity is copied from (the hard step for small models).
            if i == 0:
                thought = _sentence(f"I need {relations[i].phrase.format(x=name)}.")
            else:
                thought = _sentence(relations[i - 1].fact.format(x=chain[i - 1], y=name)) + "."
            turns.append(f"<think>{thought}</think>\n<search>{name}</search>")
        last = _sentence(relations[-1].fact.format(x=chain[-1], y=answer))
        turns.append(f"<think>{last}.</think>\n<answer>{answer}</answer>")
        if add_useless and len(turns) + 1 <= self.max_turns:
            other = self.world.other_entity_name(rng, chain)
            turns.insert(rng.randint(0, len(chain)), f"<think>Let me also check {other}.</think>\n<search>{other}</search>")
        return turns
