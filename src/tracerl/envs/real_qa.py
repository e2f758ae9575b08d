"""Real multi-hop QA (HotpotQA, MuSiQue, 2WikiMultihopQA, Search-R1 datasets) on the multihop protocol.

Turns are the same as in `multihop`: `<think>...</think>` then `<search>query</search>` (answered with
`<information>Doc 1 (Title): text ...</information>`) or `<answer>...</answer>` (ends the episode with
reward = exact match against any gold answer after normalisation; F1 is logged). Malformed turns get
the same corrective messages and cost a turn. The state is plain JSON, so an episode resumes from any
saved turn.

Questions come from files given per split (`train_files`, `validation_files`, `test_files`,
`heldout_files`; JSONL in the real-QA schema or Search-R1's layout, parquet too; see `qa_data.py`),
relative paths resolved against `data_root`. The search tool is, in order of precedence:

* `retriever_url`: a Search-R1-style retrieval server (`tracerl serve-retriever` or Search-R1's own);
* `corpus`: a corpus file (Search-R1 `id`/`contents` lines, documents, or real-QA records);
* the questions' own paragraphs: `retrieval="pooled"` (default) indexes all paragraphs of the file a
  question comes from; `retrieval="per_question"` only that question's (the distractor setting).

In-process searches rank by `retriever`: `bm25` (default), `dense` (all-MiniLM-L6-v2 embeddings in a
faiss index cached on disk, `tools/dense.py`) or `hybrid` (the two fused by reciprocal rank).

Every step's info carries `dataset`, `qtype` and `hops`, and for questions with marked gold paragraphs
`gold_retrieved` (the gold paragraph ids any search of the episode has returned so far) and
`gold_recall` (their share of the gold paragraphs). With `corpus` or `retriever_url`, a gold paragraph
counts as retrieved when a returned document's id is its content id (`tools/corpus.py: doc_id`), as it
is for `tracerl serve-retriever` over real-QA files and for corpus lines without an id.
"""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tracerl.envs.base import EnvOptions, StepResult, Task
from tracerl.envs.multihop import format_docs, protocol_step
from tracerl.envs.qa_data import QAItem, load_corpus, load_qa_file, pooled_documents
from tracerl.errors import DataError, OptionError
from tracerl.task import SPLITS
from tracerl.tools.bm25 import BM25Search
from tracerl.tools.dense import HybridSearch, check_retriever, make_search
from tracerl.tools.retrieval_client import RetrievalClient

RETRIEVAL_MODES = ("pooled", "per_question")
INSTRUCTION = (
    "Answer the question with the help of a search engine. First think briefly inside <think></think>. "
    "To search, write <search>query</search> and the results will appear inside <information></information>. "
    "When you know the answer, write it inside <answer></answer>, e.g. <answer>Paris</answer>. "
    "Every reply must end with a <search> or an <answer>."
)


def _as_list(files: str | list[str] | tuple[str, ...] | None, option: str) -> list[str]:
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
        raise OptionError(f"real_qa option {option!r} must be a path or a list of paths")
    return list(files)


