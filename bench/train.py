"""Benchmark longboi's training step against a plain transformers MptForCausalLM + AdamW loop.

    python bench/train.py [--models tiny,mpt-125m] [--steps 4] [--out bench/results/train.json]

Same config and initial weights, same batches (Tiny Shakespeare prepared by `longboi prepare`, NeoX
tokenizer), same dtype. Ours is the trainer's own `train_step` + optimizer (fused AdamW, bf16
autocast with low-precision LayerNorm); the peer is the textbook HF loop (`model(ids, labels=ids)`,
`torch.optim.AdamW`). Alternating steps after warm-up; medians; tokens/s, MFU and ours/peer.
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


def measure(name: str, precision: str, batch: int, seq: int, data_dir: Path, steps: int) -> dict:
    """Median step time of ours and the peer on the same batches, alternating after one warm-up step."""
    sys.path.insert(0, str(Path(__file__).parent))
    from model import load_pair  # bench/model.py: ours + HF with identical weights

    from longboi.data.stream import StreamingDataset, StreamLoader
    from longboi.plan import model_stats
    from longboi.train.config import OptimizerConfig
    from longboi.train.loop import train_step
    from longboi.train.monitor import peak_flops
    from longboi.train.optim import build_optimizer
    from longboi.train.parallelize import Dist

    ours, theirs = load_pair(name)
    ours.train()
    theirs.train()
    opt_ours = build_optimizer(ours, OptimizerConfig(lr=1e-4))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    stream = iter(StreamLoader(StreamingDataset(str(data_dir / "train"), seed=0), batch, batch))
    batches = [next(stream) for _ in range(steps + 1)]

    def step_ours(b):
        train_step(ours, opt_ours, iter([b]), 1, autocast, 1.0, Dist())
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs(b):
        with autocast:
            loss = theirs(b[:, :-1], labels=b[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    step_ours(batches[0])  # warm-up
    step_theirs(batches[0])
    t_ours, t_peer = [], []
    for b in batches[1:]:
        for fn, out in ((step_ours, t_ours), (step_theirs, t_peer)):
            start = time.perf_counter()
            fn(b)
            out.append(time.perf_counter() - start)
    tokens = batch * seq
    tok_ours, tok_peer = tokens / statistics.median(t_ours), tokens / statistics.median(t_peer)
    flops = model_stats(ours.config, seq).train_flops_per_token
    peak = peak_flops(torch.device("cpu"), precision == "bf16")
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
    }


def main() -> None:
    from longboi.data.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mpt-125m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="longboi-bench-train-"))
    results = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}, "rows": []}
    print(f"# training step: longboi vs transformers MptForCausalLM + AdamW ({torch.get_num_threads()} threads)")
    print(
        f"{'model':<10}{'dtype':<10}{'batch':>8}{'ours tok/s':>12}{'peer tok/s':>12}{'ours MFU':>10}"
        f"{'peer MFU':>10}{'ours/peer':>11}"
    )
    for name in args.models.split(","):
        batch, seq = SHAPES[name]
        data_dir = tmp / f"data-{seq}"
        if not data_dir.exists():
            prepare([str(SHARED / "text" / "tinyshakespeare.txt")], str(data_dir), str(TOKENIZER), seq_len=seq + 1)
        for precision in ("fp32", "bf16"):
            row = measure(name, precision, batch, seq, data_dir, args.steps)
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
