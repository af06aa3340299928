"""Benchmark longboi's training step against a plain transformers MptForCausalLM + AdamW loop.

    python bench/train.py [--models tiny,mpt-125m] [--steps 4] [--precisions fp32,bf16] [--device cuda]
                          [--batch 8 --seq 2048] [--out bench/results/train.json]

Same config and initial weights, same batches (Tiny Shakespeare prepared by `longboi prepare`, NeoX
tokenizer), same dtype. Ours is the trainer's own `train_step` + optimizer (fused AdamW, bf16
autocast with low-precision LayerNorm); the peer is the textbook HF loop (`model(ids, labels=ids)`,
`torch.optim.AdamW`). Alternating steps after warm-up; medians; tokens/s, MFU and ours/peer.
Precisions default to fp32 plus bf16 where the device computes bf16 natively (on an AVX2-only CPU a
bf16 step takes minutes). On CUDA the peer may run out of memory (it materializes the attention
scores); that row then says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
SHAPES = {"tiny": (8, 256), "mpt-125m": (4, 512)}  # (global batch, seq) per model


def measure(name: str, precision: str, batch: int, seq: int, data_dir: Path, steps: int, device: str) -> dict:
    """Median step time of ours and the peer on the same batches, alternating after one warm-up step."""
    sys.path.insert(0, str(Path(__file__).parent))
    from model import load_pair  # bench/model.py: ours + HF with identical weights

    from longboi.config import preset
    from longboi.data.stream import StreamingDataset, StreamLoader
    from longboi.flops import model_stats
    from longboi.hardware import cpu_capability, peak_flops
    from longboi.train.config import OptimizerConfig
    from longboi.train.loop import train_step
    from longboi.train.optim import build_optimizer
    from longboi.train.parallelize import Dist

    dev = torch.device(device)
    ours, theirs = load_pair(name, max_seq_len=max(seq, preset(name).max_seq_len))
    ours.to(dev).train()
    theirs.to(dev).train()
    opt_ours = build_optimizer(ours, OptimizerConfig(lr=1e-4))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=dev.type == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    stream = iter(StreamLoader(StreamingDataset(str(data_dir / "train"), seed=0), batch, batch))
    batches = [next(stream).to(dev) for _ in range(steps + 1)]

    def step_ours(b):
        train_step(ours, opt_ours, iter([b]), 1, autocast, 1.0, Dist(device=dev))
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs(b):
        with autocast:
            loss = theirs(b[:, :-1], labels=b[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    def timed(fn, b) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    step_ours(batches[0])  # warm-up
    peer_ok = _fits(step_theirs, batches[0])
    t_ours, t_peer = [], []
    for b in batches[1:]:
        t_ours.append(timed(step_ours, b))
        if peer_ok:
            t_peer.append(timed(step_theirs, b))
    tokens = batch * seq
    tok_ours = tokens / statistics.median(t_ours)
    tok_peer = tokens / statistics.median(t_peer) if peer_ok else float("nan")
    flops = model_stats(ours.config, seq).train_flops_per_token
    peak = peak_flops(dev, precision == "bf16")
    return {
        "model": name,
        "precision": precision,
        "batch": f"{batch}x{seq}",
        "ours_tok_s": tok_ours,
        "peer_tok_s": tok_peer,
        "ours_mfu": flops * tok_ours / peak,
        "peer_mfu": flops * tok_peer / peak,
        "ratio": tok_ours / tok_peer,
        "peak_flops": peak,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU {cpu_capability()}",
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }


def _fits(step, batch) -> bool:
    """Run the peer's warm-up step; False if it runs out of GPU memory (then it is left out)."""
    try:
        step(batch)
        return True
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False


def main() -> None:
    from longboi.data.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mpt-125m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precisions", default=None, help="default: fp32, plus bf16 where native")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="override the per-model batch")
    parser.add_argument("--seq", type=int, default=None, help="override the per-model sequence length")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = parser.parse_args()
    from longboi.hardware import cpu_capability, native_bf16

    native, why = native_bf16(torch.device(args.device))
    precisions = (args.precisions or ("fp32,bf16" if native else "fp32")).split(",")
    tmp = Path(tempfile.mkdtemp(prefix="longboi-bench-train-"))
    machine = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_capability(), "bf16": why}
    results = {"machine": machine, "rows": []}
    print(f"# training step: longboi vs transformers MptForCausalLM + AdamW ({args.device}; {why})")
    print(
        f"{'model':<10}{'dtype':<10}{'batch':>8}{'ours tok/s':>12}{'peer tok/s':>12}{'ours MFU':>10}"
        f"{'peer MFU':>10}{'ours/peer':>11}"
    )
    for name in args.models.split(","):
        batch, seq = SHAPES.get(name, (4, 512))
        batch, seq = args.batch or batch, args.seq or seq
        data_dir = tmp / f"data-{seq}"
        if not data_dir.exists():
            prepare([str(SHARED / "text" / "tinyshakespeare.txt")], str(data_dir), str(TOKENIZER), seq_len=seq + 1)
        for precision in precisions:
            row = measure(name, precision, batch, seq, data_dir, args.steps, args.device)
            results["rows"].append(row)
            print(
                f"{name:<10}{precision:<10}{row['batch']:>8}{row['ours_tok_s']:>12.0f}{row['peer_tok_s']:>12.0f}"
                f"{100 * row['ours_mfu']:>9.1f}%{100 * row['peer_mfu']:>9.1f}%{row['ratio']:>10.2f}x"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
