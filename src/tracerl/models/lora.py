"""LoRA adapters on a frozen policy, through `peft` (`pip install 'tracerl[lora]'`).

    check_targets(cfg.lora, base_dir)             # before anything is written: every target name exists
    wrapper = add_adapters(model, cfg.lora, base_dir, seed)   # in place: `model` now runs base + adapters
    save_adapter(wrapper, directory)              # adapter_config.json + adapter_model.safetensors
    load_adapter(wrapper, directory)              # exact: the saved tensors, bit for bit
    model, tok = load_adapted(directory)          # base + adapter merged into one plain model

The adapters are injected into the Hugging Face model itself (peft replaces each target `nn.Linear` by
a LoRA layer holding the frozen base weight), so the trainer, the generation backend and the objective
keep calling the same `LlamaForCausalLM` / `Qwen3ForCausalLM` object; the peft wrapper is kept beside it
for what only it does: switching the adapters off (the KL reference is the base model), saving them in
peft's own layout (a directory `PeftModel.from_pretrained` reads) and merging them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tracerl.config import ConfigError, LoraConfig
from tracerl.errors import ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PIN = "peft==0.21.2"  # the version the extra [lora] pins (installs against torch 2.13 / transformers 5.24)


def require_peft() -> None:
    """One-line ConfigError when peft is missing (asked before a LoRA run builds anything)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"lora.enabled=true needs the package peft: pip install 'tracerl[lora]' ({PEFT_PIN})")


def _peft_config(lora: LoraConfig, base_dir: str | os.PathLike | None):
    from peft import LoraConfig as PeftLoraConfig

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM",
                          base_model_name_or_path=str(base_dir) if base_dir is not None else None)


def check_targets(lora: LoraConfig, base_dir: str | os.PathLike) -> None:
    """One-line ConfigError unless every name in lora.target_modules matches a module of the model in
    `base_dir` that peft can adapt. Checked on an empty (meta-device) copy built from its config.json, so
    nothing is loaded. Stricter than peft, which is content when any one name matches."""
    from transformers import AutoConfig, AutoModelForCausalLM

    require_peft()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir, local_files_only=True))
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(lora.target_modules, list):
        for target in lora.target_modules:
            if not any(n == target or n.endswith("." + target) for n in names):
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                 if isinstance(m, torch.nn.Linear)})
                raise ConfigError(f"config key 'lora.target_modules': {target!r} names no module of "
                                  f"{type(model).__name__}; its linear layers are {', '.join(leaves)}")
    _inject(model, lora, None)


def _inject(model, lora: LoraConfig, base_dir: str | os.PathLike | None):
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, _peft_config(lora, base_dir))
    except (ValueError, TypeError) as e:  # e.g. a target that is not a layer peft can adapt
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"config key 'lora.target_modules': peft cannot adapt {lora.target_modules!r} "
                          f"({reason})") from None


def add_adapters(model, lora: LoraConfig, base_dir: str | os.PathLike, seed: int):
    """Freeze `model` and inject LoRA layers into it in place; returns peft's wrapper around it. The A
    matrices are drawn from `seed` (B starts at zero, so the adapted model equals the base until the first
    update); the global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapper = _inject(model, lora, None)
    # what adapter_config.json names as the base (peft would take the model's own name_or_path)
    wrapper.peft_config["default"].base_model_name_or_path = str(base_dir)
    return wrapper


def adapted_model(wrapper):
    """The Hugging Face model inside peft's wrapper, adapters in place."""
    return wrapper.base_model.model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values())


def save_adapter(wrapper, directory: str | os.PathLike) -> None:
    """peft's on-disk layout (what `PeftModel.from_pretrained` loads): adapter_config.json, naming the
    base directory, and the adapter tensors as safetensors."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    wrapper.peft_config["default"].save_pretrained(str(out))
    tensors = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(wrapper).items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})


class AdapterSaver:
    """What `checkpoint.save_checkpoint` saves as the policy of a LoRA run: the adapter only."""

    def __init__(self, wrapper):
        self.wrapper = wrapper

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_adapter(self.wrapper, directory)


def load_adapter(wrapper, directory: str | os.PathLike) -> None:
    """Put the adapter tensors saved in `directory` into `wrapper`, exactly; a file that does not fit
    (other target modules or rank) is one line."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
        result = set_peft_model_state_dict(wrapper, tensors)
    except (OSError, RuntimeError, ValueError) as e:
        reason = " ".join(str(e).split())[:200]
        raise ModelLoadError(f"{path} does not fit this run's adapters ({reason})") from None
    if result.unexpected_keys:
        raise ModelLoadError(f"{path} holds tensors this run's adapters lack: {result.unexpected_keys[0]}, ...")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ModelLoadError(f"{path} lacks adapter tensors of this run: {missing[0]}, ...")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> Path:
    """The base model directory an adapter directory names (one line if it names none or a broken one)."""
    from tracerl.models.io import check_model_dir, read_json_object

    p = Path(path)
    base = read_json_object(p / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{p / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    if is_adapter_dir(base):
        raise ModelLoadError(f"{p / ADAPTER_CONFIG} names another adapter ({base}) as its base")
    try:
        return check_model_dir(base)
    except ModelLoadError as e:
        raise ModelLoadError(f"the adapter in {p} needs its base model: {e}") from None


def load_adapted(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """`(model, tokenizer)` of an adapter directory: its base with the adapter merged in (a plain model)."""
    from transformers import AutoTokenizer

    from tracerl.models.io import load_policy

    p = Path(path)
    require_peft()
    from peft import PeftModel

    base, _ = load_policy(adapter_base(p), dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            wrapper = PeftModel.from_pretrained(base, str(p), is_trainable=False, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise ModelLoadError(f"adapter {p} cannot be loaded ({type(e).__name__}: {reason})") from e
    return wrapper.merge_and_unload(), tokenizer


def adapter_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Rank, alpha and targets of an adapter directory (for the export's provenance file)."""
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    return {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path")}
