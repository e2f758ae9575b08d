"""An OpenAI-compatible completion server as the generation backend (`engine.name=server`).

Token ids in and out: each prompt is sent as a list of token ids to `/v1/completions` with
`return_token_ids` and `logprobs=0`, one request per prompt (each with its own seed, all in flight
together, so the branches of one tree node reach the server's prefix cache at once). Written against
vLLM's server (`python -m vllm.entrypoints.openai.api_server`, started with
`--logprobs-mode processed_logprobs` so log-probs are the tempered ones the loss uses). Weights follow
the trainer through the server's development endpoints (`VLLM_SERVER_DEV_MODE=1`): the state dict is
written to a safetensors file the server can read (`engine.sync_dir`; a shared path when the server
runs elsewhere), `/collective_rpc` reloads it with tracerl's worker extension and
`/reset_prefix_cache` drops blocks of the old weights. Every request has a timeout and bounded
retries; a server that stays down stops the run with one line naming it. docs/engines.md §6.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import torch

from tracerl.backends.base import Generation, PrefillStats, SamplingParams, request_seed_base, weights_file
from tracerl.errors import TracerlError


class ServerError(TracerlError):
    """The completion server is unreachable, refused a request or answered something unusable."""


class ServerPolicy:
    """A `GenerationBackend` that talks to a completion server over HTTP."""

    returns_hidden = False

    def __init__(self, url: str, tokenizer, max_context: int, engine_cfg, max_workers: int = 32):
        self.url, self.tokenizer, self.max_context, self.cfg = url.rstrip("/"), tokenizer, max_context, engine_cfg
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.version = 0
        self.last_sync_s = 0.0
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="tracerl-server")
        self.model = engine_cfg.served_model or self._first_model()

    # ---------------------------------------------------------------- HTTP
    def _call(self, path: str, body: dict | None = None, method: str = "POST") -> Any:
        """One request with `engine.timeout_s` and `engine.retries` retries (1 s, 2 s, ... apart)."""
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 8))
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:  # the server answered: a client error is not retried
                detail = " ".join(e.read().decode(errors="replace").split())[:200]
                if 400 <= e.code < 500:
                    raise ServerError(f"completion server {self.url} refused {path}: HTTP {e.code} {detail}") from e
                last = f"HTTP {e.code} {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                raise ServerError(f"completion server {self.url} answered {path} with something that is not JSON") from e
        raise ServerError(f"completion server {self.url} is not reachable ({path}, {self.cfg.retries + 1} attempts, "
                          f"timeout {self.cfg.timeout_s:g} s): {last}")

    def _first_model(self) -> str:
        got = self._call("/v1/models", method="GET")
        try:
            return got["data"][0]["id"]
        except (TypeError, KeyError, IndexError) as e:
            raise ServerError(f"completion server {self.url} lists no model at /v1/models") from e

    # ---------------------------------------------------------------- generation
    def _one(self, prompt: list[int], params: SamplingParams, room: int, seed: int | None) -> tuple[Generation, int]:
        body = {"model": self.model, "prompt": list(prompt), "max_tokens": room, "temperature": params.temperature,
                "top_p": params.top_p, "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
                "spaces_between_special_tokens": False, "include_stop_str_in_output": True}
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)
        if seed is not None:
            body["seed"] = seed
        got = self._call("/v1/completions", body)
        try:
            choice = got["choices"][0]
            ids = [int(t) for t in choice["token_ids"]]
            logps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            cached = int(((got.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        except (TypeError, KeyError, IndexError, ValueError) as e:
            raise ServerError(f"completion server {self.url} answered without token ids or log-probs ({e}); it must "
                              "support return_token_ids and logprobs (vLLM's OpenAI server does)") from e
        if len(logps) != len(ids):
            raise ServerError(f"completion server {self.url} gave {len(logps)} log-probs for {len(ids)} tokens")
        reason = choice.get("finish_reason")
        stopped = "length" if reason == "length" else ("stop" if isinstance(choice.get("stop_reason"), str) else "eos")
        return Generation(ids, logps, stopped, None, self.version), cached

    def generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
                 reuse_prefix: bool = True, return_hidden: bool = False) -> tuple[list[Generation], PrefillStats]:
        if return_hidden:
            raise ServerError("the server backend returns no hidden states: take them from the trainer's model")
        if not prompts:
            return [], PrefillStats(0, 0)
        base = request_seed_base(generator, params, len(prompts))
        gens: list[Generation | None] = [None] * len(prompts)
        futures = {}
        for i, p in enumerate(prompts):
            room = min(params.max_new_tokens, self.max_context - len(p))
            if room <= 0:
                gens[i] = Generation([], [], "length", None, self.version)
            else:
                futures[i] = self._pool.submit(self._one, p, params, room, None if base is None else base + i)
        cached = 0
        for i, fut in futures.items():
            gens[i], c = fut.result()
            cached += c
        total = sum(len(prompts[i]) for i in futures)
        return gens, PrefillStats(total - cached, cached)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def step_metrics(self) -> dict[str, float]:
        return {"engine_sync_s": self.last_sync_s}

    def sleep(self) -> None:  # a remote server manages its own memory
        pass

    def wake(self) -> None:
        pass

    # ---------------------------------------------------------------- weights
    def load_weights(self, source: Mapping[str, torch.Tensor] | None, version: int) -> None:
        """Push the trainer's weights to the server (engine.sync_weights), then drop its prefix cache."""
        if not self.cfg.sync_weights:
            self.version = version
            return
        if source is None:
            raise ServerError("the server backend holds its own weights: load_weights needs a state dict")
        t0 = time.perf_counter()
        with weights_file(source, self.cfg.sync_dir) as path:
            try:
                self._call("/collective_rpc", {"method": "tracerl_reload", "args": [path, "true"]})
            except ServerError as e:
                raise ServerError(f"{e} — weight sync needs the server started with VLLM_SERVER_DEV_MODE=1 and "
                                  "--worker-extension-cls tracerl.backends.vllm_worker.TracerlWeightSync") from e
        self._call("/reset_prefix_cache", {})
        self.version = version
        self.last_sync_s = time.perf_counter() - t0
