"""Every bad input is one line on stderr and a non-zero exit, before any model is built or file written.

The cases are the audit's (issue 19: tracebacks and silently accepted values) plus one per range of
every numeric config key and environment option, read from the schema, so a new bounded key gets its
case automatically. Each runs the real CLI in-process (`tracerl.cli.main`) with model building and the
run directory replaced by a tripwire: a config error must come first.

docs/bad_input.md is this table with the messages the CLI printed; the test compares every message
with it, so the doc cannot drift. After changing a message, regenerate it:

    .venv/bin/python tests/test_bad_input.py --write-table
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import get_args
from unittest import mock

import pytest
from annotated_types import Ge, Gt, Le, Lt

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad_input.md"
# How each input was handled before issue 19 (measured on the code before it, where noted by the audit)
TRACEBACK, SILENT = "traceback", "silently accepted"
LATE = "late"  # one line, but only after the model was built or the run directory taken
USAGE = "usage block"  # argparse's usage lines and the error
WAS = {  # the same for cases read from the schema, by their arguments
    **dict.fromkeys(["train run.threads=0", "train model.num_layers=0", "train algo.tree_w_intra=-0.5",
                     "train algo.tree_w_inter=-0.5", "train algo.adv_eps=0", "train algo.clip_low=1",
                     "train env.options.max_turn_chars=0",
                     "train env.name=arith env.max_turns=1 env.options.max_turn_chars=0",
                     *(f"train env.name=real_qa env.options.train_files={{tmp}}/qa.jsonl env.options.{k}"
                       for k in ("max_turn_chars=0", "retriever_timeout=0", "retriever_retries=-1", "max_doc_chars=0"))],
                    SILENT),
    **dict.fromkeys(["train model.hidden_size=0", "train model.num_heads=0", "train model.num_kv_heads=0",
                     "train model.vocab_size=266", "train model.max_context=0", "train algo.dual_clip=1",
                     "train env.options.top_k=0", "train env.options.n_entities=39",
                     "train env.options.heldout_fraction=0", "train env.options.heldout_fraction=1",
                     *(f"train env.options.{k}_size=-1" for k in ("validation", "test", "heldout")),
                     *(f"train env.name=arith env.max_turns=1 env.options.{k}_size=-1"
                       for k in ("validation", "test", "heldout"))],
                    TRACEBACK),
}


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # after `tracerl`; {tmp} is the folder of bad files (make_inputs)
    needle: str  # what the message must name: the key, option, argument or file
    kind: str  # the doc's section
    was: str = ""  # before issue 19: traceback / silently accepted (audit and review)

    @property
    def shown(self) -> str:
        return "tracerl " + " ".join(a.replace("{tmp}", "<tmp>") for a in self.args)


# ------------------------------------------------------------------------------------------------
# cases read from the schema: one per bound of every numeric key


def _bad_values(field) -> list[str]:
    """A value just outside each bound of a pydantic field (ge=1 -> 0, gt=0 -> 0, lt=1 -> 1, ...)."""
    ann = field.annotation
    is_int = ann is int or int in get_args(ann) and float not in get_args(ann)
    out = []
    for m in field.metadata:
        step = 1 if is_int else 0.5
        if isinstance(m, Ge):
            out.append(m.ge - step)
        elif isinstance(m, Gt):
            out.append(m.gt)
        elif isinstance(m, Le):
            out.append(m.le + step)
        elif isinstance(m, Lt):
            out.append(m.lt)
    return [str(v) for v in out]


def range_cases() -> list[Case]:
    from tracerl.config import Config
    from tracerl.envs import ENVIRONMENTS, options_model

    cases = []
    for section, sf in Config.model_fields.items():
        for name, f in sf.annotation.model_fields.items():
            for bad in _bad_values(f):
                args = ("train", f"{section}.{name}={bad}")
                cases.append(Case(args, f"{section}.{name}", "config ranges", WAS.get(" ".join(args), "")))
    env_base = {"multihop": (), "arith": ("env.name=arith", "env.max_turns=1"),
                "real_qa": ("env.name=real_qa", "env.options.train_files={tmp}/qa.jsonl"),
                "qa": ("env.name=qa", "env.max_turns=1", "data.train_files={tmp}/qa.jsonl")}
    for env in ENVIRONMENTS.names():
        for name, f in options_model(env).model_fields.items():
            for bad in _bad_values(f):
                args = ("train", *env_base[env], f"env.options.{name}={bad}")
                cases.append(Case(args, f"env.options.{name}", f"environment options ({env})",
                                  WAS.get(" ".join(args), "")))
    return cases


# ------------------------------------------------------------------------------------------------
# cases by hand: the audit's list, types, unknown keys, cross-key rules, devices, files, arguments


def hand_cases() -> list[Case]:
    def c(kind, needle, *args, was=""):
        return Case(tuple(args), needle, kind, was)

    k = "config ranges and rules"
    cases = [
        c(k, "env.options.top_k", "train", "env.options.top_k=-3", was=TRACEBACK),
        c(k, "env.options.top_k", "train", "env.options.top_k=abc", was=TRACEBACK),
        c(k, "env.options.n_entities", "train", "env.options.n_entities=0", was=TRACEBACK),
        c(k, "env.options.train_size", "train", "env.options.train_size=abc", was=TRACEBACK),
        c(k, "env.options.train_size", "train", "env.options.train_size=0"),
        c(k, "model.hidden_size", "train", "model.hidden_size=-64", was=TRACEBACK),
        c(k, "model.num_heads", "train", "model.num_heads=3", was=TRACEBACK),
        c(k, "model.num_kv_heads", "train", "model.num_kv_heads=3", was=TRACEBACK),
        c(k, "model.num_heads", "train", "model.hidden_size=12", "model.num_heads=4", was=TRACEBACK),
        c(k, "model.vocab_size", "train", "model.vocab_size=0", was=TRACEBACK),
        c(k, "model.vocab_size", "train", "model.vocab_size=100", was=TRACEBACK),
        c(k, "model.max_context", "train", "model.max_context=40", was=TRACEBACK),
        c(k, "run.threads", "train", "run.threads=-1", was=TRACEBACK),
        c(k, "trainer.betas", "train", "trainer.betas=[2,2]", was=TRACEBACK),
        c(k, "trainer.betas", "train", "trainer.betas=[-0.1,0.9]", was=TRACEBACK),
        c(k, "trainer.betas", "train", "trainer.betas=[0.9]"),
        c(k, "trainer.betas", "train", "trainer.betas=abc"),
        c(k, "algo.clip_low", "train", "algo.clip_low=5", was=SILENT),
        c(k, "algo.dual_clip", "train", "algo.dual_clip=0.5", was=TRACEBACK),
        c(k, "algo.tree_w_inter", "train", "algo.tree_w_intra=0", "algo.tree_w_inter=0", was=SILENT),
        c(k, "algo.tree_w_intra", "train", "algo.tree_w_intra=-1", was=SILENT),
        c(k, "credit.layers", "train", "credit.layers=[7]", was=LATE),
        c(k, "credit.layers", "train", "credit.layers=[-1]", was=LATE),
        c(k, "credit.layers", "train", "credit.layers=[]", was=SILENT),
        c(k, "model.path", "train", "model.path=/some/model", was=SILENT),
        c(k, "model.path", "train", "model.preset=path"),
        c(k, "rollout.leaves_per_tree", "train", "rollout.allocator=tree_grpo", "algo.advantage=tree_grpo",
          "rollout.leaves_per_tree=9"),
        c(k, "distill.annotator_model", "train", "distill.annotator=external"),
        c(k, "run.name", "train", "run.name=a/b"),
        c(k, "run.name", "train", "run.name=.."),
        c(k, "run.dir", "train", "run.dir=", was=SILENT),  # the working directory became the run directory
        # types and names
        c(k, "trainer.lr", "train", "trainer.lr=fast"),
        c(k, "rollout.group_size", "train", "rollout.group_size=many"),
        c(k, "trainer.steps", "train", "trainer.steps=2.5"),
        c(k, "trainer.bf16", "train", "trainer.bf16=maybe"),
        c(k, "model.preset", "train", "model.preset=huge"),
        c(k, "model.dtype", "train", "model.dtype=float16"),
        c(k, "distill.mode", "train", "distill.mode=sometimes"),
        c(k, "trainer.bogus", "train", "trainer.bogus=1"),
        c(k, "bogus", "train", "bogus.key=1"),
        c(k, "trainer", "train", "trainer=5"),
        c(k, "trainer.lr", "train", "trainer.lr"),
        c(k, "trainer", "train", "trainer.lr.x=1"),
        c(k, "algo.advantage", "train", "algo.advantage=magic"),
        c(k, "rollout.allocator", "train", "rollout.allocator=magic"),
        c(k, "credit.name", "train", "credit.name=magic"),
        c(k, "algo.advantage", "train", "algo.advantage=tree_grpo"),
    ]
    k = "environment options"
    real_qa = ("env.name=real_qa",)
    cases += [
        c(k, "env.name", "train", "env.name=nope"),
        c(k, "env.options", "train", "env.options=5"),
        c(k, "colour", "train", "env.options.colour=blue"),
        c(k, "env.options.hop_mix", "train", "env.options.hop_mix={4: 1}", was=TRACEBACK),
        c(k, "env.options.hop_mix", "train", "env.options.hop_mix={7: 1}", was=TRACEBACK),
        c(k, "env.options.hop_mix", "train", "env.options.hop_mix={1: -1}", was=TRACEBACK),
        c(k, "env.options.hop_mix", "train", "env.options.hop_mix=abc", was=TRACEBACK),
        c(k, "env.max_turns", "train", "env.max_turns=2", was=TRACEBACK),
        c(k, "env.max_turns", "train", "env.name=arith"),
        c(k, "top_k", "train", "env.name=arith", "env.max_turns=1", "env.options.top_k=2"),
        c(k, "env.options.train_size", "train", "env.name=arith", "env.max_turns=1", "env.options.train_size=0"),
        c(k, "env.options.train_files", "train", *real_qa),
        c(k, "env.options.train_files", "train", *real_qa, "env.options.train_files=5"),
        c(k, "env.options.train_files", "train", *real_qa, "env.options.train_files=[]"),
        c(k, "env.options", "train", *real_qa, "env.options={train_files: a.jsonl, test_files: a.jsonl}"),
        c(k, "env.options.retrieval", "train", *real_qa, "env.options={train_files: a.jsonl, retrieval: bm42}"),
        c(k, "env.options.retriever_url", "train", *real_qa,
          "env.options={train_files: a.jsonl, retriever_url: ftp://x}"),
        c(k, "env.options.retriever", "train", *real_qa, "env.options={train_files: a.jsonl, retriever: colbert}"),
        c(k, "env.options.retriever_url", "train", *real_qa,
          "env.options={train_files: a.jsonl, retriever: dense, retriever_url: http://127.0.0.1:1}"),
        c(k, "env.options.validation_files", "train", *real_qa,
          "env.options={train_files: a.jsonl, validation_files: b.jsonl, validation_size: 5}", was=SILENT),
        c(k, "env.options.train_files", "train", *real_qa,
          "env.options={test_files: a.jsonl, validation_size: 5}"),
        c(k, "env.options.max_per_file", "train", *real_qa, "env.options={train_files: a.jsonl, max_per_file: x}",
          was=TRACEBACK),
    ]
    k = "device"
    cases += [
        c(k, "run.device", "train", "run.device=cuda", was=TRACEBACK),
        c(k, "run.device", "train", "run.device=cuda:1", was=TRACEBACK),
        c(k, "run.device", "train", "run.device=bogus", was=TRACEBACK),
        c(k, "run.device", "train", "run.device=gpu", was=TRACEBACK),
        c(k, "run.device", "sft", "run.device=cuda", was=TRACEBACK),
        c(k, "run.device", "calibrate", "run.device=cuda", was=TRACEBACK),
        c(k, "run.device", "eval", "preset", "--config", "{tmp}/arith.yaml", "run.device=cuda", was=TRACEBACK),
        c(k, "engine.weight_sync", "train", "engine.weight_sync=tcp"),
        c(k, "engine.weight_sync", "train", "engine.weight_sync=nccl"),
        c(k, "engine.weight_sync", "train", "engine.name=vllm", "engine.weight_sync=ipc"),
        c(k, "engine.device", "train", "engine.name=vllm", "engine.device=gpu1"),
        c(k, "engine.device", "train", "engine.name=vllm", "engine.device=cuda:1"),
    ]
    k = "config files"
    cases += [
        c(k, "{tmp}/missing.yaml", "train", "--config", "{tmp}/missing.yaml"),
        c(k, "{tmp}/bad.yaml", "train", "--config", "{tmp}/bad.yaml"),
        c(k, "{tmp}/list.yaml", "train", "--config", "{tmp}/list.yaml"),
        c(k, "{tmp}/deep.yaml", "train", "--config", "{tmp}/deep.yaml", was=TRACEBACK),
        c(k, "{tmp}/bad_utf8.yaml", "train", "--config", "{tmp}/bad_utf8.yaml"),
        c(k, "{tmp}/models", "train", "--config", "{tmp}/models"),
        c(k, "trainer.learning_rate", "train", "--config", "{tmp}/unknown_key.yaml"),
        c(k, "{tmp}/bad.yaml", "sft", "--config", "{tmp}/bad.yaml"),
        c(k, "{tmp}/bad.yaml", "calibrate", "--config", "{tmp}/bad.yaml"),
    ]
    k = "data files"
    qa = ("train", "env.name=real_qa")
    cases += [
        c(k, "{tmp}/bad_utf8.jsonl", *qa, "env.options.train_files={tmp}/bad_utf8.jsonl", was=TRACEBACK),
        c(k, "{tmp}/deep.jsonl", *qa, "env.options.train_files={tmp}/deep.jsonl", was=TRACEBACK),
        c(k, "{tmp}/broken.jsonl:2", *qa, "env.options.train_files={tmp}/broken.jsonl"),
        c(k, "{tmp}/not_object.jsonl:1", *qa, "env.options.train_files={tmp}/not_object.jsonl"),
        c(k, "{tmp}/no_answer.jsonl:1", *qa, "env.options.train_files={tmp}/no_answer.jsonl"),
        c(k, "{tmp}/empty.jsonl", *qa, "env.options.train_files={tmp}/empty.jsonl"),
        c(k, "{tmp}/missing.jsonl", *qa, "env.options.train_files={tmp}/missing.jsonl"),
        c(k, "{tmp}/deep.jsonl", *qa, "env.options={train_files: {tmp}/qa.jsonl, corpus: {tmp}/deep.jsonl}",
          was=TRACEBACK),
        c(k, "{tmp}/bad_utf8.jsonl", "serve-retriever", "--corpus", "{tmp}/bad_utf8.jsonl", was=TRACEBACK),
        c(k, "{tmp}/deep.jsonl", "serve-retriever", "--corpus", "{tmp}/deep.jsonl", was=TRACEBACK),
        c(k, "{tmp}/broken.jsonl:2", "serve-retriever", "--corpus", "{tmp}/broken.jsonl"),
        c(k, "{tmp}/missing.jsonl", "serve-retriever", "--corpus", "{tmp}/missing.jsonl"),
        c(k, "{tmp}/empty.jsonl", "serve-retriever", "--corpus", "{tmp}/empty.jsonl"),
    ]
    k = "model directories"
    path = ("train", "model.preset=path")
    cases += [
        c(k, "{tmp}/models/bad_config/config.json", *path, "model.path={tmp}/models/bad_config", was=TRACEBACK),
        c(k, "{tmp}/models/no_type/config.json", *path, "model.path={tmp}/models/no_type", was=TRACEBACK),
        c(k, "{tmp}/models/bad_weights/model.safetensors", *path, "model.path={tmp}/models/bad_weights",
          was=TRACEBACK),
        c(k, "{tmp}/models/truncated/model.safetensors", *path, "model.path={tmp}/models/truncated", was=TRACEBACK),
        c(k, "model.safetensors.index.json", *path, "model.path={tmp}/models/bad_index", was=TRACEBACK),
        c(k, "{tmp}/models/bad_tokenizer/tokenizer.json", *path, "model.path={tmp}/models/bad_tokenizer",
          was=TRACEBACK),
        c(k, "{tmp}/models/no_tokenizer", *path, "model.path={tmp}/models/no_tokenizer", was=LATE),
        c(k, "{tmp}/models/no_such", *path, "model.path={tmp}/models/no_such", was=LATE),
        c(k, "{tmp}/qa.jsonl", *path, "model.path={tmp}/qa.jsonl", was=LATE),
        c(k, "{tmp}/models/bad_config/config.json", "eval", "{tmp}/models/bad_config", was=TRACEBACK),
        c(k, "{tmp}/models/bad_weights/model.safetensors", "eval", "{tmp}/models/bad_weights", was=TRACEBACK),
        c(k, "{tmp}/models/bad_config/config.json", "calibrate", "model.preset=path",
          "model.path={tmp}/models/bad_config", was=TRACEBACK),
    ]
    k = "command-line arguments"
    cases += [
        c(k, "command", was=USAGE),
        c(k, "bogus", "bogus", was=USAGE),
        c(k, "--bogus", "train", "--bogus", was=USAGE),
        c(k, "{tmp}/missing_run", "train", "--resume", "{tmp}/missing_run"),
        c(k, "--overwrite", "train", "--resume", "{tmp}/run_nockpt", "--overwrite", was=SILENT),
        c(k, "--auto-resume", "train", "--resume", "{tmp}/run_nockpt", "--auto-resume", was=SILENT),
        c(k, "--config", "train", "--resume", "{tmp}/run_nockpt", "--config", "{tmp}/arith.yaml", was=SILENT),
        c(k, "--split", "eval", "preset", "--split", "bogus", was=TRACEBACK),
        c(k, "--n", "eval", "preset", "--n", "-3", was=SILENT),
        c(k, "--n", "eval", "preset", "--n", "abc", was=USAGE),
        c(k, "--config", "eval", "preset"),
        c(k, "{tmp}/missing_run", "eval", "{tmp}/missing_run"),
        c(k, "{tmp}/run_nockpt", "eval", "{tmp}/run_nockpt"),
        c(k, "--out", "eval", "preset", "--config", "{tmp}/arith.yaml", "--out", "{tmp}/qa.jsonl", was=TRACEBACK),
        c(k, "--port", "serve-retriever", "--corpus", "{tmp}/qa.jsonl", "--port", "99999", was=TRACEBACK),
        c(k, "--port", "serve-retriever", "--corpus", "{tmp}/qa.jsonl", "--port", "-1", was=TRACEBACK),
        c(k, "--top-k", "serve-retriever", "--corpus", "{tmp}/qa.jsonl", "--top-k", "0"),
        c(k, "--corpus", "serve-retriever", was=USAGE),
        c(k, "--hybrid", "serve-retriever", "--corpus", "{tmp}/qa.jsonl", "--dense", "--hybrid"),
        c(k, "{tmp}/models", "report", "{tmp}/models"),
        c(k, "--tree-step", "report", "{tmp}/run_nockpt", "--tree-step", "-1"),
        c(k, "--tree-prompts", "report", "{tmp}/run_nockpt", "--tree-prompts", "-1"),
        c(k, "step 7", "report", "{tmp}/run_nockpt", "--tree-step", "7"),
        c(k, "{tmp}/models", "compare", "{tmp}/models", "--out", "{tmp}/cmp.html"),
        c(k, "--out", "compare", "{tmp}/run_nockpt", "--out", "{tmp}/models"),
        c(k, "--label-key", "compare", "{tmp}/run_nockpt", "--out", "{tmp}/cmp.html", "--label-key", ","),
        c(k, "--out", "compare", "{tmp}/run_nockpt", was=USAGE),
        c(k, "--steps", "calibrate", "--steps", "0"),
        c(k, "allocator 'magic'", "sim", "--allocator", "magic"),
        c(k, "difficulty", "sim", "--difficulty", "beta:0,1"),
        c(k, "turn tokens", "sim", "--turn-tokens", "60-20"),
        c(k, "--turns", "sim", "--turns", "0"),
        c(k, "--turn-strength", "sim", "--turn-strength", "2"),
        c(k, "--early-stop", "sim", "--early-stop", "1"),
        c(k, "--predictor-noise", "sim", "--predictor-noise", "-1"),
        c(k, "--batches", "sim", "--batches", "0"),
        c(k, "--seeds", "sim", "--seeds", "0"),
        c(k, "trainer.lr", "sim", "trainer.lr=1"),
        c(k, "rollout.group_size", "sim", "rollout.group_size=0"),
        c(k, "{tmp}/models", "predictor-eval", "{tmp}/models"),
        c(k, "no logged trees", "predictor-eval", "{tmp}/run_nockpt"),
        c(k, "--mc", "predictor-eval", "{tmp}/run_nockpt", "--mc", "-1"),
        c(k, "predictor 'oracle'", "predictor-eval", "{tmp}/run_nockpt", "--predictors", "oracle"),
    ]
    k = "custom tasks and trackers"  # references to the user's code, datasets, loggers (docs/custom_tasks.md)
    qa = ("env.name=qa", "env.max_turns=1", "env.options={}")
    cases += [
        c(k, "nowhere.py", "train", "env.reward={tmp}/nowhere.py:f"),
        c(k, "'nope'", "train", "env.reward={tmp}/user_code.py:nope"),
        c(k, "env.reward", "train", "env.reward={tmp}/user_code.py:two_args"),
        c(k, "env.reward", "train", "env.reward=user_code.compute"),
        c(k, "env.name", "train", "env.name={tmp}/user_code.py:NotAnEnv", "env.options={}"),
        c(k, "env.tools", "train", "env.tools=[{tmp}/user_code.py:two_args]"),
        c(k, "data.train_files", "train", "data.train_files={tmp}/qa.jsonl"),
        c(k, "data.train_files", "train", *qa),
        c(k, "data.prompt_key", "train", *qa, "data.train_files={tmp}/qa.jsonl"),
        c(k, "trainer.loggers", "train", "trainer.loggers=[console]"),
        c(k, "trainer.loggers", "train", "trainer.loggers=[jsonl,neptune]"),
    ]
    return cases


CASES = hand_cases() + range_cases()


# ------------------------------------------------------------------------------------------------
# the bad files, and running one case


def make_inputs(tmp: Path) -> None:
    """The files the cases point at, under `tmp`."""
    import torch
    from safetensors.torch import save_file

    from tracerl.config import Config, dump_config

    qa = {"question": "Who?", "answers": ["Ada"], "paragraphs": [{"title": "Ada", "text": "Ada wrote it.",
                                                                   "is_supporting": True}]}
    line = json.dumps(qa) + "\n"
    files = {
        "qa.jsonl": line, "bad.yaml": "trainer: [unclosed\n", "list.yaml": "- a list\n",
        "deep.yaml": "[" * 5000 + "]" * 5000 + "\n", "unknown_key.yaml": "trainer:\n  learning_rate: 3\n",
        "arith.yaml": "env: {name: arith, max_turns: 1, options: {}}\n",
        "deep.jsonl": "[" * 100000 + "]" * 100000 + "\n", "broken.jsonl": line + '{"question": \n',
        "not_object.jsonl": "[1, 2]\n", "no_answer.jsonl": '{"question": "Who?"}\n', "empty.jsonl": "\n",
        "user_code.py": "def two_args(a, b):\n    return 1.0\n\nclass NotAnEnv:\n    pass\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "bad_utf8.yaml").write_bytes(b"trainer:\n  lr: \xff\n")
    (tmp / "bad_utf8.jsonl").write_bytes(line.encode() + b'{"question": "\xff"}\n')

    weights = tmp / "weights.safetensors"
    save_file({"w": torch.zeros(64)}, str(weights))
    good = {"config.json": '{"model_type": "qwen3"}', "tokenizer.json": "{}"}
    models = {
        "bad_config": {**good, "config.json": '{"model_type": "qwen3",'},
        "no_type": {**good, "config.json": "{}"},
        "bad_weights": {**good, "model.safetensors": b"not a safetensors file" * 4},
        "truncated": {**good, "model.safetensors": weights.read_bytes()[:-40]},
        "bad_index": {**good, "model.safetensors.index.json": '{"weight_map": {"w": "model-00001-of-00002.safetensors"}}'},
        "bad_tokenizer": {**good, "tokenizer.json": "{broken"},
        "no_tokenizer": {"config.json": good["config.json"]},
    }
    for name, content in models.items():
        d = tmp / "models" / name
        d.mkdir(parents=True)
        content = {"model.safetensors": weights.read_bytes(), **content} if "index" not in name else content
        for fname, data in content.items():
            (d / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
    run = tmp / "run_nockpt"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(Config()))


class Reached(BaseException):
    """The tripwire: a bad input got as far as building a model or taking the run directory."""


def _tripwire(what: str):
    def trip(*a, **k):
        raise Reached(what)
    return trip


@contextlib.contextmanager
def guarded(tmp: Path):
    """Model building and the run directory raise Reached; no CUDA device; caches and cwd in `tmp`."""
    import torch

    import tracerl.calibrate
    import tracerl.models.io
    import tracerl.sft
    import tracerl.train

    patches = [mock.patch.object(torch.cuda, "is_available", lambda: False),
               mock.patch.object(torch.cuda, "device_count", lambda: 0),
               mock.patch.dict(os.environ, {"TRACERL_CACHE": str(tmp / "cache")}),
               mock.patch.object(tracerl.train.Trainer, "_take_run_dir", _tripwire("the run directory"))]
    for module, name in ((tracerl.sft, "train_tokenizer"), (tracerl.sft, "build_tiny_model"),
                         (tracerl.sft, "load_policy"), (tracerl.train, "load_policy"),
                         (tracerl.calibrate, "load_policy"), (tracerl.models.io, "load_policy")):
        patches.append(mock.patch.object(module, name, _tripwire(f"model building ({name})")))
    cwd = os.getcwd()
    work = tmp / "cwd"
    work.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        os.chdir(work)
        try:
            yield
        finally:
            os.chdir(cwd)


def run_case(case: Case, tmp: Path) -> tuple[object, str]:
    """(exit status, stderr) of `tracerl ARGS` in this process, inside `guarded`."""
    from tracerl.cli import main

    args = [a.replace("{tmp}", str(tmp)) for a in case.args]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def row(n: int, case: Case, message: str) -> str:
    def cell(text: str) -> str:
        return "`` " + text.replace("|", "\\|") + " ``"
    return f"| {n} | {cell(case.shown)} | {cell(message)} | {case.was} |"


def table(messages: list[str]) -> str:
    """docs/bad_input.md from the messages of CASES, in order."""
    out = ["# Bad input: one line each", "",
           "Every input below stops `tracerl` with exit status 2 and the one line shown on stderr (no traceback;",
           "`tracerl --debug ...` shows it). Config errors, the environment's typed options (`tracerl train",
           "--help-config` lists them) and the device are checked right after the config is loaded, before any",
           "model is built or any file is written. `<tmp>` stands for a folder of deliberately broken files.",
           "The last column says how the input was handled before issue 19: a traceback, silently accepted,",
           "late (one line, but only after the model was built or the run directory taken), the usage block",
           "(argparse's usage lines, then the error), or (blank) already one line.", "",
           "Generated from `tests/test_bad_input.py` (which checks every message against this file); after",
           "changing a message run `.venv/bin/python tests/test_bad_input.py --write-table`.", "",
           f"{len(CASES)} inputs; before issue 19 {sum(c.was == TRACEBACK for c in CASES)} gave a traceback, "
           f"{sum(c.was == SILENT for c in CASES)} were silently accepted, {sum(c.was == LATE for c in CASES)} "
           f"stopped late and {sum(c.was == USAGE for c in CASES)} printed the usage block."]
    kind = None
    for n, (case, message) in enumerate(zip(CASES, messages), 1):
        if case.kind != kind:
            kind = case.kind
            out += ["", f"## {kind}", "", "| # | input | message | before |", "|---|---|---|---|"]
        out.append(row(n, case, message))
    return "\n".join(out) + "\n"


def one_line(rc, stderr: str, tmp: Path) -> str:
    """The message, after checking the exit status and that stderr is one line without a traceback."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc not in (0, None), f"exit status {rc}; stderr: {stderr[-2000:]}"
    assert len(lines) == 1 and len(stderr.strip().splitlines()) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and lines[0].startswith("error"), stderr[-3000:]
    return lines[0].replace(str(tmp), "<tmp>")


