"""Distribution and wrapping, applied to a finished model from outside (the model file never imports this).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we use NCCL on GPUs and gloo on CPU (the CPU twin,
tested with 2 processes). FSDP2 (`fully_shard`) shards each block and then the root; DDP replicates.
Activation checkpointing recomputes each block in backward; `torch.compile` compiles each block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, dev)


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
