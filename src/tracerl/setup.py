"""What every command does before it runs a model: threads, the environment, the initial policy.

    cfg = load_config(path, overrides)
    apply_threads(cfg)
    env = build_env(cfg)
    model_dir = resolve_model_path(cfg)   # the SFT warm start (trained once, cached) or the pretrained policy

`tracerl train`, `sft`, `eval` and `calibrate` (and the benchmarks) start here (`preflight` first), so that they agree on
what a config means before the first forward pass.

This module also puts the SFT warm start together (`warm_start`): the recipe in `tracerl.sft` receives
the environment, the pretrained base and, for `sft.teacher_share`, the distillation teacher's note
demos from here, and so imports neither this module nor `tracerl.distill`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tracerl.backends.base import GenerationBackend
from tracerl.backends.hf import HFPolicy
from tracerl.config import Config, ConfigError
from tracerl.distill.teacher import TeacherNoteDemos
from tracerl.envs import make_env
from tracerl.envs.answers import set_em_mode
from tracerl.envs.base import Environment
from tracerl.sft import SFTInputs, run_sft


def preflight(cfg: Config, model_dir: Path | None = None) -> None:
    """What a command that runs the model checks after the config validated and before it builds or
    writes anything: the environment's typed options, method names and combinations, the device, and
    the model directory it will load (model.path, or `model_dir` when given)."""
    from tracerl.config import check_device, check_weight_sync
    from tracerl.envs import check_options
    from tracerl.methods import check_methods
    from tracerl.models.io import check_model_dir
    from tracerl.trackers import check_available

    check_options(cfg.env.name, cfg.env.options, cfg.env.max_turns)  # typed env.options (the config knows no env)
    check_custom_task(cfg)
    check_available(cfg.trainer.loggers)  # wandb / mlflow installed when named
    check_methods(cfg)
    check_device(cfg.run.device)
    check_weight_sync(cfg)  # engine.weight_sync / engine.device: GPU-only modes, where the engine runs
    if cfg.lora.enabled:
        from tracerl.distributed import launched_size
        from tracerl.models.lora import require_peft

        require_peft()
        if launched_size() > 1:
            raise ConfigError("lora.enabled=true is not supported under torchrun (FSDP2 shards the full weights "
                              "only); train LoRA in one process, or drop lora.enabled for a distributed run")
        if cfg.engine.name != "hf":
            raise ConfigError(f"lora.enabled=true samples with engine.name=hf only (engine.name={cfg.engine.name} "
                              "would be sent the adapted weights under names it does not know); use engine.name=hf")
    if model_dir is not None:
        check_model_dir(model_dir)
    elif cfg.model.preset == "path":
        check_model_dir(cfg.model.path)


def check_custom_task(cfg: Config) -> None:
    """The user's code and data the config names (docs/custom_tasks.md), each failure one line: env.reward
    loads and has verl's or TRL's signature, env.tools load, the environment takes what it is given
    (`tasks` for data.*, `tools`), and has demonstrations when an SFT warm start needs them."""
    from tracerl.envs import env_class, takes
    from tracerl.envs.custom import load_reward, load_tools

    cls = env_class(cfg.env.name)
    if cfg.env.reward is not None:
        load_reward(cfg.env.reward)
    if cfg.env.tools:
        load_tools(cfg.env.tools)
        if not takes(cls, "tools"):
            raise ConfigError(f"config key 'env.tools': environment {cfg.env.name!r} takes no tools argument")
    if cfg.data.given() and not takes(cls, "tasks"):
        raise ConfigError(f"config key 'data.train_files': environment {cfg.env.name!r} makes its own tasks (it takes no "
                          "tasks argument); a dataset goes to env.name=qa or to your own environment")
    if not cfg.data.given() and getattr(cls, "needs_tasks", False):
        raise ConfigError(f"config key 'data.train_files': environment {cfg.env.name!r} reads its tasks from a dataset; "
                          "set data.train_files (and data.validation_files or data.validation_size)")
    if uses_sft(cfg) and not callable(getattr(cls, "oracle_turns", None)):
        raise ConfigError(f"config key 'env.name': {cfg.env.name} has no oracle_turns, which the SFT warm start needs "
                          f"(model.preset={cfg.model.preset}{'' if cfg.model.preset == 'tiny' else ', sft.pretrained=true'}); "
                          "add it or start from a pretrained model without SFT")


def apply_threads(cfg: Config) -> None:
    """run.threads (torch intra-op threads) for every command that runs the model: train, sft, eval, calibrate."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def build_env(cfg: Config, log=None) -> Environment:
    """The config's environment (env.name with its seed, turn cap and options; the tasks of data.* and the
    tools of env.tools when given); its answers are matched as eval.em says (the reward in training and the
    EM of evaluation alike), and with env.reward its episodes are scored by the user's function."""
    from tracerl.envs.custom import RewardEnv, load_reward, load_tools

    set_em_mode(cfg.eval.em)
    inputs = {}
    if cfg.data.given():
        inputs["tasks"] = dataset_tasks(cfg)
    if cfg.env.tools:
        inputs["tools"] = load_tools(cfg.env.tools)
    env = make_env(cfg.env.name, seed=cfg.env.seed, max_turns=cfg.env.max_turns, **inputs, **cfg.env.options)
    if cfg.env.reward is not None:
        env = RewardEnv(env, load_reward(cfg.env.reward), log)
    return env


