"""FLOP and parameter counting, needed by training (MFU) and planning alike, so it lives below both.

FLOPs follow the PaLM appendix (and LLM Foundry's MFU): a training token costs 6 FLOPs per weight
it multiplies (forward 2, backward 4) plus the attention score/value matmuls, 12 * L * d * T.
The input embedding is a lookup (no FLOPs); the LM head is a matmul and counts, tied or not.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=256)  # planning asks again and again (micro-batch search); configs are frozen
def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> ModelStats:
    """Counts for `cfg`, built on the meta device (no memory, even for mpt-30b)."""
    with torch.device("meta"):
        model = MPTForCausalLM(cfg)
    non_emb = count_params(model, non_embedding=True)
    matrices = sum(p.numel() for p in model.transformer.blocks.parameters() if p.ndim == 2)  # not norms, biases
    return ModelStats(
        params=count_params(model),
        non_embedding_params=non_emb,
        matmul_params=matrices + cfg.vocab_size * cfg.d_model,
        seq_len=seq_len or cfg.max_seq_len,
        n_layers=cfg.n_layers,
        d_model=cfg.d_model,
    )