# ------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def inputs():
    with tempfile.TemporaryDirectory(prefix="tracerl-bad-input-") as tmp:
        tmp = Path(tmp).resolve()
        make_inputs(tmp)
        yield tmp


@pytest.fixture(scope="module")
def doc_rows() -> list[str]:
    return DOC.read_text().splitlines() if DOC.is_file() else []


def test_the_table_is_big_and_has_no_duplicates():
    assert len(CASES) >= 118
    assert len({c.args for c in CASES}) == len(CASES), [c.shown for c in CASES if CASES.count(c) > 1]
    assert set(WAS) <= {" ".join(c.args) for c in CASES}, set(WAS) - {" ".join(c.args) for c in CASES}


@pytest.mark.parametrize("n", range(1, len(CASES) + 1), ids=[c.shown[8:60] for c in CASES])
def test_bad_input_is_one_line(n, inputs, doc_rows):
    case = CASES[n - 1]
    try:
        with guarded(inputs):
            rc, stderr = run_case(case, inputs)
    except Reached as e:
        pytest.fail(f"{case.shown} reached {e} instead of stopping with a one-line error")
    message = one_line(rc, stderr, inputs)
    assert case.needle.replace("{tmp}", "<tmp>") in message, message
    assert rc == 2, (rc, message)
    assert not list((inputs / "cwd").iterdir()), "a failed command left files behind"
    assert row(n, case, message) in doc_rows, (
        f"docs/bad_input.md does not hold row {n} as printed now:\n{row(n, case, message)}\n"
        "regenerate it: .venv/bin/python tests/test_bad_input.py --write-table")


