"""Head-averaged attention maps of a few layers, without switching the model to eager attention.

Fused kernels (SDPA, flash) never materialise attention probabilities, and in transformers 5
`output_attentions=True` under SDPA returns an empty tuple. Eager attention on every layer would store
B·H·N² floats per layer. Instead (docs/flowtracer.md §6) hooks on the chosen layers capture their
post-norm queries and keys and the rotary (cos, sin) the layer receives, and recompute
`softmax(q kᵀ · scaling + causal mask)` in fp32, `chunk_rows` query rows at a time, adding the
head sum into one (B, N, N) buffer. No gradient flows through any of it.

Two ways to run it: `AttentionTap` as a context manager around a forward the trainer runs anyway
(the update's first forward: the maps then cost only their own recomputation), or
`attention_maps`, a separate forward that stops right after the last chosen layer (the layers
above it and the LM head never run).

Supported: Hugging Face Llama-style decoders (`model_type` llama — SmolLM2 —, qwen2, qwen3) with full
causal attention (no sliding window). Right padding only (the padded rows' real tokens never
attend to padding, so each row's top-left n×n block is exact).
"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor

from tracerl.errors import TracerlError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class UnsupportedModelError(TracerlError, ValueError):
    """The model's attention cannot be traced by these hooks."""


class _StopForward(Exception):
    """Raised by the last chosen layer's hook: nothing above it is needed."""


def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def default_layers(total: int, count: int = 5) -> list[int]:
    """`count` evenly spaced layer indices in [⌊L/3⌋, ⌊2L/3⌋] (docs/flowtracer.md §3), deduplicated."""
    lo, hi = total // 3, (2 * total) // 3
    if count <= 1 or hi <= lo:
        return [lo] if count >= 1 else []
    return sorted({round(lo + i * (hi - lo) / (count - 1)) for i in range(count)})


def check_supported(model, layers: list[int] | None = None) -> None:
    """One-line error unless the model's attention can be traced (and `layers` exist)."""
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"FlowTracer attention tracing supports model types "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}; this model is {kind!r}")
    total = num_layers(model)
    for i in layers or []:
        if not 0 <= i < total:
            raise UnsupportedModelError(f"credit.layers: layer {i} does not exist (the model has {total} layers)")
        attn = _attention_module(model, i)
        if getattr(attn, "sliding_window", None):
            raise UnsupportedModelError(f"FlowTracer: layer {i} uses sliding-window attention, which is not supported")


def _attention_module(model, i: int):
    return model.base_model.layers[i].self_attn


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """(B, N, H·d) or (B, N, H, d) -> (B, H, N, d)."""
    b, n = x.shape[:2]
    return x.reshape(b, n, -1, head_dim).transpose(1, 2)


