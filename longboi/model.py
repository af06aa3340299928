"""The MPT decoder, all of it, top to bottom.

    tokens -> wte (+ wpe when ALiBi is off) -> n_layers x [x + attn(norm_1(x)); x + ffn(norm_2(x))]
           -> norm_f -> logits = h @ wte^T (tied) or lm_head(h)

Attention is `scaled_dot_product_attention` with ALiBi as an additive bias. ALiBi has no position
table, so prompts far past `max_seq_len` run; the (T x T) bias is never built whole: causal
attention without padding uses a key-only bias (1, H, 1, T) plus `is_causal`, and everything else
(KV cache, padded batches, packed `sequence_id`) builds the bias one block of query rows at a time.
Parameter names are MPT's own, so HF `MptForCausalLM` and LLM Foundry checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from longboi.config import ModelConfig

# Bytes of attention bias built at once; bounds prefill memory at any context length.
ATTN_CHUNK_BYTES = 64 * 2**20
# A forward's bias chunks are built once and shared by every layer when they total at most this;
# longer contexts rebuild each chunk per layer instead of holding a (T x T) bias.
BIAS_CACHE_BYTES = 256 * 2**20
# GPUs have the memory for 16x both, so training up to mpt-7b's 32 heads x 4,096 tokens makes one
# SDPA call per layer on a bias built once per forward.
GPU_BIAS_SCALE = 16
# Token rows per chunk of the fused LM-head loss: (rows x vocab) fp32 logits live at once.
LOSS_CHUNK_ROWS = 1024
# LM-head rows up to which CPU fp32 computes `weight @ h^T` instead of `h @ weight^T`: same product, but
# the BLAS behind torch 2.13 CPU runs the (few rows x d) @ (d x 50k) form 2-4x slower at 2-64 rows on
# AVX2 (mpt-125m's head at 8 rows: 27 -> 15 ms); from a few hundred rows on the two meet.
CPU_HEAD_ROWS = 256


def alibi_slopes(n_heads: int, bias_max: int = 8) -> torch.Tensor:
    """Per-head ALiBi slopes 2^(-bias_max * h / n) (Press et al.), MPT's order for n != 2^k."""
    n = 2 ** math.ceil(math.log2(n_heads))
    exponents = torch.arange(1, n + 1, dtype=torch.float64, device="cpu") * (bias_max / n)
    slopes = 1.0 / torch.pow(2.0, exponents)
    if n != n_heads:  # interleave so the kept heads still span the slope range
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.float()  # (H,)