def test_the_doc_holds_exactly_the_cases(doc_rows):
    rows = [r for r in doc_rows if r.startswith("| ") and not r.startswith("| #")]
    assert [r.split(" | ")[1] for r in rows] == [row(n, c, "").split(" | ")[1] for n, c in enumerate(CASES, 1)]


def test_every_shipped_config_still_validates():
    """Every YAML under configs/ (and examples/, if any): the config, its typed env.options, its methods."""
    from tracerl.config import load_config
    from tracerl.envs import check_options
    from tracerl.methods import check_methods

    paths = sorted(REPO.glob("configs/**/*.yaml")) + sorted(REPO.glob("examples/**/*.yaml"))
    assert len(paths) >= 8
    for p in paths:
        cfg = load_config(p)
        check_options(cfg.env.name, cfg.env.options, cfg.env.max_turns)
        check_methods(cfg)


def test_options_models_match_the_constructors():
    """The typed options are each environment's keyword arguments, with the same defaults."""
    import inspect

    from tracerl.envs import ENVIRONMENTS, INPUT_KEYS, SHARED_KEYS, options_model
    from tracerl.envs.world import WorldConfig

    for name in ENVIRONMENTS.names():
        cls, model = ENVIRONMENTS.get(name), options_model(name)
        params = {k: p.default for k, p in inspect.signature(cls).parameters.items()
                  if k not in SHARED_KEYS + INPUT_KEYS and p.kind is not p.VAR_KEYWORD}
        params.update({k: getattr(WorldConfig(), k) for k in getattr(cls, "extra_options", ())})
        fields = {k: f.get_default(call_default_factory=True) for k, f in model.model_fields.items()}
        if "hop_mix" in fields:
            fields["hop_mix"] = tuple(sorted(fields["hop_mix"].items()))
        assert fields == params, name
        assert all(f.description for f in model.model_fields.values()), name


