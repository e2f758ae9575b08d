"""The generation interface every rollout, evaluation, calibration and annotator call goes through.

A backend takes batched token-id prompts (which may share prefixes: the chains of one prompt, the
branches of one tree node) and returns, per prompt, the sampled token ids, their log-probs under the
sampling distribution softmax(logits / T) and why the turn ended, stamped with the policy version that
produced them. `load_weights` hands it the trainer's weights after an update. Implementations:
`backends/hf.py` (the in-process Hugging Face decode loop: the CPU default and the reference in
tests), `backends/vllm_engine.py` (a vLLM engine in this process or its engine-core process) and
`backends/server.py` (an OpenAI-compatible completion server reached over HTTP). docs/engines.md.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import torch


@dataclass
class Generation:
    token_ids: list[int]  # sampled tokens, including a final EOS / stop-string token
    logprobs: list[float]  # log softmax(logits / T) of the token (T = 1 when greedy); what the trainer recomputes
    stopped: str  # "stop" (stop string), "eos", "length" (hit max_new_tokens or context cap)
    # generate(return_hidden=True): the last layer's hidden state (after the final norm) at the prompt's
    # last token, computed by the prefill this call already runs; float32, detached, on the CPU
    prefix_hidden: torch.Tensor | None = None
    version: int = 0  # the policy version (optimizer updates loaded) that sampled these tokens


@dataclass
class PrefillStats:
    computed: int  # prompt tokens run through the model in this call
    saved: int = 0  # prompt tokens not recomputed: a shared prefix's KV cache was reused (copied or cached)


@dataclass
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()


@runtime_checkable
class GenerationBackend(Protocol):
    """What the rest of tracerl may use of a generation engine (docs/engines.md §1)."""

    tokenizer: Any  # the Hugging Face tokenizer of the policy (prompts are encoded, turns decoded with it)
    max_context: int  # a prompt plus its continuation never exceeds this many tokens
    pad_id: int
    version: int  # the policy version the next generation samples from
    # True when `generate(return_hidden=True)` fills `Generation.prefix_hidden` from its own prefill;
    # otherwise the caller takes hidden states from a prefill-only pass of the trainer's model
    returns_hidden: bool

    def generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
                 reuse_prefix: bool = True, return_hidden: bool = False) -> tuple[list[Generation], PrefillStats]:
        """One continuation per prompt, in order. Seeded through `generator`: equal seeds, equal tokens."""
        ...

    def load_weights(self, source: Mapping[str, torch.Tensor] | None, version: int) -> None:
        """Sample from these weights (Hugging Face parameter names) from now on, as policy `version`.
        `None`: the backend already shares the trainer's parameters; only the version moves."""
        ...

    def decode(self, token_ids: list[int]) -> str: ...

    def step_metrics(self) -> dict[str, float]:
        """Engine figures since the last call (prefix-cache hit rate, sync seconds); {} when none."""
        ...

    def sleep(self) -> None:
        """Free the engine's memory for an update (GPU colocation); a no-op where nothing can be freed."""
        ...

    def wake(self) -> None: ...


class HiddenStates(Protocol):
    """A prefill-only pass giving the last-layer hidden state at each prompt's last token (features of
    the TRACE success predictor)."""

    def prefix_hidden(self, prompts: list[list[int]], batch_size: int = 64) -> tuple[list[torch.Tensor], PrefillStats]: ...


def untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without tensors that share storage with an earlier one (a tied LM head: vLLM's
    loader takes the embedding and skips the head), detached, where they are."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def shared_free_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`untied(state)`, contiguous and on the CPU: what safetensors can write and vLLM's loader reads."""
    return {name: t.to("cpu").contiguous() for name, t in untied(state).items()}


SEED_RANGE = 2**31 - 1


def request_seed_base(generator: torch.Generator | None, params: SamplingParams, n: int) -> int | None:
    """An engine's seeds for one call: one draw from the caller's generator, request i gets base + i
    (equal generator state, equal tokens); None when nothing is sampled (greedy) or no generator is given."""
    if generator is None or params.temperature <= 0:
        return None
    return int(torch.randint(0, SEED_RANGE - n, (1,), generator=generator))


@contextlib.contextmanager
def weights_file(source: Mapping[str, torch.Tensor], sync_dir: str) -> Iterator[str]:
    """The state dict written once as a safetensors file in `sync_dir` (a RAM disk) for an engine to
    reload; removed when the block ends."""
    from safetensors.torch import save_file

    Path(sync_dir).mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="tracerl-weights-", suffix=".safetensors", dir=sync_dir)
    os.close(fd)
    try:
        save_file(shared_free_state(source), tmp)
        yield tmp
    finally:
        os.unlink(tmp)