def _clip(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


Paths = str | list[str] | None


class RealQAOptions(EnvOptions):
    """env.options of `real_qa`: question files per split, the search tool and text limits."""

    top_k: int = Field(3, ge=1, description="Documents returned per search.")
    max_turn_chars: int | None = Field(None, ge=1, description="Longest model turn in characters; longer turns are format errors (None: no cap).")
    train_files: Paths = Field(None, description="Question file(s) of the train split (JSONL or parquet; relative to data_root).")
    validation_files: Paths = Field(None, description="Question file(s) of the validation split.")
    test_files: Paths = Field(None, description="Question file(s) of the test split.")
    heldout_files: Paths = Field(None, description="Question file(s) of the heldout split.")
    data_root: str | None = Field(None, min_length=1, description="Directory that relative file paths are resolved against (None: the working directory).")
    retrieval: Literal["pooled", "per_question"] = Field("pooled", description="Without corpus or retriever_url: index all paragraphs of a question's file (pooled) or only its own (per_question).")
    corpus: str | None = Field(None, min_length=1, description="Search this corpus file instead of the questions' paragraphs.")
    retriever: Literal["bm25", "dense", "hybrid"] = Field("bm25", description="The in-process search tool: bm25, dense (all-MiniLM-L6-v2 + faiss, index cached under $TRACERL_CACHE; needs tracerl[dense]) or hybrid (both, reciprocal-rank fusion).")
    retriever_url: str | None = Field(None, description="A Search-R1-style retrieval server (http://host:port); takes precedence over corpus.")
    retriever_timeout: float = Field(10.0, gt=0, description="Seconds one retrieval request may take.")
    retriever_retries: int = Field(3, ge=0, description="Retries of a failed retrieval request before the run stops.")
    validation_size: int = Field(0, ge=0, description="Train questions held out as the validation split (only without validation_files).")
    max_per_file: int | None = Field(None, ge=1, description="Read at most this many questions per file (None: all).")
    max_doc_chars: int | None = Field(None, ge=1, description="Clip each shown document to about this many characters (None: no clip).")

    @field_validator("train_files", "validation_files", "test_files", "heldout_files", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip()):
            return v
        if isinstance(v, list) and v and all(isinstance(f, str) and f.strip() for f in v):
            return v
        raise ValueError(f"must be a path or a non-empty list of paths, got {v!r}"[:160])

    @field_validator("retriever_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// address, got {v!r}")
        return v

    @model_validator(mode="after")
    def _retriever(self) -> "RealQAOptions":
        if self.retriever != "bm25" and self.retriever_url:
            raise ValueError(f"env.options.retriever={self.retriever} picks the in-process search tool, but "
                             "env.options.retriever_url sends searches to a server (start it with --dense / --hybrid)")
        return self

    @model_validator(mode="after")
    def _splits(self) -> "RealQAOptions":
        given = {split: _as_list(getattr(self, f"{split}_files"), f"{split}_files") for split in SPLITS}
        if not any(given.values()):
            raise ValueError("environment 'real_qa' needs question files: set env.options.train_files and/or "
                             "env.options.test_files (paths)")
        leaked = set(given["train"]) & {f for split in ("validation", "test", "heldout") for f in given[split]}
        if leaked:
            raise ValueError(f"env.options: {sorted(leaked)[0]} is both a training file and an evaluation file")
        if self.validation_size and given["validation"]:
            raise ValueError("env.options.validation_size holds train questions out as the validation split; "
                             "it cannot be combined with env.options.validation_files")
        if self.validation_size and not given["train"]:
            raise ValueError("env.options.validation_size holds train questions out, but env.options.train_files is not set")
        return self


class RealQAEnv:
    """Multi-hop QA over real questions with a BM25, dense or hybrid (or served) search tool."""

    name = "real_qa"
    stop_strings = ("</search>", "</answer>")

    def __init__(self, seed: int = 0, max_turns: int = 4, top_k: int = 3, max_turn_chars: int | None = None,
                 train_files: str | list[str] | None = None, validation_files: str | list[str] | None = None,
                 test_files: str | list[str] | None = None, heldout_files: str | list[str] | None = None,
                 data_root: str | None = None, retrieval: str = "pooled", corpus: str | None = None,
                 retriever: str = "bm25", retriever_url: str | None = None, retriever_timeout: float = 10.0,
                 retriever_retries: int = 3,
                 validation_size: int = 0, max_per_file: int | None = None, max_doc_chars: int | None = None):
        if max_turns < 1 or top_k < 1:
            raise OptionError(f"real_qa needs max_turns >= 1 and top_k >= 1, got {max_turns} and {top_k}")
        if retrieval not in RETRIEVAL_MODES:
            raise OptionError(f"real_qa option retrieval={retrieval!r}; valid: {', '.join(RETRIEVAL_MODES)}")
        if validation_size < 0 or (max_per_file is not None and max_per_file < 1):
            raise OptionError("real_qa options validation_size must be >= 0 and max_per_file >= 1")
        self.seed, self.max_turns, self.top_k, self.max_turn_chars = seed, max_turns, top_k, max_turn_chars
        self.retrieval, self.max_doc_chars, self.retriever = retrieval, max_doc_chars, check_retriever(retriever)
        if retriever != "bm25" and retriever_url:
            raise OptionError(f"real_qa option retriever={retriever} is the in-process tool; with retriever_url "
                              "the server decides (tracerl serve-retriever --dense / --hybrid)")
        self.data_root = Path(os.path.expanduser(data_root)) if data_root else None
        self._items: dict[str, list[QAItem]] = {}  # file key (as configured) -> its questions
        self._splits: dict[str, list[Task]] = {}
        given = {"train": train_files, "validation": validation_files, "test": test_files, "heldout": heldout_files}
        leaked = set(_as_list(train_files, "train_files")) & {f for split in ("validation", "test", "heldout")
                                                              for f in _as_list(given[split], f"{split}_files")}
        if leaked:
            raise OptionError(f"real_qa: {sorted(leaked)[0]} is both a training file and an evaluation file")
        for split, files in given.items():
            self._splits[split] = [t for key in _as_list(files, f"{split}_files") for t in self._load(key, max_per_file)]
        if validation_size and not self._splits["validation"]:
            self._hold_out(validation_size)
        if not any(self._splits.values()):
            raise OptionError("real_qa needs question files: set env.options.train_files / test_files (paths)")

        self._client = self._corpus_index = None
        if retriever_url:
            self._client = RetrievalClient(retriever_url, top_k, retriever_timeout, retriever_retries)
        elif corpus:
            self._corpus_index = make_search(retriever, load_corpus(self._path(corpus)), top_k)
        else:
            for key, items in self._items.items():
                if any(not item.paragraphs for item in items):
                    raise DataError(f"{key} has questions without paragraphs (Search-R1 layout?); "
                                    "set env.options.corpus (a corpus file) or env.options.retriever_url")
        self._pooled: dict[str, Any] = {}
        # Retrieval is deterministic, so repeated queries (common in RL) share one observation.
        self._observation = functools.lru_cache(maxsize=8192)(self._search)
        self._per_question = functools.lru_cache(maxsize=256)(self._question_index)

    # -- data -----------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        p = Path(os.path.expanduser(key))
        return p if p.is_absolute() or self.data_root is None else self.data_root / p

    def _load(self, key: str, max_per_file: int | None) -> list[Task]:
        if key not in self._items:
            items = load_qa_file(self._path(key))[:max_per_file]
            for row, item in enumerate(items):  # where the question's paragraphs live (per-question search)
                item.task.meta.update(file=key, row=row)
            self._items[key] = items
        return [item.task for item in self._items[key]]

    def _hold_out(self, n: int) -> None:
        train = self._splits["train"]
        if n >= len(train):
            raise OptionError(f"real_qa validation_size={n} leaves no training questions (train has {len(train)})")
        picked = set(random.Random(self.seed).sample(range(len(train)), n))
        self._splits["validation"] = [t for i, t in enumerate(train) if i in picked]
        self._splits["train"] = [t for i, t in enumerate(train) if i not in picked]

    def tasks(self, split: str) -> list[Task]:
        """The questions of a split, in file order (empty if no file was given for it)."""
        if split not in SPLITS:
            raise OptionError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return list(self._splits[split])

    def system_prompt(self) -> str | None:
        """None: the short instruction goes in the user message."""
        return None

    def reference_solution(self, task: Task) -> str | None:
        """None: the teacher's note holds the gold answer only (no worked steps for real questions)."""
        return None

    def user_prompt(self, task: Task) -> str:
        """The instruction followed by the question."""
        return f"{INSTRUCTION}\nQuestion: {task.question}"

    def initial_state(self, task: Task) -> dict[str, Any]:
        """JSON-serialisable state before the first turn; `retrieved` lists the ids returned so far."""
        return {"task": task.to_dict(), "turn": 0, "history": [], "done": False, "retrieved": []}

    # -- search ---------------------------------------------------------------------------------

    def _question_index(self, key: str, row: int) -> Any:
        """The search over one question's paragraphs; dense vectors come from its file's pooled index."""
        docs = [{k: p[k] for k in ("id", "title", "text")} for p in self._items[key][row].paragraphs]
        if self.retriever == "bm25":
            return BM25Search(docs, self.top_k)
        pooled = self._tool(("file", key))
        dense = (pooled if self.retriever == "dense" else pooled.dense).subset([d["id"] for d in docs])
        return dense if self.retriever == "dense" else HybridSearch(BM25Search(docs, self.top_k), dense, self.top_k)

    def _scope(self, meta: dict[str, Any]) -> tuple:
        """Which index answers a question's searches: ("server",), ("corpus",), ("file", key) or
        ("question", key, row). Searches with the same scope and query share one cached answer."""
        if self._client is not None:
            return ("server",)
        if self._corpus_index is not None:
            return ("corpus",)
        key, row = meta.get("file"), meta.get("row")
        if key not in self._items or not isinstance(row, int) or not 0 <= row < len(self._items[key]):
            raise DataError(f"task from {key!r} row {row!r} is not among this environment's files; "
                            "resume with the same env.options as the run that saved the state")
        return ("question", key, row) if self.retrieval == "per_question" else ("file", key)

    def _tool(self, scope: tuple) -> Any:
        if scope[0] == "server":
            return self._client
        if scope[0] == "corpus":
            return self._corpus_index
        if scope[0] == "question":
            return self._per_question(scope[1], scope[2])
        if scope[1] not in self._pooled:
            self._pooled[scope[1]] = make_search(self.retriever, pooled_documents(self._items[scope[1]]), self.top_k)
        return self._pooled[scope[1]]

    def _search(self, scope: tuple, query: str) -> tuple[str, tuple[str, ...]]:
        docs = self._tool(scope).search(query, self.top_k)
        shown = [{"title": d["title"], "text": _clip(d["text"], self.max_doc_chars)} for d in docs]
        return format_docs(shown), tuple(d["id"] for d in docs)

    def search(self, task_meta: dict[str, Any], query: str) -> tuple[str, tuple[str, ...]]:
        """(observation, ids of the returned documents) of one search for a question."""
        return self._observation(self._scope(task_meta), query)

    # -- stepping -------------------------------------------------------------------------------

    def step(self, state: dict[str, Any], turn_text: str, truncated: bool = False) -> tuple[dict[str, Any], StepResult]:
        """Apply one model turn; return the new state and the result. Never raises on model text
        (a retrieval server that stays down raises RetrievalError: an infrastructure fault)."""
        if "retrieved" not in state:
            state = {**state, "retrieved": []}  # ids of every document the episode's searches returned

        def search(new: dict[str, Any], query: str) -> str:
            observation, ids = self.search(new["task"].get("meta", {}), query)
            new["retrieved"] += [i for i in ids if i not in new["retrieved"]]
            return observation

        new, res = protocol_step(state, turn_text, truncated, self.max_turns, self.max_turn_chars, search)
        self._with_eval_info(res.info, state["task"].get("meta", {}), new)
        return new, res

    @staticmethod
    def _with_eval_info(info: dict[str, Any], meta: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """What evaluation groups and scores by: dataset, question type, hop count and, when the
        question marks gold paragraphs, which of them the episode's searches returned so far."""
        info.update(dataset=meta.get("dataset"), qtype=meta.get("type"), hops=meta.get("hops"))
        gold = meta.get("gold_ids") or []
        if gold:
            found = set(state["retrieved"])
            info["gold_retrieved"] = [g for g in gold if g in found]
            info["gold_recall"] = len(info["gold_retrieved"]) / len(gold)
        return info

    # -- demonstrations -------------------------------------------------------------------------

    def oracle_turns(self, task: Task, rng: random.Random, noise: dict[str, float] | None = None) -> list[str]:
        """A demonstration: one search per gold paragraph (its title, or its first words when it has
        none), then the gold answer. noise["useless_search"] adds a search for a non-gold paragraph;
        noise["wrong_answer"] answers with a non-gold paragraph's title instead."""
        noise = noise or {}
        add_useless = rng.random() < noise.get("useless_search", 0.0)
        answer_wrong = rng.random() < noise.get("wrong_answer", 0.0)
        paragraphs = self._items[task.meta["file"]][task.meta["row"]].paragraphs if "file" in task.meta else []
        gold = [p for p in paragraphs if p["is_supporting"]]
        other = [p for p in paragraphs if not p["is_supporting"] and p["title"]]

        def query(p: dict[str, Any]) -> str:
            return p["title"] or " ".join(p["text"].split()[:8])

        turns = [f"<think>I need to look up {query(p)}.</think>\n<search>{query(p)}</search>"
                 for p in gold[: self.max_turns - 1]]
        answer = rng.choice(other)["title"] if answer_wrong and other else task.answers[0]
        turns.append(f"<think>I have what I need.</think>\n<answer>{answer}</answer>")
        if add_useless and other and len(turns) + 1 <= self.max_turns:
            p = rng.choice(other)
            turns.insert(rng.randint(0, len(turns) - 1), f"<think>Let me check {p['title']}.</think>\n<search>{p['title']}</search>")
        return turns

