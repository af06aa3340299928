"""Optimizers (AdamW, decoupled Lion, Muon + AdamW) with MPT's parameter groups, and learning-rate schedules."""

from __future__ import annotations

import math

import torch

from longboi.checkpoint import unwrap
from longboi.errors import UserError
from longboi.lora import is_lora
from longboi.train.config import OptimizerConfig, ScheduleConfig
from longboi.train.muon import MuonAdamW, is_muon_param


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Weight decay on matmul weights only (unless asked): decaying norms, biases or embeddings hurts.
    With muon, the blocks' matrices form a first group of their own (`muon: True`)."""
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.name == "muon" and is_muon_param(name, p):
            matrices.append(p)
            continue
        is_norm_or_bias = p.ndim < 2
        is_embedding = ".wte." in f".{name}" or ".wpe." in f".{name}"
        skip = (is_norm_or_bias and not cfg.decay_norms_and_biases) or (is_embedding and not cfg.decay_embeddings)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "muon":
        groups = [{"params": matrices, "weight_decay": cfg.weight_decay, "muon": True}] + groups
    return groups


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), decoupled weight decay.

        update = sign(beta1 * m + (1 - beta1) * g);  p -= lr * (update + wd * p)
        m = beta2 * m + (1 - beta2) * g

    One state tensor per parameter (half of AdamW's). MPT-7B trained with it.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid Lion hyperparameters lr={lr} betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = torch.lerp(p.grad, m, beta1).sign_()  # beta1 * m + (1 - beta1) * g
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)  # beta2 * m + (1 - beta2) * g
        return loss


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, bf16: bool = False) -> torch.optim.Optimizer:
    """`bf16`: the run computes in bf16 (Muon's Newton-Schulz then does too)."""
    groups = param_groups(model, cfg)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=betas)
    if cfg.name == "muon":
        if is_lora(unwrap(model)):
            raise UserError(
                "optimizer muon with lora: not supported (LoRA trains thin rank-r factors, which Muon's "
                "orthogonalization of whole matrices does not fit); use adamw or lion for LoRA runs"
            )
        return MuonAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, momentum=cfg.momentum, bf16=bf16)
    device = next(model.parameters()).device
    # The fused kernel exists for CPU and CUDA; it is several times faster than the foreach loop.
    fused = device.type in ("cpu", "cuda") and not _has_dtensor(model)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused)


def _has_dtensor(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def lr_multiplier(step: int, total: int, warmup: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio
    if cfg.name == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer: torch.optim.Optimizer, peak: float, multiplier: float) -> float:
    lr = peak * multiplier
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
