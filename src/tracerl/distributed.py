"""The processes of one run behind one interface: a single process, or torchrun's ranks (SPMD).

    world = connect(device, timeout_s)     # Single() unless torchrun set WORLD_SIZE > 1
    mine  = world.share(tasks)             # this rank's prompts (a prompt's trees stay on one rank)
    model = world.wrap(model)              # FSDP2: fully_shard per decoder layer, then the root
    den   = world.sum(local_denominator)   # global token / row counts, so N ranks = 1 process
    ...   = world.max(x), world.gather(obj), world.full_state(model), world.barrier()

The training loop calls these and nothing else of torch.distributed, so the single-process run is the
same code with every collective the identity. On CPU the backend is gloo, on CUDA NCCL; each
collective waits at most `timeout_s`, after which the rank stops with a `PeerLostError` naming the
collective (a rank that died or hangs never leaves the others waiting forever).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from tracerl.errors import TracerlError

T = TypeVar("T")


class PeerLostError(TracerlError):
    """Another rank died, hung past the collective timeout, or the connection between ranks broke."""


# What gloo and NCCL errors say when a peer is gone (they raise plain RuntimeErrors).
_LOST = ("timed out", "timeout", "connection reset", "connection closed", "broken pipe", "gloo", "nccl",
         "socket", "peer")


def lost_peer(e: BaseException, rank: int, size: int, timeout_s: float, what: str = "a collective") -> PeerLostError | None:
    """`e` as a one-line PeerLostError if it is a communication failure between ranks, else None."""
    text = str(e).strip()
    if not isinstance(e, (RuntimeError, ConnectionError)) or not any(m in text.lower() for m in _LOST):
        return None
    first = text.splitlines()[0] if text else type(e).__name__
    return PeerLostError(f"rank {rank}: {what} across {size} ranks failed (another rank died, hung for more than "
                         f"run.dist_timeout_s={timeout_s:g} s, or lost its connection): {first}")


class World(Protocol):
    """What the training loop needs from the set of processes that train one policy."""

    rank: int
    size: int
    device: str

    @property
    def is_main(self) -> bool: ...

    def share(self, items: list[T]) -> list[T]: ...

    def sum(self, x: Tensor | float) -> Tensor: ...

    def max(self, x: Tensor | float) -> Tensor: ...

    def gather(self, obj: Any) -> list[Any]: ...

    def broadcast(self, obj: Any) -> Any: ...

    def barrier(self) -> None: ...

    def wrap(self, model: nn.Module, mixed_bf16: bool = False) -> nn.Module: ...

    def backward(self, loss: Tensor) -> None: ...

    def lost(self, e: BaseException, what: str = "a collective") -> PeerLostError | None: ...

    def full_state(self, model: nn.Module) -> dict[str, Tensor]: ...

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None: ...

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor] | None,
                   optim_state: dict[str, Any] | None) -> None: ...

    def close(self) -> None: ...


def _tensor(x: Tensor | float) -> Tensor:
    return x.detach().clone().to(torch.float64) if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)


class Single:
    """One process: every collective is the identity."""

    rank, size = 0, 1

    def __init__(self, device: str = "cpu"):
        self.device = device

    @property
    def is_main(self) -> bool:
        return True

    def share(self, items: list[T]) -> list[T]:
        return list(items)

    def sum(self, x: Tensor | float) -> Tensor:
        return _tensor(x)

    def max(self, x: Tensor | float) -> Tensor:
        return _tensor(x)

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def barrier(self) -> None:
        return None

    def wrap(self, model: nn.Module, mixed_bf16: bool = False) -> nn.Module:
        return model

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def lost(self, e: BaseException, what: str = "a collective") -> PeerLostError | None:
        return None

    def full_state(self, model: nn.Module) -> dict[str, Tensor]:
        return model.state_dict()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return optimizer.state_dict()

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor] | None,
                   optim_state: dict[str, Any] | None) -> None:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)

    def close(self) -> None:
        return None


# Checkpoints hold the optimizer state in torch's own layout (parameters numbered in the order of
# `model.named_parameters()`), whatever the world size, so a run resumes at any number of ranks.
# torch.distributed.checkpoint's full state names parameters by their fully qualified names instead.

def by_name(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    names = [n for n, _ in model.named_parameters()]
    return {"state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def by_index(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the largest nn.ModuleList of the model (the decoder
    layers of every Hugging Face causal LM: `model.model.layers`, `transformer.h`, ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise TracerlError(f"{type(model).__name__} has no list of decoder layers to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


class Torchrun:
    """The ranks of a torchrun launch: one process group (gloo on CPU, NCCL on CUDA), FSDP2 sharding."""

    def __init__(self, device: str, timeout_s: float):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise TracerlError("run.device=cuda but torch sees no CUDA device")
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            backend = "gloo"
        self.device, self.backend, self.timeout_s = device, backend, timeout_s
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            dist.init_process_group(backend, timeout=timeout, **self._store(timeout))
        # small objects (metrics, plans, checkpoint state) travel over a gloo group on every backend
        self._obj_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s)) \
            if backend != "gloo" else None
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (self.size,))

    def _store(self, timeout: datetime.timedelta) -> dict[str, Any]:
        """torchrun's agent store, under a prefix of its own for each restart of the worker group: the
        store outlives a restart (c10d rendezvous) and a restarted rank would otherwise read the
        addresses the dead group published, and fail to connect. Other launchers: the env:// default."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return {}
        store = self.dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.size,
                                   is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return {"store": self.dist.PrefixStore(f"tracerl/attempt_{attempt}", store), "rank": self.rank,
                "world_size": self.size}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ConnectionError) as e:  # gloo / NCCL report a lost peer or a timeout this way
            lost = self.lost(e, what)
            if lost is None:
                raise
            raise lost from None

    def lost(self, e: BaseException, what: str = "a collective") -> PeerLostError | None:
        """`e` as a PeerLostError naming this rank, if it is a failure to reach the other ranks."""
        return lost_peer(e, self.rank, self.size, self.timeout_s, what)

    def share(self, items: list[T]) -> list[T]:
        return list(items[self.rank::self.size])

    def _reduce(self, x: Tensor | float, op) -> Tensor:
        t = _tensor(x).to(self.device if self.backend == "nccl" else "cpu")
        self._call("all_reduce", self.dist.all_reduce, t, op=op)
        return t.cpu()

    def sum(self, x: Tensor | float) -> Tensor:
        return self._reduce(x, self.dist.ReduceOp.SUM)

    def max(self, x: Tensor | float) -> Tensor:
        return self._reduce(x, self.dist.ReduceOp.MAX)

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.size
        self._call("all_gather_object", self.dist.all_gather_object, out, obj, group=self._obj_group)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._call("broadcast_object_list", self.dist.broadcast_object_list, box, src=0, group=self._obj_group)
        return box[0]

    def barrier(self) -> None:
        self._call("barrier", self.dist.barrier, group=self._obj_group)

    def wrap(self, model: nn.Module, mixed_bf16: bool = False) -> nn.Module:
        """FSDP2: each decoder layer is one shard group, the root (embeddings, norm, head) another."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
        kwargs = {"mesh": self.mesh, **({"mp_policy": mp} if mp is not None else {})}
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    def backward(self, loss: Tensor) -> None:
        """The objective divides by the global token (or row) count, so the gradient of the global batch
        is the *sum* of the ranks' gradients; FSDP2 averages them (gloo has no pre-scaled sum), hence × size."""
        (loss * self.size).backward()

    def full_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The unsharded weights on every rank (a collective: every rank must call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return self._call("gathering the full weights", get_model_state_dict, model,
                          options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The full optimizer state on rank 0 (None elsewhere), numbered as in one process; a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = self._call("gathering the optimizer state", get_optimizer_state_dict, model, optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return by_index(model, full) if self.is_main else None

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, Tensor] | None,
                   optim_state: dict[str, Any] | None) -> None:
        """Full weights and optimizer state read by rank 0 (None elsewhere), sent to every rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        self._call("loading the weights", set_model_state_dict, model, weights if self.is_main else {}, options=opts)
        named = by_name(model, optim_state) if self.is_main else {}
        self._call("loading the optimizer state", set_optimizer_state_dict, model, optimizer, named, options=opts)

    def close(self) -> None:
        """Leave together: a rank that tears its group down while another still talks to it can abort."""
        if self.dist.is_initialized():
            self.barrier()
            self.dist.destroy_process_group()


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def launched_size() -> int:
    """The number of ranks torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def connect(device: str = "cpu", timeout_s: float = 600.0) -> World:
    """torchrun's ranks when WORLD_SIZE > 1, else one process."""
    if launched_size() > 1:
        return Torchrun(device, timeout_s)
    return Single(device)