def test_options_come_back_as_given():
    """The check does not rewrite env.options (run configs and SFT cache keys stay as they were)."""
    from tracerl.config import load_config
    from tracerl.envs import check_options

    cfg = load_config(None, ["env.options={top_k: 2, hop_mix: {1: 1, 2: 1}, heldout_fraction: 0.5}"])
    assert check_options(cfg.env.name, cfg.env.options, cfg.env.max_turns) is cfg.env.options
    assert cfg.env.options == {"top_k": 2, "hop_mix": {1: 1, 2: 1}, "heldout_fraction": 0.5}
    assert load_config(None, ["env.name=arith", "env.max_turns=1"]).env.options == {}  # multihop's default is not theirs


def test_tiny_vocab_floor_is_the_tokenizers():
    from tracerl.config import MIN_TINY_VOCAB
    from tracerl.models.tiny import train_tokenizer

    assert len(train_tokenizer(["a b c"], vocab_size=MIN_TINY_VOCAB)) <= MIN_TINY_VOCAB
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["a b c"], vocab_size=MIN_TINY_VOCAB - 1)


def test_make_env_checks_options_like_the_config():
    from tracerl.envs import make_env
    from tracerl.errors import OptionError

    with pytest.raises(OptionError, match=r"config key 'env.options.top_k': must be >= 1, got 0"):
        make_env("multihop", seed=0, top_k=0)
    with pytest.raises(OptionError, match="single-turn"):
        make_env("arith", seed=0, max_turns=3)


