"""The micro-batch probe: the largest micro-batch that fits, found by running what will train."""

from __future__ import annotations

import sys

import torch

from longboi.checkpoint import unwrap
from longboi.errors import UserError
from longboi.train.parallelize import Dist, all_reduce_mean


def find_micro_batch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, seq_len: int, per_rank: int, bf16: bool, d: Dist
) -> int:
    """The largest divisor of the per-rank batch that fits in memory, tried largest first.

    Probes what will run: the wrapped model (FSDP / DDP, activation checkpointing, compile) through
    forward, backward and an optimizer step, so the optimizer's state is counted too. The step runs
    at lr 0 (weights unchanged) and the state it created is dropped, so training starts as if no
    probe had run. One micro-batch stands for many: under FSDP the trainer reduce-scatters every
    micro-batch's gradients (train/loop.py `_no_sync`), so accumulation adds no memory the probe misses.
    """
    candidates = [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16)
    vocab = unwrap(model).config.vocab_size
    lrs = [g["lr"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    try:
        for micro in candidates:
            if _fits(model, optimizer, autocast, vocab, micro, seq_len, d):
                if d.is_main:
                    print(f"micro_batch_size: {micro} (largest that fits)", file=sys.stderr)
                return micro
    finally:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        optimizer.state.clear()
    raise UserError(f"even a micro batch of 1 x {seq_len} tokens does not fit in memory")


def _fits(model, optimizer, autocast, vocab: int, micro: int, seq_len: int, d: Dist) -> bool:
    """One probe step at this micro-batch size; every rank must fit."""
    loss = None
    try:
        ids = torch.randint(0, vocab, (micro, seq_len), device=d.device)
        with autocast:
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        optimizer.step()
        ok = 1.0
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        ok = 0.0
    finally:
        optimizer.zero_grad(set_to_none=True)
        del loss
        if d.device.type == "cuda":
            torch.cuda.empty_cache()  # give a failed size's blocks back before trying the next
    return float(all_reduce_mean(torch.tensor(ok), d)) == 1.0


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate" in text
