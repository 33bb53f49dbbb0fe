"""Training as one of several processes (`torchrun`): the process group, the model replicated
(DistributedDataParallel) or sharded (FSDP2), gradient sync on the last micro-step only, full
state dicts gathered for a checkpoint and scattered on resume, and the reductions that give every
rank the same view of the run. A process alone is the same interface with nothing to do."""

from __future__ import annotations

import contextlib
import gc
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .utils import resolve_device

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""What torchrun sets in every process it starts (with MASTER_ADDR and MASTER_PORT)."""

GRAPH_NOTE = ("DDP's gradient all-reduce and FSDP2's all-gathers run from hooks and their own "
              "streams, which a captured graph cannot hold safely")
"""Why a step of several processes is compiled but never captured as a CUDA graph."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its
    variables)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched): who prints."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def launch_world_size() -> int:
    """How many processes the launcher started (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


@dataclass
class Parallel:
    """How this process trains: alone (`backend` None), or as rank `rank` of `world_size`
    processes, replicated (DDP) or sharded (`sharded`: FSDP2), on `device`."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None
    sharded: bool = False
    wrapped: Optional[torch.nn.Module] = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def mode(self) -> str:
        """How the model is spread: "single", "ddp" or "fsdp"."""
        return "single" if self.backend is None else "fsdp" if self.sharded else "ddp"

    def graph_blocker(self) -> Optional[str]:
        """Why a step of this run is not captured as a CUDA graph (None: nothing here stops it)."""
        return None if self.backend is None else f"{self.mode.upper()}: {GRAPH_NOTE}"

    def describe(self) -> dict:
        """The run record's fields."""
        return {"world_size": self.world_size, "process_group_backend": self.backend,
                "parallel": self.mode}

    # -- the model ------------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module, *, compile_blocks: Optional[dict] = None
             ) -> torch.nn.Module:
        """The module a training step calls: `model` itself alone; DDP around it (every rank holds
        the whole model; gradients are averaged by all-reduce in buckets during the backward);
        or `model` with each block, then the root (embeddings, final norm, head), sharded by
        FSDP2 (parameters, gradients and optimizer state split across the ranks; weights
        all-gathered per block for its forward and backward, gradients reduce-scattered).
        Weights stay fp32; bf16 comes from autocast, as in one process. Build the optimizer
        after this: under FSDP2 it must hold the sharded parameters.

        `compile_blocks` (torch.compile's options, FSDP2 only): compile each block's forward
        alone. FSDP2's hooks are closed to dynamo, so a compile of the whole model breaks its
        graph at every block and falls back to eager; the hooks run around each block's
        forward, which compiles whole."""
        if self.backend is None:
            self.wrapped = model
        elif self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for block in model.blocks:
                if compile_blocks is not None:
                    block.forward = torch.compile(block.forward, **compile_blocks)
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            # FSDP2 warns that the logits are a view, in case a caller changes them in place
            # (which would skip its backward hook); the trainer never does.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
            self.wrapped = model
        else:
            from torch.nn.parallel import DistributedDataParallel
            # No buffer sync per forward: sqt's buffers are constants (rotary tables, masks) or
            # per-forward statistics (MoE expert load), never state to keep in step. (Newer
            # torch names the option forward_sync_buffers.)
            names = inspect.signature(DistributedDataParallel).parameters
            option = ("forward_sync_buffers" if "forward_sync_buffers" in names
                      else "broadcast_buffers")
            self.wrapped = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                **{option: False})
        return self.wrapped

    def micro_step(self, last: bool):
        """A context for one micro-step's forward and backward: gradients are synchronised
        across the ranks on the last micro-step of an optimizer step only (DDP's no_sync,
        FSDP2's set_requires_gradient_sync); the others accumulate locally."""
        if self.backend is None:
            return contextlib.nullcontext()
        if self.sharded:
            self.wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def clip_grad_norm(self, params, max_norm: float, *, foreach: bool) -> torch.Tensor:
        """Clip the gradients to a global norm of `max_norm` and return that norm (before
        clipping) as a plain tensor. DDP's gradients are already averaged, whole, on every rank;
        FSDP2's are sharded DTensors, whose norm torch reduces across the shards."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- agreeing -------------------------------------------------------------------------------

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` replaced, on every rank, by its sum over the ranks."""
        if self.backend is not None:
            dist.all_reduce(tensor)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` replaced, on every rank, by its maximum over the ranks."""
        if self.backend is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` replaced, on every rank, by its mean over the ranks."""
        if self.backend is not None:
            dist.all_reduce(tensor)
            tensor.div_(self.world_size)
        return tensor

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.backend is None:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.backend is not None:
            dist.barrier()

    def agree_on_first(self, watch) -> None:
        """Make a FiniteWatch say the same on every rank: the earliest non-finite value any rank
        saw (the lowest rank's on a tie), so that all ranks stop at once, with one message."""
        if self.backend is None:
            return
        mine = torch.stack([watch.step.double(), watch.value.double(), watch.kind.double()])
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine)
        seen = [r.tolist() for r in rows if r[0] >= 0]
        if seen:
            step, value, kind = min(seen, key=lambda r: r[0])
            watch.step.fill_(int(step))
            watch.value.fill_(value)
            watch.kind.fill_(int(kind))

    @contextlib.contextmanager
    def main_first(self, enter: Callable[[], contextlib.AbstractContextManager]) -> Iterator:
        """Rank 0 enters the context `enter()` makes (claiming the run directory) while the others
        wait; if it fails, every rank raises rank 0's error. Yields what rank 0's context yields
        there, None elsewhere."""
        if self.backend is None:
            with enter() as value:
                yield value
            return
        if not self.is_main:
            error = [None]
            dist.broadcast_object_list(error, src=0)
            if error[0] is not None:
                kind, message = error[0]
                raise _SHARED_ERRORS.get(kind, RuntimeError)(message)
            yield None
            return
        with contextlib.ExitStack() as stack:
            try:
                value = stack.enter_context(enter())
            except Exception as e:
                kind = next((c for c in _SHARED_ERRORS.values() if isinstance(e, c)),
                            RuntimeError)
                dist.broadcast_object_list([(kind.__name__, str(e))], src=0)
                raise
            dist.broadcast_object_list([None], src=0)
            yield value

    # -- state dicts ----------------------------------------------------------------------------

    def model_state(self, model: torch.nn.Module) -> Optional[dict]:
        """The full (unsharded) state dict on rank 0, None on the others. Under FSDP2 every rank
        must call it: the shards are gathered (to the CPU, one tensor at a time)."""
        if not self.sharded:
            return model.state_dict() if self.is_main else None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(model, options=_full_options(offload=True))
        return state if self.is_main else None

    def optimizer_state(self, model: torch.nn.Module, opt) -> Optional[dict]:
        """The optimizer's full state dict in torch's plain form (parameters numbered in group
        order, as `opt.state_dict()` gives it alone) on rank 0, None on the others; every rank
        must call it under FSDP2."""
        if not self.sharded:
            return opt.state_dict() if self.is_main else None
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        state = get_optimizer_state_dict(model, opt, options=_full_options(offload=True))
        return _numbered(state, opt, model) if self.is_main else None

    def load_state(self, model: torch.nn.Module, opt, weights: dict, optimizer: dict) -> None:
        """Load full state dicts (as a checkpoint holds them, from any world size) into the
        model and the optimizer; under FSDP2 each rank keeps its shard."""
        if not self.sharded:
            model.load_state_dict(weights)
            opt.load_state_dict(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                             set_optimizer_state_dict)
        set_model_state_dict(model, weights, options=_full_options(offload=False))
        set_optimizer_state_dict(model, opt, _named(optimizer, opt, model),
                                 options=_full_options(offload=False))


