"""Distribution and wrapping, applied to a finished model from outside (the model file never imports this).

A run starts sharded (torchtitan's order): the model is built on the meta device (no memory), wrapped
and sharded, and only then does each rank allocate its own slice and fill it: from `init_from`'s
safetensors, reading only its rows, or with a fresh init that equals one process's for the same seed
whatever the world size (each weight is drawn full-size on the device, in the model's init order,
and a rank keeps its slice; the largest single weight is the only full-size tensor ever held).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we use NCCL on GPUs and gloo on CPU (the CPU twin,
tested with 2 processes). FSDP2 (`fully_shard`) shards each block and then the root; DDP replicates.
Activation checkpointing recomputes each block in backward; `torch.compile` compiles each block.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from longboi.checkpoint import WeightReader, clean_state_dict
from longboi.errors import UserError
from longboi.model import MPTForCausalLM


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        _warn_shared_store(rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, dev)


def _warn_shared_store(rank: int) -> None:
    """torchrun (c10d rendezvous) hands its workers one store for the whole job. After a restart the new
    workers can read the keys the previous round left there (a dead worker's address) before their
    peers overwrite them, and hang connecting (seen with gloo: 2 runs in 4). A store per round avoids it."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if rank == 0 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print(
            "note: torchrun --max-restarts with a shared rendezvous store: a restart can hang on the previous "
            "round's keys; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (launch/slurm/train.sbatch does)",
            file=sys.stderr,
        )


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean over ranks, returned on `value`'s device. The collective runs on this rank's device: NCCL
    reduces GPU tensors only, so a CPU tensor (a flag, a sum of floats) is moved there and back."""
    if d.enabled:
        out = value.to(d.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= d.world_size
        value = out.to(value.device)
    return value


def anyone(flag: bool, d: Dist) -> bool:
    """True on every rank if `flag` is True on any. Control flow that reads a clock, a file or a loss
    must not diverge between ranks: their collectives would stop matching and the job would hang."""
    if not d.enabled:
        return flag
    out = torch.tensor([float(flag)], device=d.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return bool(out.item())


def from_rank0(value, d: Dist):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not d.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value, d: Dist) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not d.enabled:
        return [value]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


@contextlib.contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2, every rank holds all the weights inside the block (one all-gather per sharded module
    on entry): forwards then run no collective, so ranks can do different work, e.g. each scoring its
    own share of an evaluation. The memory is a DDP replica's for the block. Nothing to do otherwise."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not sharded:
        yield
        return
    for m in sharded:  # PyTorch's documented way to run evals: keep what the forward gathered
        m.set_reshard_after_forward(False, recurse=False)
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:  # as fully_shard left the blocks; the root keeps its weights, as FSDP sets roots
            m.set_reshard_after_forward(m is not model, recurse=False)
        for m in sharded:
            m.reshard()


def parallelize(
    model: MPTForCausalLM, d: Dist, mode: str, bf16: bool, activation_checkpointing: bool, compile: bool
) -> torch.nn.Module:
    """Wrap blocks (checkpointing, compile), then shard (FSDP2) or replicate (DDP) across ranks."""
    blocks = model.transformer.blocks
    for i, block in enumerate(blocks):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            block = checkpoint_wrapper(block)
        if compile:
            block = torch.compile(block)
        blocks[i] = block
    if not d.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def materialize(model: MPTForCausalLM, device: torch.device, seed: int, init_from: str | None = None) -> None:
    """Real weights for a model built on the meta device, sharded (FSDP2) or not: `init_from`'s
    (read slice by slice) or a fresh, seeded init. Each rank allocates only what it holds."""
    model.to_empty(device=device)
    torch.manual_seed(seed)  # fresh draws, and what draws after them (LoRA's weights), follow the seed
    if init_from:
        _load_slices(model, init_from)
    else:
        _init_slices(model, device)
    model.train()


def _init_slices(model: MPTForCausalLM, device: torch.device) -> None:
    """MPT's init as one process runs it: modules in `nn.Module.apply` order, each weight drawn full-size
    from the one seeded generator, then this rank's slice kept. The same draws on every rank and in
    every world size, so a fresh start does not depend on how the model is sharded."""
    for module in _apply_order(model):
        own = {name: p for name, p in module._parameters.items() if p is not None}
        if not own:
            continue
        stand_in = copy.copy(module)  # the module's attributes (type, _is_residual), full-size weights
        stand_in._parameters = {  # absent ones (bias=None) stay None; NaN shows what init_module missed
            name: None if p is None else torch.nn.Parameter(torch.full(p.shape, math.nan, dtype=p.dtype, device=device))
            for name, p in module._parameters.items()
        }
        model.init_module(stand_in)
        for name, p in own.items():
            full = stand_in._parameters[name].detach()
            if full.isnan().any():
                raise TypeError(f"init_module does not initialize {type(module).__name__}.{name}")
            _local(p).copy_(_block(full, p))


def _load_slices(model: MPTForCausalLM, init_from: str) -> None:
    """Each parameter's local block read from the checkpoint, never the whole state."""
    reader = WeightReader(init_from)
    params = clean_state_dict(dict(model.named_parameters()))
    missing, unexpected = sorted(set(params) - reader.names()), sorted(reader.names() - set(params))
    if missing or unexpected:
        raise UserError(
            f"init_from {init_from}: its weights do not fit the run's model config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, p in params.items():
        if reader.shape(name) != tuple(p.shape):
            raise UserError(
                f"init_from {init_from}: {name} has shape {list(reader.shape(name))}, the run's model config "
                f"needs {list(p.shape)}"
            )
        offset, shape = _extent(p)
        if 0 not in shape:  # a rank may hold no rows of a small weight
            _local(p).copy_(reader.read(name, offset, shape))


def _apply_order(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Modules in the order `nn.Module.apply` visits them (children first), as the model's own init does."""
    for child in module.children():
        yield from _apply_order(child)
    yield module


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard; a plain tensor itself), for writing in place."""
    return (p.to_local() if hasattr(p, "to_local") else p).detach()


def _extent(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of this rank's block of `p` in the full tensor."""
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return tuple(offset), tuple(shape)
    return (0,) * p.ndim, tuple(p.shape)


def _block(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    offset, shape = _extent(p)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
