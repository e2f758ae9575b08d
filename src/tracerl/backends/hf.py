"""Hugging Face transformers policy backend: batched sampling with a KV cache.

We run our own decoding loop instead of `model.generate` because the trainer needs, per row, the
exact sampled token ids, their log-probabilities under the model, and per-row stop strings (a turn
ends at `</search>` or `</answer>`), all with a seeded generator so runs replay exactly.
"""

from __future__ import annotations

import inspect
import time
from typing import Mapping

import torch
from transformers import DynamicCache

from tracerl.backends.base import Generation, PrefillStats, SamplingParams

__all__ = ["HFPolicy", "Generation", "PrefillStats", "SamplingParams"]


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float32 -> sampled ids (B,)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    # inverse-CDF draw, one uniform per row: the same categorical law as torch.multinomial, without
    # the exponential noise multinomial draws over the whole vocabulary (16% of a rollout's time here)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class HFPolicy:
    """Wraps an AutoModelForCausalLM + tokenizer for batched turn generation (a `GenerationBackend`).

    It samples from the module it is given: in one process that is the trained policy itself, so
    `load_weights(None, v)` only moves the version; under torchrun it is an unsharded copy that
    `load_weights(full_state, v)` reloads."""

    returns_hidden = True

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu", max_context: int = 2048):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_context = max_context
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._stop_tail = 8  # tokens decoded to look for a stop string at each step
        # transformers 5.x names the KV-cache argument `cache` (and warns on `past_key_values`); 4.x has only
        # `past_key_values`
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.version = 0
        self._features_s: float | None = None  # seconds in prefix_hidden since the last step_metrics (None: never)

    def load_weights(self, source: Mapping[str, torch.Tensor] | None, version: int) -> None:
        if source is not None:
            self.model.load_state_dict(source)
        self.version = version

    def step_metrics(self) -> dict[str, float]:
        """`features_s`: seconds of prefill-only passes (`prefix_hidden`: the TRACE predictor's features)
        since the last call, once there has been one; {} before."""
        if self._features_s is None:
            return {}
        out, self._features_s = {"features_s": self._features_s}, 0.0
        return out

    def sleep(self) -> None:  # the model is the trainer's (or its copy): nothing to free
        pass

    def wake(self) -> None:
        pass

    def _final_norm(self):
        """The module whose output is the last layer's hidden state (the decoder's final norm), or None."""
        get = getattr(self.model, "get_decoder", None)
        decoder = get() if callable(get) else getattr(self.model, "model", None)
        norm = getattr(decoder, "norm", None)
        return norm if isinstance(norm, torch.nn.Module) else None

    def _left_padded(self, unique: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U, T = len(unique), max(len(p) for p in unique)
        ids = torch.full((U, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((U, T), dtype=torch.long)
        for i, p in enumerate(unique):  # left padding keeps every row's next token at position -1
            ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, T - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _prefill(self, ids, mask, pos, cache, capture: bool, **kwargs):
        """The prefill forward; with `capture`, also (U, H) float32 last-layer states at the last position."""
        if not capture:
            return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **{self._cache_kw: cache},
                              use_cache=cache is not None, **kwargs), None
        norm, seen = self._final_norm(), []
        if norm is None:  # no final-norm module to hook: ask the model for its hidden states
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **{self._cache_kw: cache},
                             use_cache=cache is not None, output_hidden_states=True, **kwargs)
            return out, out.hidden_states[-1][:, -1, :].detach().float().cpu()
        handle = norm.register_forward_hook(lambda _m, _i, o: seen.append(o[:, -1, :].detach().float().cpu()))
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **{self._cache_kw: cache},
                             use_cache=cache is not None, **kwargs)
        finally:
            handle.remove()
        return out, seen[0]

    @torch.no_grad()
    def prefix_hidden(self, prompts: list[list[int]], batch_size: int = 64) -> tuple[list[torch.Tensor], PrefillStats]:
        """Prefill only (no sampling): the last-layer hidden state at each prompt's last token, as
        `generate(..., return_hidden=True)` captures it. Identical prompts are run once."""
        t0 = time.perf_counter()
        index: dict[tuple[int, ...], int] = {}
        row_of = [index.setdefault(tuple(p), len(index)) for p in prompts]
        unique = [list(k) for k in index]
        was_training = self.model.training
        self.model.eval()
        states = []
        for start in range(0, len(unique), batch_size):
            ids, mask, pos = self._left_padded(unique[start:start + batch_size])
            extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(self.model) else {}
            states.append(self._prefill(ids, mask, pos, None, True, **extra)[1])
        if was_training:
            self.model.train()
        hidden = torch.cat(states) if states else torch.zeros(0)
        computed = sum(len(p) for p in unique)
        self._features_s = (self._features_s or 0.0) + time.perf_counter() - t0  # states are on the CPU: work done
        return [hidden[r] for r in row_of], PrefillStats(computed, sum(len(p) for p in prompts) - computed)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
        reuse_prefix: bool = True, return_hidden: bool = False,
    ) -> tuple[list[Generation], PrefillStats]:
        """Sample one continuation per prompt.

        Identical prompts in the batch (the G chains of a prompt, the branches taken from one tree
        node) are prefilled once and their KV cache rows are copied to every row that shares them;
        `reuse_prefix=False` prefills every row (the reference the reuse is tested against).
        `return_hidden=True` also fills `Generation.prefix_hidden` from that same prefill forward."""
        if not prompts:
            return [], PrefillStats(0, 0)
        was_training = self.model.training
        self.model.eval()
        B = len(prompts)
        lens = [len(p) for p in prompts]
        if reuse_prefix:
            index: dict[tuple[int, ...], int] = {}
            row_of = [index.setdefault(tuple(p), len(index)) for p in prompts]
            unique = [list(k) for k in index]
        else:
            row_of, unique = list(range(B)), prompts
        U = len(unique)
        ids, mask, pos = self._left_padded(unique)
        cache = DynamicCache()
        out, hidden = self._prefill(ids, mask, pos, cache, return_hidden)
        logits = out.logits[:, -1, :].float()
        if U < B:  # copy each shared prefix's cache row to all the rows that continue from it
            rows = torch.tensor(row_of, device=self.device)
            cache.batch_select_indices(rows)
            logits, mask, pos = logits[rows], mask[rows], pos[rows]
        next_pos = pos[:, -1] + 1
        computed = sum(len(p) for p in unique)
        stats = PrefillStats(computed, sum(lens) - computed)

        gens = [Generation([], [], "length", None if hidden is None else hidden[row_of[i]].clone(), self.version)
                for i in range(B)]
        budget = [min(params.max_new_tokens, self.max_context - n) for n in lens]
        alive = torch.tensor([b > 0 for b in budget], dtype=torch.bool)
        for _ in range(max(budget)):
            tok = _sample(logits, params, generator)
            logp = torch.log_softmax(logits / (params.temperature or 1.0), -1).gather(-1, tok[:, None]).squeeze(-1)
            tok_cpu, logp_cpu = tok.cpu().tolist(), logp.cpu().tolist()
            for i in range(B):
                if not alive[i]:
                    continue
                g = gens[i]
                g.token_ids.append(tok_cpu[i])
                g.logprobs.append(logp_cpu[i])
                if tok_cpu[i] in self.eos_ids:
                    g.stopped, alive[i] = "eos", False
                elif params.stop_strings and self._hit_stop(g.token_ids, params.stop_strings):
                    g.stopped, alive[i] = "stop", False
                elif len(g.token_ids) >= budget[i]:
                    alive[i] = False
            if not alive.any():
                break
            feed = torch.where(alive.to(self.device), tok, torch.full_like(tok, self.pad_id))
            mask = torch.cat([mask, alive.to(self.device, torch.long)[:, None]], dim=1)
            out = self.model(
                input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                **{self._cache_kw: cache}, use_cache=True,
            )
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        if was_training:
            self.model.train()
        return gens, stats

    def _hit_stop(self, token_ids: list[int], stops: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(token_ids[-self._stop_tail:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