class LPLayerNorm(nn.LayerNorm):
    """MPT's low_precision_layernorm: under autocast, normalize in the autocast dtype (saves an fp32 copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def build_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(dim, cfg.layer_norm_epsilon)
    norm = LPLayerNorm if cfg.norm_type == "low_precision_layernorm" else nn.LayerNorm
    return norm(dim, eps=cfg.layer_norm_epsilon, bias=not cfg.no_bias)


class Cache(Protocol):
    """What the attention asks of a cache: the positions of a forward's tokens, attention over what is cached
    plus this forward's keys/values (stored as it goes), and `advance` once the forward is done. `length` is
    the positions cached before the forward that every row shares (0 for a paged cache: rows carry their own)."""

    length: int

    def positions(self, count: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor: ...

    def attend(self, layer: int, q, k, v, attention, mask: AttentionMask, scale: float) -> torch.Tensor: ...

    def advance(self, n: int) -> None: ...


class KVCache:
    """Keys/values of all layers for incremental decoding, in one buffer per kind.

    Sized for `capacity` positions, allocated on first use with the dtype attention produces (bf16
    under autocast). Callers that know the final length (generation: prompt + new tokens) give it,
    so the buffer is allocated once; past it, the buffer doubles. Stores kv_heads heads, so GQA/MQA
    caches are n_heads/kv_heads times smaller.
    """

    def __init__(self, n_layers: int, capacity: int = 256):
        self.n_layers, self.capacity, self.length = n_layers, capacity, 0
        self.keys: torch.Tensor | None = None  # (L, B, Hkv, capacity, D)
        self.values: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, Hkv, T, D) keys/values for `layer`; return all keys/values so far."""
        end = self.length + k.shape[2]
        if self.keys is None or end > self.keys.shape[3]:
            grown = self.capacity if self.keys is None else 2 * self.keys.shape[3]
            self._grow(k, max(end, grown))
        assert self.keys is not None and self.values is not None
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def _grow(self, like: torch.Tensor, capacity: int) -> None:
        b, h, _, d = like.shape
        # Zeros, not empty: the compiled decode step (longboi.compiled) attends over the whole capacity
        # with unwritten positions masked, and a masked NaN of stale memory would still poison probs @ v.
        keys = like.new_zeros(self.n_layers, b, h, capacity, d)
        values = like.new_zeros(self.n_layers, b, h, capacity, d)
        if self.keys is not None and self.values is not None:
            keys[..., : self.length, :] = self.keys[..., : self.length, :]
            values[..., : self.length, :] = self.values[..., : self.length, :]
        self.keys, self.values = keys, values

    def positions(self, count: int, attention_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Positions of the next `count` tokens, after `length` cached ones (left padding counted out)."""
        return token_positions(self.length, count, attention_mask, device)

    def attend(self, layer: int, q, k, v, attention, mask: AttentionMask, scale: float) -> torch.Tensor:
        """Store this forward's keys/values for `layer`, then `attention` over everything cached."""
        k, v = self.update(layer, k, v)  # (B, Hkv, past + T, D)
        return attention(q, k, v, mask)

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has stored its n new positions."""
        self.length += n

    def repeat_rows(self, n: int) -> None:
        """Repeat each sequence n times along the batch (one shared context, n continuations to score)."""
        assert self.keys is not None and self.values is not None, "repeat_rows needs a filled cache"
        self.keys = self.keys.repeat_interleave(n, dim=1)  # (L, B * n, Hkv, capacity, D)
        self.values = self.values.repeat_interleave(n, dim=1)


def token_positions(past: int, count: int, attention_mask: torch.Tensor | None, device) -> torch.Tensor:
    """(T,) or (B, T) positions of `count` tokens after `past` ones; with left padding (attention_mask 0 for
    padding), a row's first real token is position 0."""
    pos = torch.arange(past, past + count, device=device)
    if attention_mask is None:
        return pos
    return (pos - (attention_mask == 0).cumsum(dim=1)[:, past : past + count]).clamp(min=0)


class AttentionMask:
    """Which keys each query sees, and the ALiBi bias, built once per forward for all layers.

    Three rules combine: causal (query i sees keys <= i), key padding (`key_valid`, for batches of
    prompts with different lengths) and documents (`sequence_id`: packed sequences never see each
    other). Queries are the last `q_len` of the `k_len` positions (the rest are in the KV cache).
    """

    def __init__(
        self,
        q_len: int,
        k_len: int,
        slopes: torch.Tensor | None,
        device: torch.device,
        key_valid: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
    ):
        self.q_len, self.k_len, self.past = q_len, k_len, k_len - q_len
        self.slopes = slopes  # (H,) fp32 on `device`
        self.key_valid = key_valid  # (B, Tk) bool
        self.sequence_id = sequence_id  # (B, Tk) int
        self._chunks: dict[torch.dtype, list] = {}  # bias chunks shared by all layers (see bias_chunks)
        self._budget_scale = GPU_BIAS_SCALE if torch.device(device).type == "cuda" else 1
        self.key_pos = torch.arange(k_len, device=device)
        # Key-only ALiBi, slope * (j - (Tk-1)): under a causal mask it differs from MPT's relative
        # bias slope * (j - i) by a per-row constant, which softmax ignores.
        self.key_bias = (
            None if slopes is None else (self.slopes[:, None] * (self.key_pos - (k_len - 1))).view(1, -1, 1, k_len)
        )

    @property
    def simple(self) -> bool:
        """Causal only: no padding and no packed documents."""
        return self.key_valid is None and self.sequence_id is None

    def bias(self, start: int, end: int) -> torch.Tensor:
        """Additive fp32 bias for query rows [start, end): (B or 1, H or 1, end-start, Tk), -inf where masked."""
        offsets = torch.arange(start, end, device=self.key_pos.device)
        q_pos = (offsets + self.past)[None]  # (1, c); no host tensor: traces with symbolic lengths (ONNX export)
        allowed = self.key_pos[None, None, :] <= q_pos[:, :, None]  # (B|1, c, Tk)
        if self.sequence_id is not None:
            sid_q = self.sequence_id[:, self.past + start : self.past + end]
            allowed = allowed & (sid_q[:, :, None] == self.sequence_id[:, None, :])  # (B, c, Tk)
        if self.key_valid is not None:  # a padded query still sees itself, so no row is all -inf (NaN)
            allowed = allowed & (self.key_valid[:, None, :] | (self.key_pos[None, None, :] == q_pos[:, :, None]))
        if self.slopes is None:
            rel = torch.zeros(1, 1, 1, 1, device=q_pos.device)
        else:  # relative ALiBi: small near the diagonal, so it stays exact where it matters
            rel = -self.slopes[None, :, None, None] * (q_pos[:, None, :, None] - self.key_pos).float()
        return rel.masked_fill(~allowed[:, None], float("-inf"))  # (B|1, H|1, c, Tk)

    def bias_shape(self) -> tuple[int, int]:
        """The (batch, heads) of the bias this mask builds: 1 where it does not vary."""
        per_row = next((t for t in (self.sequence_id, self.key_valid) if t is not None), None)
        return 1 if per_row is None else per_row.shape[0], 1 if self.slopes is None else len(self.slopes)

    def decode_bias(self) -> torch.Tensor | None:
        """The fp32 bias of a one-query-row forward: (1, H, 1, Tk) key-only ALiBi when nothing else
        applies (exact there: the query is the last position), else the full (B|1, H|1, 1, Tk) bias."""
        if self.simple:
            return self.key_bias
        return next(self.bias_chunks(torch.float32))[2]

    def row_chunks(self, dtype_bytes: int = 4) -> list[tuple[int, int]]:
        """Query-row ranges whose bias fits in ATTN_CHUNK_BYTES (sized by the bias's real batch and heads)."""
        batch, heads = self.bias_shape()
        rows = max(1, ATTN_CHUNK_BYTES * self._budget_scale // (dtype_bytes * batch * heads * self.k_len))
        return [(s, min(s + rows, self.q_len)) for s in range(0, self.q_len, rows)]

    def bias_chunks(self, dtype: torch.dtype):
        """Yield (start, end, bias in `dtype`) over all query rows. Built once per forward and reused by
        every layer while the whole bias fits in BIAS_CACHE_BYTES; otherwise rebuilt chunk by chunk."""
        if dtype in self._chunks:
            yield from self._chunks[dtype]
            return
        batch, heads = self.bias_shape()
        size = torch.finfo(dtype).bits // 8
        keep = batch * heads * self.q_len * self.k_len * size <= BIAS_CACHE_BYTES * self._budget_scale
        built = []
        for start, end in self.row_chunks(size):
            chunk = (start, end, self.bias(start, end).to(dtype))
            if keep:
                built.append(chunk)
            yield chunk
        if keep:
            self._chunks[dtype] = built


# -- attention paths: (B, H, Tq, D) queries x (B, Hkv, Tk, D) keys/values -> (B, H, Tq, D) ---------------
# MPTAttention.forward picks one; each is exact (tested against eager_attention).


def causal_attention(q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
    """No ALiBi, no cache, no padding: SDPA's causal kernels (flash on GPU), no mask tensor at all."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa)


def key_bias_attention(q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
    """ALiBi on CPU without cache or padding: a (1, H, 1, Tk) key-only bias with is_causal.

    Only the CPU flash kernel takes a mask together with is_causal (the GPU kernels and the math
    fallback used for dropout refuse it); it builds no (T x T) tensor at any length.
    """
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.key_bias, is_causal=True, scale=scale, enable_gqa=gqa)


def biased_attention(q, k, v, mask: AttentionMask, scale: float, dropout_p: float) -> torch.Tensor:
    """Everything else (ALiBi on GPU, KV cache, padding, packed documents): an explicit additive bias,
    in query-row chunks, built once per forward and shared by the layers while it is small enough.
    CPU kernels take an fp32 bias with bf16 inputs; CUDA ones want the inputs' dtype (half the bytes)."""
    gqa = q.shape[1] != k.shape[1]
    out = [
        F.scaled_dot_product_attention(
            q[:, :, start:end], k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )  # (B, H, end - start, D)
        for start, end, bias in mask.bias_chunks(torch.float32 if q.device.type == "cpu" else q.dtype)
    ]
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query row per sequence: two small matmuls beat a fused kernel's per-call setup here.

    Query heads are grouped under their shared key/value head (a view, not a copy) for GQA/MQA.
    """
    B, H, _, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    qg = q.view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G, T)
    if key_bias is not None:  # (B|1, H|1, 1, T): per-head slopes and/or per-row masks
        per_head = key_bias.shape[1] > 1
        scores = scores + key_bias.view(key_bias.shape[0], Hkv if per_head else 1, H // Hkv if per_head else 1, T)
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(B, H, 1, D)  # (B, H, 1, D)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float, dropout_p: float
) -> torch.Tensor:
    """Reference: materializes the (B, H, Tq, Tk) scores in fp32. For tests and debugging."""
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale + mask.bias(0, mask.q_len)  # (B, H, Tq, Tk)
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return probs.to(v.dtype) @ v


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float, dropout_p: float
) -> torch.Tensor:
    """flash-attn 2 on CUDA (ALiBi via alibi_slopes; causal aligned bottom-right for the KV cache)."""
    from flash_attn import flash_attn_func  # optional dependency, CUDA only

    slopes = mask.slopes.float() if mask.slopes is not None else None
    out = flash_attn_func(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=True,
        alibi_slopes=slopes,
    )  # (B, Tq, H, D)
    return out.transpose(1, 2)


class MPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.kv_dim = cfg.kv_heads * cfg.head_dim
        self.Wqkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.kv_dim, bias=not cfg.no_bias)  # fused QKV
        if cfg.qk_ln:
            self.q_ln = build_norm(cfg, cfg.d_model)
            self.k_ln = build_norm(cfg, self.kv_dim)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=not cfg.no_bias)
        self.out_proj._is_residual = True  # type: ignore[assignment]  # init scaled by 1/sqrt(2L)
        self.scale = cfg.softmax_scale or 1 / math.sqrt(cfg.head_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d) -> q (B, H, T, D), k and v (B, Hkv, T, D): fused QKV, clipped, QK-LayerNorm."""
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = self.Wqkv(x)  # (B, T, d + 2 * kv_dim)
        if cfg.clip_qkv:
            qkv = qkv.clamp(min=-cfg.clip_qkv, max=cfg.clip_qkv)
        q, k, v = qkv.split([cfg.d_model, self.kv_dim, self.kv_dim], dim=-1)
        if cfg.qk_ln:
            q, k = self.q_ln(q).to(v.dtype), self.k_ln(k).to(v.dtype)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: AttentionMask, cache: Cache | None, layer: int) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if cache is None:
            y = self.attention(q, k, v, mask)
        else:  # a KVCache, or the server's paged cache (each sequence of a step attends to its own blocks)
            y = cache.attend(layer, q, k, v, self.attention, mask, self.scale)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, cfg.d_model))  # (B, T, d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        """The attention path for this call's mask, device and mode (each is exact; see the paths above)."""
        cfg = self.cfg
        dropout_p = cfg.attn_pdrop if self.training else 0.0
        fresh = mask.simple and mask.q_len == mask.k_len  # training / prefill: no cache, padding or packing
        if cfg.attn_impl == "eager":  # the reference: materializes the scores
            y = eager_attention(q, k, v, mask, self.scale, dropout_p)
        elif cfg.attn_impl == "flash" and q.is_cuda and mask.simple:  # flash-attn 2, ALiBi by slopes
            y = flash_attention(q, k, v, mask, self.scale, dropout_p)
        elif fresh and mask.key_bias is None:  # no ALiBi
            y = causal_attention(q, k, v, mask, self.scale, dropout_p)
        elif fresh and q.device.type == "cpu" and dropout_p == 0:
            y = key_bias_attention(q, k, v, mask, self.scale, dropout_p)
        elif mask.q_len == 1 and mask.sequence_id is None and dropout_p == 0:  # decoding one token per row
            y = decode_attention(q, k, v, mask.decode_bias(), self.scale)
        else:
            y = biased_attention(q, k, v, mask, self.scale, dropout_p)
        return y


class MPTMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=not cfg.no_bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=not cfg.no_bias)
        self.down_proj._is_residual = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))  # (B, T, d) -> (B, T, ffn) -> (B, T, d)


class MPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_1 = build_norm(cfg, cfg.d_model)
        self.attn = MPTAttention(cfg)
        self.norm_2 = build_norm(cfg, cfg.d_model)
        self.ffn = MPTMLP(cfg)
        self.resid_attn_dropout = nn.Dropout(cfg.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: AttentionMask, cache: Cache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.resid_attn_dropout(self.attn(self.norm_1(x), mask, cache, layer))
        return x + self.resid_ffn_dropout(self.ffn(self.norm_2(x)))


class MPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.learned_pos_emb:
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.emb_pdrop)
        self.blocks = nn.ModuleList(MPTBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = build_norm(cfg, cfg.d_model)
        # ALiBi slopes per device, computed once. Not a registered buffer: `model.to(torch.bfloat16)`
        # casts every float buffer, and 2^-0.5-style slopes (n_heads > 8) are not exact in bf16.
        self._slopes: dict[torch.device, torch.Tensor] = {}

    def alibi_slopes(self, device: torch.device) -> torch.Tensor | None:
        """(H,) fp32 ALiBi slopes on `device`, or None without ALiBi."""
        if not self.cfg.alibi:
            return None
        if device not in self._slopes:
            self._slopes[device] = alibi_slopes(self.cfg.n_heads, self.cfg.alibi_bias_max).to(device)
        return self._slopes[device]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) final hidden states.

        attention_mask: (B, past + T), 1 for real tokens, 0 for padding. sequence_id: (B, past + T)
        document index of each position, for packed sequences. cache: appended to in place.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        x = self.wte(input_ids)  # (B, T, d)
        if self.cfg.learned_pos_emb:
            pos = (
                token_positions(0, T, attention_mask, x.device)
                if cache is None
                else cache.positions(T, attention_mask, x.device)
            )
            if int(pos.max()) >= self.cfg.max_seq_len:
                raise ValueError(
                    f"position {int(pos.max())} is past max_seq_len {self.cfg.max_seq_len} "
                    "(learned position embeddings cannot extrapolate; ALiBi models can)"
                )
            x = x + self.wpe(pos)
        if self.cfg.embedding_fraction < 1:  # scales the embedding gradient only (GLM-130B's trick)
            f = self.cfg.embedding_fraction
            x = x * f + x.detach() * (1 - f)
        x = self.emb_drop(x)
        key_valid = attention_mask.bool() if attention_mask is not None and not attention_mask.all() else None
        mask = AttentionMask(T, past + T, self.alibi_slopes(x.device), x.device, key_valid, sequence_id)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)


