"""A compiled decode step: one token per row on a static KV cache, through `torch.compile` (inductor).

Why: a batch-1 decode step of mpt-125m is ~15 small operations per layer, and in eager mode their
per-call overhead and the BLAS's batch-1 kernels cost as much as reading the weights. Measured on a
2-core AVX512-BF16/AMX Xeon (torch 2.13, mpt-125m, random weights, 64-token prompt, `bench/infer.py`):
eager fp32 37 tokens/s, compiled 46; bf16 36 -> 83; int8 weights with bf16 activations 106
(`torch._weight_int8pack_mm`; the eager dynamic-int8 form: 80); llama.cpp f32 50, q8_0 92.

How: inductor with freezing (weights become constants, prepacked for its kernels; set for these calls
only: a frozen graph never sees a weight update) and max-autotune (its C++ GEMM templates: AMX tiles
for bf16 and int8, a batch-1 fp32 GEMV at ~24 GB/s). Passing these as `torch.compile(options=...)`
does not turn freezing on; the config patch around the call does. What makes the step compile once per
batch size: the KV cache keeps its shapes (`KVCache` is sized for prompt + new tokens at the start), the
write position is a tensor (a Python int would specialize the graph on every step), and the cache
length dimension is marked dynamic so another prompt length reuses the compiled code. Each layer's keys
are passed as their own view of the cache (mutating slices of one input makes the compiled graph copy
the whole cache back every step). Attention is `decode_attention` over the whole capacity with the
positions not written yet masked (the cache starts zeroed: a masked NaN of stale memory would still
poison probs @ v): the same fp32 scores as the eager path. Prefill stays eager.

Cost: the first call compiles (45-70 s for mpt-125m here with a cold cache; inductor caches it on disk
for later processes), and freezing keeps a prepacked copy of the weights beside the model's.
"""

from __future__ import annotations

import torch
import torch._inductor.config as inductor_config

from longboi.model import KVCache, MPTForCausalLM, decode_attention

RECOMPILE_LIMIT = 64


class CompiledDecoder:
    """`decoder(token, cache, key_valid)` -> (B, V) logits of the next position; same result as
    `model(token, attention_mask=..., cache=cache, logits_to_keep=1)[:, -1]` within rounding."""

    def __init__(self, model: MPTForCausalLM):
        self.model = model.eval()
        # Every decoder compiles the same method: its graphs are cached on that one code object, guarded
        # by the model, so a process holding several (tests, benchmarks) needs more than the default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._step = torch.compile(self._forward, mode="max-autotune-no-cudagraphs", fullgraph=True)

    @torch.no_grad()
    def __call__(self, token: torch.Tensor, cache: KVCache, key_valid: torch.Tensor) -> torch.Tensor:
        """token (B, 1); cache: filled by the prefill, capacity past its length; key_valid (B, capacity)
        bool: False at a row's left padding (True past the prompt)."""
        assert cache.keys is not None and cache.values is not None, "prefill the cache first"
        if cache.length >= cache.keys.shape[3]:
            raise ValueError(f"the KV cache is full ({cache.length} positions): size it for the whole generation")
        keys, values = list(cache.keys.unbind(0)), list(cache.values.unbind(0))
        for t in keys + values:
            torch._dynamo.mark_dynamic(t, 2)  # the capacity: one compiled graph for every prompt length
        torch._dynamo.mark_dynamic(key_valid, 1)
        pos = torch.tensor(cache.length, device=token.device)
        with inductor_config.patch(freezing=True):  # here only: frozen weights must never be trained
            logits = self._step(token, pos, keys, values, key_valid)
        cache.advance(1)
        return logits

    def _forward(
        self, token: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], key_valid
    ) -> torch.Tensor:
        tm = self.model.transformer
        cfg = tm.cfg
        x = tm.wte(token)  # (B, 1, d)
        if cfg.learned_pos_emb:  # left padding: a row's first real token is position 0
            x = x + tm.wpe((pos - (~key_valid).sum(1))[:, None])  # key_valid is False only at left padding
        bias = _key_bias(tm.alibi_slopes(token.device), pos, key_valid)  # (B, H|1, 1, capacity)
        for layer, block in enumerate(tm.blocks):
            attn = block.attn
            q, k, v = attn.project(block.norm_1(x))  # q (B, H, 1, D), k and v (B, Hkv, 1, D)
            keys[layer].index_copy_(2, pos.view(1), k)
            values[layer].index_copy_(2, pos.view(1), v)
            y = decode_attention(q, keys[layer], values[layer], bias, attn.scale)  # (B, H, 1, D)
            x = x + attn.out_proj(y.transpose(1, 2).reshape(x.shape))
            x = x + block.ffn(block.norm_2(x))
        return self.model.head(tm.norm_f(x))[:, -1]


def _key_bias(slopes: torch.Tensor | None, pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """(B, H|1, 1, capacity) fp32 additive bias of the query at `pos`: ALiBi's -slope x distance where a
    key may be seen, -inf at padding and at positions not written yet."""
    j = torch.arange(key_valid.shape[1], device=key_valid.device)
    seen = (key_valid & (j <= pos))[:, None, None, :]  # (B, 1, 1, capacity)
    alibi = torch.zeros((), device=j.device) if slopes is None else (slopes[:, None] * (j - pos))[None, :, None, :]
    return torch.where(seen, alibi, float("-inf"))
