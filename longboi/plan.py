"""Planning arithmetic: parameter counts, FLOPs per token, and training memory.

FLOPs follow the PaLM appendix (and LLM Foundry's MFU): a training token costs 6 FLOPs per weight
it multiplies (forward 2, backward 4) plus the attention score/value matmuls, 12 * L * d * T.
The input embedding is a lookup (no FLOPs); the LM head is a matmul and counts, tied or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longboi.config import ModelConfig
from longboi.model import MPTForCausalLM, count_params


@dataclass(frozen=True)
class ModelStats:
    params: int
    non_embedding_params: int
    matmul_params: int  # weights used in a matmul per token (includes the LM head)
    seq_len: int
    n_layers: int
    d_model: int

    @property
    def train_flops_per_token(self) -> int:
        return 6 * self.matmul_params + 12 * self.n_layers * self.d_model * self.seq_len


def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> ModelStats:
    """Counts for `cfg`, built on the meta device (no memory, even for mpt-30b)."""
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    non_emb = count_params(model, non_embedding=True)
    return ModelStats(
        params=count_params(model),
        non_embedding_params=non_emb,
        matmul_params=non_emb + cfg.vocab_size * cfg.d_model,
        seq_len=seq_len or cfg.max_seq_len,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
    )


def memory_table(params: int) -> list[tuple[str, float]]:
    """(what, GiB) rows for weights, grads and optimizer state; activations are extra."""
    gib = 2**30
    return [
        ("weights fp32", 4 * params / gib),
        ("weights bf16", 2 * params / gib),
        ("grads fp32", 4 * params / gib),
        ("grads bf16", 2 * params / gib),
        ("AdamW state (2 x fp32)", 8 * params / gib),
        ("Lion state (1 x fp32)", 4 * params / gib),
        ("train fp32 + AdamW (weights+grads+state)", 16 * params / gib),
        ("train bf16 autocast + AdamW (fp32 master)", 16 * params / gib),
        ("train fp32 + Lion", 12 * params / gib),
    ]


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