class ChunkedLMLoss(torch.autograd.Function):
    """Mean next-token cross-entropy of `h @ weight^T`, never materializing the (N, vocab) logits.

    Rows are processed in chunks; each chunk's softmax gradient is turned into gradients for `h`
    and `weight` immediately, in the forward pass, so the only (chunk, vocab) tensor alive is the
    current one. Same FLOPs as logits + F.cross_entropy, far less memory traffic: with a 50k
    vocabulary the logits are most of a small model's activation memory.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float, chunk: int):
        n = h.shape[0]  # h: (N, d), weight: (V, d), targets: (N,) with -100 = ignore
        valid = targets != -100
        count = max(int(valid.sum()), 1)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hs, ts, vs = h[s : s + chunk], targets[s : s + chunk].clamp(min=0), valid[s : s + chunk]
            logits = (hs @ weight.t()).float().mul_(scale)  # (c, V); in place: no second (c, V) buffer
            lse = logits.logsumexp(dim=-1)
            total += ((lse - logits.gather(1, ts[:, None]).squeeze(1)) * vs).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs[torch.arange(len(ts), device=h.device), ts] -= 1
            g = (probs * (vs[:, None] * (scale / count))).to(h.dtype)  # dloss/dlogits_raw
            grad_h[s : s + chunk] = g @ weight
            grad_w += (g.t() @ hs).float()
            del logits, probs, g  # freed before the next chunk's: at most 3 (c, V) buffers live, not 5
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None


def chunked_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float, chunk: int):
    """ChunkedLMLoss's value alone (no gradient work): the mean cross-entropy, `chunk` rows of logits at a time."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = (h[s : s + chunk] @ weight.t()).float() * scale  # (c, V)
        total += F.cross_entropy(logits, targets[s : s + chunk], ignore_index=-100, reduction="sum")
    return total / max(int((targets != -100).sum()), 1)