def test_a_model_transformers_cannot_load_is_one_line(inputs):
    from tracerl.errors import ModelLoadError
    from tracerl.models.io import load_policy

    d = inputs / "models" / "unknown_type"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text('{"model_type": "no_such_architecture"}')
    (d / "tokenizer.json").write_text("{}")
    (d / "model.safetensors").write_bytes((inputs / "weights.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=f"model path {d} cannot be loaded") as e:
        load_policy(d)
    assert "\n" not in str(e.value)


def test_debug_shows_the_traceback(inputs):
    from tracerl.cli import main
    from tracerl.errors import TracerlError

    for args in (["--debug", "train", "env.options.top_k=0"], ["train", "--debug", "model.num_layers=0"]):
        with pytest.raises(TracerlError, match="env.options.top_k|model.num_layers"):
            main(args)


def test_compare_creates_the_folder_of_out(tmp_path):
    from tracerl.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("rollout: {allocator: uniform}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "cum_gen_tokens": 10, "gen_tokens": 10}) + "\n")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["compare", str(run), "--out", str(tmp_path / "a" / "b" / "cmp.html")]) == 0
    assert (tmp_path / "a" / "b" / "cmp.html").is_file()


@pytest.mark.parametrize("args", [["train", "env.options.top_k=0"], ["eval", "preset", "--split", "bogus"]])
def test_the_installed_command_prints_one_line(args, tmp_path):
    """The same through a fresh interpreter (no in-process capture)."""
    env = {**os.environ, "TRACERL_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "tracerl.cli", *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not list(tmp_path.glob("runs"))


# ------------------------------------------------------------------------------------------------


def write_table() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    messages = []
    with tempfile.TemporaryDirectory(prefix="tracerl-bad-input-") as tmp:
        tmp = Path(tmp).resolve()
        make_inputs(tmp)
        for case in CASES:
            with guarded(tmp):
                rc, stderr = run_case(case, tmp)
            messages.append(one_line(rc, stderr, tmp))
    DOC.write_text(table(messages))
    print(f"wrote {DOC} ({len(CASES)} inputs)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-table"]:
        sys.exit("usage: python tests/test_bad_input.py --write-table")
    write_table()
