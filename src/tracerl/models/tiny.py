"""A tokenizer trained on the task's own text and a ~1M-parameter Qwen3 policy built from scratch.

This is the CPU quickstart model: with a ~1k-token vocabulary fitted to the synthetic world, hidden 128
and 4 layers give ~0.92M parameters, small enough to SFT and then RL in minutes on two cores
(shared/CALIBRATION.md).
"""

from __future__ import annotations

from typing import Iterable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# The agent protocol's tags. They are whole tokens so the policy emits a tag in one step and stop
# strings match on a token boundary; they are not "special", so decode(skip_special_tokens=True)
# keeps them in the text the environment parses.
AGENT_TAGS = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<answer>",
    "</answer>",
    "<information>",
    "</information>",
)

# ChatML, as Qwen uses it. The {% generation %} block marks what the assistant writes (content and
# the closing <|im_end|>), so apply_chat_template(..., return_assistant_tokens_mask=True) yields the
# SFT loss mask.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    extra_tokens: Iterable[str] = AGENT_TAGS,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts`; `vocab_size` counts every token, tags included.

    Byte-level BPE is lossless: decode(encode(s)) == s for any string. The same texts give the same
    tokenizer.
    """
    extra = [t for t in extra_tokens if t not in SPECIAL_TOKENS]
    n_base = vocab_size - len(extra)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_base < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{len(alphabet) + len(SPECIAL_TOKENS) + len(extra)} tokens (256 bytes, specials, tags)"
        )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_base,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A freshly initialised Qwen3 policy sized to `tokenizer` (tied embeddings, float32, SDPA).

    `intermediate_size` defaults to 3 * hidden_size, which gives the ~0.92M (hidden 128) and ~3.4M
    (hidden 256) parameter counts of the calibration runs. The init depends only on `seed`; the
    global torch RNG is left untouched.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0, "
            f"got hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model.float()