def dataset_tasks(cfg: Config) -> dict[str, list]:
    """{split: tasks} of data.*_files (`tracerl.envs.dataset`); data.validation_size holds train rows out
    (a seeded draw) as the validation split."""
    import random

    from tracerl.envs.dataset import load_tasks
    from tracerl.errors import DataError
    from tracerl.task import SPLITS

    d = cfg.data
    keys = dict(prompt_key=d.prompt_key, answer_key=d.answer_key, extra_keys=d.extra_keys, id_key=d.id_key,
                source_key=d.source_key, max_rows=d.max_rows)
    out = {}
    for split in SPLITS:
        files = getattr(d, f"{split}_files")
        files = [files] if isinstance(files, str) else list(files or [])
        out[split] = load_tasks(files, split, **keys)
    if d.validation_size:
        train = out["train"]
        if d.validation_size >= len(train):
            raise DataError(f"config key 'data.validation_size' = {d.validation_size} leaves no train rows "
                            f"(data.train_files hold {len(train)})")
        picked = set(random.Random(f"data:{cfg.env.seed}").sample(range(len(train)), d.validation_size))
        out["validation"] = [t for i, t in enumerate(train) if i in picked]
        out["train"] = [t for i, t in enumerate(train) if i not in picked]
    return out


def build_backend(cfg: Config, model, tokenizer, model_dir: Path, device: str) -> GenerationBackend:
    """The generation backend engine.name names (docs/engines.md). `model` is the policy module the hf
    backend samples from; vllm starts an engine on `model_dir` (the weights at start; the trainer then
    pushes its own after every update); server connects to engine.url."""
    e = cfg.engine
    if e.name == "hf":
        return HFPolicy(model, tokenizer, device, cfg.model.max_context)
    if e.name == "vllm":
        from tracerl.backends.vllm_engine import VLLMPolicy, check_vllm_model

        check_vllm_model(model.config, device)
        return VLLMPolicy(model_dir, tokenizer, cfg.model.max_context, e, device, cfg.run.seed,
                          cfg.model.dtype if e.dtype == "auto" else e.dtype, cfg.rollout.batch_size)
    from tracerl.backends.server import ServerPolicy

    return ServerPolicy(e.url, tokenizer, cfg.model.max_context, e)


def uses_sft(cfg: Config) -> bool:
    """Whether the initial policy is an SFT warm start (tiny: sft.enabled; pretrained: sft.pretrained)."""
    return cfg.sft.enabled if cfg.model.preset == "tiny" else cfg.sft.pretrained


def pretrained_path(cfg: Config) -> Path:
    """The pretrained policy of a non-tiny preset: the converted SmolLM2, or the user's model path."""
    if cfg.model.preset == "smollm2-135m":
        from tracerl.models.smollm2 import smollm2_path  # converts the shipped GGUF on first use

        return smollm2_path()
    return Path(cfg.model.path)


def warm_start(cfg: Config, force: bool = False, log=print) -> Path:
    """The SFT warm start of cfg (cached by `tracerl.sft.sft_key`; trained on a miss or with `force`)."""
    inputs = SFTInputs(env=lambda: build_env(cfg), base=lambda: pretrained_path(cfg), notes=TeacherNoteDemos())
    return run_sft(cfg, inputs, force=force, log=log)


def resolve_model_path(cfg: Config, log=print) -> Path:
    """Where the initial policy comes from: the SFT cache, the converted SmolLM2, or a user path."""
    if cfg.model.preset == "tiny" or uses_sft(cfg):
        return warm_start(cfg, log=log)
    return pretrained_path(cfg)