class MPTForCausalLM(nn.Module):
    """The MPT language model: `transformer` (MPT's name for the trunk) plus the LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = MPTModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Inference may swap the head's matmul for another module (int8 weights: longboi.quantize);
        # None computes it from head_weight, which training always does.
        self.head_proj: nn.Module | None = None
        self.apply(self.init_module)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        cache: Cache | None = None,
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, vocab) logits; only the last `logits_to_keep` positions if > 0.

        With `labels` (B, T) (already shifted: labels[t] is the token after input t; -100 ignores a
        position) it returns the mean cross-entropy instead, computed chunk-wise (ChunkedLMLoss).
        With `logits_mask` (B, T) bool it returns (N, vocab) logits of the N selected positions only
        (scoring a few continuation tokens need not pay for the LM head everywhere).
        """
        h = self.transformer(input_ids, attention_mask, sequence_id, cache)
        if logits_mask is not None:
            return self.head(h[logits_mask])  # (N, vocab)
        if labels is not None:
            weight = self.head_weight
            if torch.is_autocast_enabled(h.device.type):  # autograd.Function bodies run outside autocast rules
                dtype = torch.get_autocast_dtype(h.device.type)
                h, weight = h.to(dtype), weight.to(dtype)
            scale = self.config.logit_scale if self.config.logit_scale is not None else 1.0
            h, targets = h.flatten(0, 1), labels.flatten()
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                return ChunkedLMLoss.apply(h, weight, targets, scale, LOSS_CHUNK_ROWS)
            return chunked_lm_loss(h, weight, targets, scale, LOSS_CHUNK_ROWS)  # evaluation: no gradients
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) hidden states -> (..., vocab) logits. Separate so a loss can run it in chunks."""
        weight = self.head_weight
        if self.head_proj is not None:
            logits = self.head_proj(h)
        elif h.device.type == "cpu" and weight.dtype == torch.float32 and h.numel() <= CPU_HEAD_ROWS * h.shape[-1]:
            logits = (weight @ h.reshape(-1, h.shape[-1]).T).T.reshape(*h.shape[:-1], len(weight))  # transposed view
        else:
            logits = F.linear(h, weight)
        return logits * self.config.logit_scale if self.config.logit_scale is not None else logits

    @property
    def head_weight(self) -> torch.Tensor:
        """(vocab, d) LM-head weight: the embedding table when tied."""
        return self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty KV cache; give the final length (prompt + new tokens) when known."""
        return KVCache(self.config.n_layers, capacity)

    def init_module(self, module: nn.Module) -> None:
        """MPT's init: kaiming-normal (fan_in) or normal weights, residual projections scaled down. Public: a
        sharded start applies it to full-size stand-ins of each module's weights (train/parallelize.py)."""
        cfg = self.config
        if isinstance(module, nn.Linear):
            self._init_weight(module.weight, cfg.init_std)
            if getattr(module, "_is_residual", False) and cfg.init_div_is_residual:
                with torch.no_grad():
                    module.weight.div_(math.sqrt(2 * cfg.n_layers))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if cfg.emb_init_std is not None:
                nn.init.normal_(module.weight, std=cfg.emb_init_std)
            else:
                self._init_weight(module.weight, cfg.init_std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def _init_weight(self, weight: torch.Tensor, std: float) -> None:
        if self.config.init_scheme == "kaiming_normal":
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
        else:
            nn.init.normal_(weight, std=std)


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters (tied weights once). non_embedding leaves out wte/wpe, as scaling laws count."""
    total = 0
    for name, p in model.named_parameters():
        if non_embedding and (".wte." in f".{name}" or ".wpe." in f".{name}"):
            continue
        total += p.numel()
    return total
