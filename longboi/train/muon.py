"""Muon (orthogonalized momentum) for the blocks' matrices, AdamW for everything else, in one optimizer.

Which parameter goes where: every 2-D weight inside `transformer.blocks` (Wqkv, out_proj, up_proj,
down_proj) is a Muon parameter; embeddings (and the tied LM head), an untied LM head, norms and biases
stay with AdamW (Muon's orthogonalization is for hidden linear maps; an embedding row or a norm gain is
not one).

The lr rule: Moonlight's "match AdamW's update RMS": a Muon update is scaled by 0.2 x sqrt(max(rows,
cols)), so its RMS is about that of an AdamW update and a recipe's lr and weight decay transfer (PyTorch's
`adjust_lr_fn="match_rms_adamw"`). Weight decay is decoupled, lr x wd, as in AdamW.

Why not `torch.optim.Muon` as it is: it runs Newton-Schulz in bf16 always (100x slower than fp32 on an AVX2
CPU, which emulates bf16) and it sees a sharded FSDP2 parameter as its local rows only, while the
orthogonalization must see the whole matrix. Here the iteration runs in the run's precision (bf16 in a bf16
run, which `precision: auto` picks only where the device computes it natively; fp32 in an fp32 run, so a
pinned-fp32 run does the same arithmetic on every CPU), and a sharded (DTensor) momentum is all-gathered,
orthogonalized whole on every rank (the same numbers everywhere) and cut back to the local shard: 2 gloo
ranks equal 1 process (tested).

Cost: Newton-Schulz is ~5 x 3 matmuls of each matrix's short side squared by its long side per step,
independent of the batch: for the demo model (5.8M parameters) about 15 GFLOP a step, as much as the
forward and backward of 2 x 256 tokens, so at the demo's tiny batch a Muon step takes ~2x an AdamW step.
The Newton-Schulz coefficients and lr rule are PyTorch's (`torch.optim._muon`).
"""

from __future__ import annotations

import math

import torch
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's quintic)
NS_STEPS = 5


def is_muon_param(name: str, p: torch.nn.Parameter) -> bool:
    """A 2-D weight of a transformer block."""
    return p.ndim == 2 and ".blocks." in f".{name}"


class MuonAdamW(torch.optim.Optimizer):
    """Param groups carry `muon: True` (momentum, Newton-Schulz) or False (AdamW with `betas`, `eps`)."""

    def __init__(
        self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float, bf16: bool = False
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False)
        super().__init__(groups, defaults)
        # The demo's Muon runs on an AMX Xeon did 3,593 tokens/s with bf16 Newton-Schulz, ~2,900 with fp32.
        self.ns_dtype = torch.bfloat16 if bf16 else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # an empty group (a tied head leaves one) comes back from a checkpoint without its keys
                continue
            if group["muon"]:
                for p in params:
                    self._muon(p, group)
            else:
                self._adamw(params, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.mul_(mu).add_(p.grad)
        update = orthogonalized(p.grad.add(buf, alpha=mu), self.ns_dtype)  # Nesterov
        rows, cols = p.shape
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw(self, params: list[torch.Tensor], group: dict) -> None:
        """PyTorch's AdamW update (`torch.optim.adamw.adamw`) on this group, its state kept here."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=False,  # one kernel per tensor: DTensors (FSDP2) and plain tensors alike
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def orthogonalized(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz orthogonalization of a 2-D momentum (a sharded DTensor: of the whole matrix, cut back)."""
    if type(m).__name__ == "DTensor":
        from torch.distributed.tensor import distribute_tensor

        whole = newton_schulz(m.full_tensor(), dtype)
        return distribute_tensor(whole, m.device_mesh, m.placements, src_data_rank=None)  # every rank has `whole`
    return newton_schulz(m, dtype)


def newton_schulz(g: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PyTorch's quintic iteration (`torch.optim._muon`), computed in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x
