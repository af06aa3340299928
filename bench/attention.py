"""ALiBi causal attention, forward + backward: the model's path against the alternatives, on one device.

    python bench/attention.py [--device cuda] [--batch 8 --heads 12 --seq 2048 --head-dim 64] [--dtype bf16]
                              [--out bench/results/attention.json]

Candidates (each checked against the eager fp32 reference, max |difference| of the output):
- `model`: what `MPTForCausalLM` runs in training (picked in `MPTAttention.forward`): on CPU the flash
  kernel with a key-only bias and `is_causal`; on CUDA one SDPA call per layer over a bias built
  once per forward and shared by the layers (the bias is cached in the AttentionMask).
- `bias per call`: SDPA with the full (1, H, T, T) bias rebuilt for each call (no sharing).
- `flex`: FlexAttention, compiled, ALiBi as a `score_mod` and a causal block mask (no bias tensor).
- `causal, no ALiBi`: SDPA `is_causal` alone. Not exact (no ALiBi): the speed floor, for scale.
The table gives milliseconds per call (median) and the error; the fastest exact one should be the
model's path on that device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longboi.hardware import cpu_capability
from longboi.model import AttentionMask, alibi_slopes, biased_attention, eager_attention, key_bias_attention

ROOT = Path(__file__).resolve().parents[1]


def candidates(slopes: torch.Tensor, T: int, device: torch.device, scale: float) -> dict:
    shared = AttentionMask(T, T, slopes, device)  # one per forward in the model, shared by its layers

    def model_path(q, k, v):  # what MPTAttention.forward picks for training on this device
        path = biased_attention if q.is_cuda else key_bias_attention
        return path(q, k, v, shared, scale, 0.0)

    def bias_per_call(q, k, v):
        bias = AttentionMask(T, T, slopes, device).bias(0, T).to(q.dtype if q.is_cuda else torch.float32)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    def causal_only(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    out = {"model": model_path, "bias per call": bias_per_call, "causal, no ALiBi": causal_only}
    flex = _flex(slopes, T, device, scale)
    if flex is not None:
        out["flex"] = flex
    return out


def _flex(slopes: torch.Tensor, T: int, device: torch.device, scale: float):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=device)

    def run(q, k, v):
        return compiled(q, k, v, score_mod=alibi, block_mask=block_mask, scale=scale)

    return run


def timed(fn, q, k, v, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of forward + backward, and the forward output."""
    times, out = [], None
    for i in range(repeats + 2):  # two warm-up calls (compilation, allocator)
        q.grad = k.grad = v.grad = None
        _sync(q)
        start = time.perf_counter()
        out = fn(q, k, v)
        out.float().sum().backward()
        _sync(q)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out.detach()


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "attention.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    B, H, T, D = args.batch or (8 if cuda else 2), args.heads, args.seq or (2048 if cuda else 512), args.head_dim
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    slopes, scale = alibi_slopes(H).to(device), D**-0.5
    with torch.no_grad():
        ref = eager_attention(q.float(), k.float(), v.float(), AttentionMask(T, T, slopes, device), scale, 0.0)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU {cpu_capability()}, {torch.get_num_threads()} threads"
    print(f"# ALiBi causal attention fwd+bwd, B={B} H={H} T={T} D={D} {dtype}, {where}")
    print(f"{'candidate':<18}{'ms':>10}{'max |err|':>12}")
    rows = []
    for name, fn in candidates(slopes, T, device, scale).items():
        try:
            seconds, out = timed(fn, q, k, v, args.repeats)
        except Exception as e:  # a backend this build or device lacks: say so, keep going
            print(f"{name:<18}{'failed':>10}  {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        err = float((out.float() - ref).abs().max())
        rows.append({"candidate": name, "ms": 1e3 * seconds, "max_abs_err": err})
        print(f"{name:<18}{1e3 * seconds:>10.2f}{err:>12.2e}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shape = {"batch": B, "heads": H, "seq": T, "head_dim": D, "dtype": str(dtype)}
    out_path.write_text(json.dumps({"device": where, "shape": shape, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