def causal_head_sum(q: Tensor, k: Tensor, scaling: float, chunk_rows: int, out: Tensor) -> None:
    """Add the sum over query heads of softmax(q kᵀ·scaling + causal mask) into `out` (B, N, N).

    q (B, H, N, d), k (B, KV, N, d) with H = KV·G (grouped-query attention: query head j reads key
    head j // G, as repeat_kv does). Computed in fp32, `chunk_rows` query rows at a time; keys after
    a chunk's last row are never scored and only the chunk's diagonal block needs the causal mask."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    g = h // kv
    q = (q.float() * scaling).reshape(b, kv, g, n, d)
    kt = k.float().transpose(-1, -2)  # (B, KV, d, N)
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        rows = r1 - r0
        scores = torch.matmul(q[:, :, :, r0:r1].reshape(b, kv, g * rows, d), kt[..., :r1])  # (B, KV, G·r, r1)
        scores = scores.view(b, kv, g, rows, r1)
        future = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu(1)
        scores[..., r0:r1].masked_fill_(future, float("-inf"))
        out[:, r0:r1, :r1] += scores.softmax(-1).sum(dim=(1, 2))


class AttentionTap:
    """Hooks on the chosen layers of `model` that add each forward's head-summed attention
    probabilities into `self.maps` (B, N, N), allocated at the first hooked layer from the batch
    shape. `mean()` is the head and layer mean. With `stop_after_last`, the forward is cut right
    after the last chosen layer (use `run`, which swallows that stop)."""

    def __init__(self, model, layers: list[int], chunk_rows: int = 128, stop_after_last: bool = False,
                 gather: list[tuple[int, Tensor]] | None = None):
        check_supported(model, layers)
        self.model, self.layers, self.chunk_rows = model, sorted(set(layers)), chunk_rows
        self.stop_after_last = stop_after_last
        # gather: maps of token subsequences instead of whole rows — (batch row, (n,) indices) each, for
        # packed trees: a leaf's tokens, whose queries and keys carry their own path positions
        self.gather = gather
        self.maps: Tensor | list[Tensor] | None = None
        self.heads = 0
        self.seconds = 0.0  # time spent in the hooks (the tap's own cost)
        self._hooks: list = []

    def __enter__(self) -> "AttentionTap":
        last = self.layers[-1]
        for i in self.layers:
            attn = _attention_module(self.model, i)
            rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            captured: dict[str, object] = {}

            def pre_hook(module, args, kwargs, captured=captured):
                captured["pos"] = kwargs.get("position_embeddings")

            def save(name, captured=captured):
                return lambda module, args, output: captured.__setitem__(name, output.detach())

            def post_hook(module, args, output, captured=captured, rope=rope, i=i):
                t0 = time.perf_counter()
                with torch.no_grad():
                    cos, sin = captured.pop("pos")
                    q = _heads(captured.pop("q"), module.head_dim)
                    k = _heads(captured.pop("k"), module.head_dim)
                    q, k = rope(q, k, cos, sin)
                    if self.gather is not None:
                        self._gathered_head_sum(q, k, module.scaling)
                    else:
                        if self.maps is None:
                            b, _, n, _ = q.shape
                            self.maps = torch.zeros(b, n, n, dtype=torch.float32, device=q.device)
                        causal_head_sum(q, k, module.scaling, self.chunk_rows, self.maps)
                    self.heads += q.shape[1]
                self.seconds += time.perf_counter() - t0
                if self.stop_after_last and i == last:
                    raise _StopForward

            self._hooks.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
            self._hooks.append(getattr(attn, "q_norm", attn.q_proj).register_forward_hook(save("q")))
            self._hooks.append(getattr(attn, "k_norm", attn.k_proj).register_forward_hook(save("k")))
            self._hooks.append(attn.register_forward_hook(post_hook))
        return self

    def __exit__(self, *exc) -> bool:
        for hk in self._hooks:
            hk.remove()
        self._hooks = []
        return False

    def _gathered_head_sum(self, q: Tensor, k: Tensor, scaling: float) -> None:
        """Per gathered subsequence: its tokens' queries and keys, in order, with the causal mask of the
        subsequence (exact for a leaf of a packed tree: its path is causal in its own order)."""
        if self.maps is None:
            self.maps = [torch.zeros(1, len(idx), len(idx), dtype=torch.float32, device=q.device)
                         for _, idx in self.gather]
        for (row, idx), out in zip(self.gather, self.maps):
            idx = idx.to(q.device)
            causal_head_sum(q[row:row + 1, :, idx], k[row:row + 1, :, idx], scaling, self.chunk_rows, out)

    def mean(self) -> Tensor | list[Tensor]:
        """The head and layer mean (B, N, N) — with `gather`, one (n, n) map per subsequence — computed
        in place: call once per forward."""
        if self.maps is None:
            raise RuntimeError("no forward ran through the tapped layers")
        if isinstance(self.maps, list):
            return [m.div_(self.heads)[0] for m in self.maps]
        return self.maps.div_(self.heads)

    @torch.no_grad()
    def run(self, input_ids: Tensor) -> Tensor:
        """One no-grad forward of the base model over `input_ids` (B, N); returns `mean()`."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self:
                self.model.base_model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            self.model.train(was_training)
        return self.mean()


def attention_maps(model, input_ids: Tensor, layers: list[int], chunk_rows: int = 128) -> Tensor:
    """(B, N, N) fp32: attention probabilities of `input_ids` (B, N) (right-padded, no attention
    mask), averaged over the heads of every layer in `layers` and over those layers, from a no-grad
    forward that stops after the last of them."""
    if not layers:
        raise ValueError("attention_maps needs at least one layer")
    return AttentionTap(model, layers, chunk_rows, stop_after_last=True).run(input_ids)