def _full_options(*, offload: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=offload)


def _names(opt, model) -> list[str]:
    """The optimizer's parameters by name, in the order `opt.state_dict()` numbers them."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in opt.param_groups for p in group["params"]]


def _numbered(state: dict, opt, model) -> dict:
    """torch.distributed's optimizer state dict (keyed by parameter name) in the plain form."""
    index = {name: i for i, name in enumerate(_names(opt, model))}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in state["param_groups"]]}


def _named(state: dict, opt, model) -> dict:
    """The plain optimizer state dict keyed by parameter name, as torch.distributed takes it."""
    names = _names(opt, model)
    try:
        return {"state": {names[i]: s for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                 for g in state["param_groups"]]}
    except (IndexError, KeyError, TypeError) as e:
        raise ValueError(f"the optimizer state does not fit this model ({type(e).__name__}: "
                         f"{e})") from None


_SHARED_ERRORS = {c.__name__: c for c in (ValueError, OSError)}
"""The kinds of rank 0's error that the other ranks raise as such (with its message): a command
line reports them as one line. Anything else reaches them as a RuntimeError."""


def _device(setting: str, local_rank: Optional[int]) -> torch.device:
    """The device of rank `local_rank` on its machine: cuda:LOCAL_RANK, or the CPU. No
    LOCAL_RANK (a group its caller started): the current CUDA device."""
    if setting.startswith("cuda:"):
        raise ValueError(f"device={setting!r} under torchrun: each process takes the GPU of its "
                         "LOCAL_RANK; expected auto, cuda or cpu")
    device = resolve_device(setting)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank is None:
        local_rank = torch.cuda.current_device()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s): "
                         "expected at most one process per GPU (torchrun --nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def join_processes(device_setting: str, *, fsdp: bool = False) -> Iterator[Parallel]:
    """The Parallel of this process for the duration of a run. Started by torchrun (RANK,
    WORLD_SIZE, LOCAL_RANK set), it joins the process group (nccl on CUDA, each rank on
    cuda:LOCAL_RANK; gloo on the CPU) and leaves it at the end; a group the caller initialised
    is used as it is and left to the caller. Otherwise the process trains alone."""
    if not (dist.is_available() and (dist.is_initialized() or launched())):
        if fsdp:
            print("note: fsdp=True in a single process: nothing to shard; training unsharded",
                  file=sys.stderr)
        yield Parallel(resolve_device(device_setting))
        return
    local = os.environ.get("LOCAL_RANK")
    device = _device(device_setting, int(local) if local is not None else None)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        yield Parallel(device, rank=dist.get_rank(), world_size=dist.get_world_size(),
                       backend=dist.get_backend(), sharded=fsdp)
    finally:
        if owned:
            # The run's wrapped model (DDP's reducer, FSDP's state) goes while the group is alive:
            # torn down later, at interpreter exit, it can abort the process (std::terminate).
            gc.collect()
            dist.destroy_process_group()
