"""Choose the demo's model by measurement: held-out bits per byte after the same wall-clock budget.

    python bench/demo_recipe.py [--budget 6min] [--only NAME,...] [--out FILE]
                                [--emulate-avx2]

Each candidate (tokenizer vocabulary, width, depth, batch, lr) trains the demo recipe
(configs/pretrain/tiny-shakespeare.yaml) for the same wall-clock budget on Tiny Shakespeare's first
90%, and is scored in bits per byte on the last 10% (fair across tokenizers). Candidates run one
after another (never two at once: on 2 cores that would halve both). `precision: auto` as in the demo,
so the figures hold for this CPU's capability, printed with the table. --emulate-avx2 caps this CPU's
instruction set at AVX2 (ATen, oneDNN and MKL kernels) and trains in fp32, as `auto` does on an AVX2 machine:
an estimate for that kind (its clock and caches are this CPU's), recorded with this CPU's fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
RECIPE = ROOT / "configs" / "pretrain" / "tiny-shakespeare.yaml"

# name: (vocab, d_model, n_heads, n_layers, global batch, lr, extra overrides)
CANDIDATES = {
    "v4k-d384L6-b16": (4096, 384, 6, 6, 16, 2e-3, []),  # the earlier demo model, in fp32
    "v4k-d256L6-b16": (4096, 256, 4, 6, 16, 3e-3, []),
    "v4k-d256L6-b8": (4096, 256, 4, 6, 8, 2e-3, []),
    "v4k-d256L6-b8-drop": (4096, 256, 4, 6, 8, 2e-3, ["--model.resid_pdrop=0.1", "--model.emb_pdrop=0.1"]),
    "v4k-d256L6-b4": (4096, 256, 4, 6, 4, 1.5e-3, []),
    "v4k-d256L8-b8": (4096, 256, 4, 8, 8, 2e-3, []),
    "v4k-d320L6-b8": (4096, 320, 5, 6, 8, 2e-3, []),
    "v2k-d256L6-b8": (2048, 256, 4, 6, 8, 2e-3, []),
    "v4k-d256L4-b8": (4096, 256, 4, 4, 8, 2e-3, []),
    "v4k-d256L6-b2": (4096, 256, 4, 6, 2, 1e-3, []),
    "v4k-d256L6-b4-lr2.5": (4096, 256, 4, 6, 4, 2.5e-3, []),
    "v4k-d256L8-b4": (4096, 256, 4, 8, 4, 1.5e-3, []),
    "v4k-d320L6-b4": (4096, 320, 5, 6, 4, 1.5e-3, []),
    "v4k-d256L6-b1": (4096, 256, 4, 6, 1, 7e-4, []),
    "v4k-d320L6-b2": (4096, 320, 5, 6, 2, 1e-3, []),
    "v4k-d256L6-b2-lr1.5": (4096, 256, 4, 6, 2, 1.5e-3, []),  # the demo recipe (AdamW)
    # Optimizers on the demo recipe (issue 22): Muon keeps AdamW's lr (its lr rule matches AdamW's update
    # RMS); Lion's sign updates are larger, so its lr is a few times smaller (as its paper advises).
    "v4k-d256L6-b2-muon": (4096, 256, 4, 6, 2, 1.5e-3, ["--optimizer.name=muon"]),
    "v4k-d256L6-b2-muon-lr3": (4096, 256, 4, 6, 2, 3e-3, ["--optimizer.name=muon"]),
    "v4k-d256L6-b2-lion": (4096, 256, 4, 6, 2, 3e-4, ["--optimizer.name=lion"]),
}


def longboi(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "longboi", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def prepare(work: Path, vocab: int) -> tuple[Path, Path]:
    """The tokenizer (trained on the first 90% only) and the prepared splits for one vocabulary."""
    tok, data = work / f"tok-{vocab}.json", work / f"data-{vocab}"
    if not tok.is_file():
        longboi("train-tokenizer", str(SHAKESPEARE), "--vocab-size", str(vocab), "--holdout-fraction", "0.1",
                "--out", str(tok))  # fmt: skip
    if not (data / "val" / "index.json").is_file():
        longboi("prepare", str(SHAKESPEARE), "--out", str(data), "--tokenizer", str(tok), "--seq-len", "257",
                "--val-fraction", "0.1")  # fmt: skip
    return tok, data


AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
MATMUL = (
    "import time, torch; a = torch.randn(2048, 2048); b = a @ a; t = time.perf_counter()\n"
    "for _ in range(10): b = a @ a\n"
    "print(torch.backends.cpu.get_cpu_capability(), 10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9)"
)


def fp32_matmul() -> tuple[str, float]:
    """(capability, GFLOP/s of a 2048^3 fp32 matmul) in a fresh process, under this process's environment."""
    out = subprocess.run([sys.executable, "-c", MATMUL], capture_output=True, text=True, check=True).stdout.split()
    return out[0], float(out[1])


def run(name: str, work: Path, budget: str, more: tuple[str, ...] = ()) -> dict:
    vocab, d, heads, layers, batch, lr, extra = CANDIDATES[name]
    extra = [*extra, *more]
    tok, data = prepare(work, vocab)
    run_dir = work / "runs" / f"{name}-{budget}"
    overrides = [
        f"--run_dir={run_dir}", f"--tokenizer={tok}", f"--data.sources=[{data / 'train'}]",
        f"--data.val={data / 'val'}", f"--max_duration={budget}", f"--model.vocab_size={vocab}",
        f"--model.d_model={d}", f"--model.n_heads={heads}", f"--model.n_layers={layers}",
        f"--global_batch_size={batch}", f"--micro_batch_size={batch}", f"--optimizer.lr={lr}",
        "--checkpoint.autoresume=false", "--log.progress=false", *extra,
    ]  # fmt: skip
    start = time.monotonic()
    longboi("train", str(RECIPE), *overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    dtype = "fp32" if "--precision=fp32" in extra else "auto"
    score = subprocess.run(
        [sys.executable, "-m", "longboi", "perplexity", str(run_dir / "final"), str(data / "val"), "--dtype", dtype],
        check=True, cwd=ROOT, capture_output=True, text=True,
    ).stdout  # fmt: skip
    train = [r for r in rows if r["kind"] == "train"]
    return {
        "name": name,
        "vocab": vocab,
        "d_model": d,
        "n_layers": layers,
        "batch": batch,
        "lr": lr,
        "extra": extra,
        "steps": train[-1]["step"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in train[-5:]) / len(train[-5:]),
        "val_bpb": evals[-1]["val_bpb"],  # the run's own evaluation: 128 of the 134 held-out samples
        "whole_split_bpb": float(score.split(" bits/byte")[0].rsplit(" ", 1)[1]),  # `longboi perplexity`
        "val_loss": evals[-1]["val_loss"],
        "wall_s": time.monotonic() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="6min")
    parser.add_argument("--only", default=",".join(CANDIDATES))
    parser.add_argument("--work", default=str(ROOT / "runs" / "demo-recipe"))
    parser.add_argument("--out", default=None, help="default: bench/results/demo_recipe[_avx2_emulated].json")
    parser.add_argument("--emulate-avx2", action="store_true")
    args = parser.parse_args()
    results_name = "demo_recipe_avx2_emulated.json" if args.emulate_avx2 else "demo_recipe.json"
    args.out = args.out or str(ROOT / "bench" / "results" / results_name)  # emulated rows never join measured ones
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    capability, more = torch.backends.cpu.get_cpu_capability(), ()
    if args.emulate_avx2:
        os.environ.update(AVX2_ENV)  # inherited by every training subprocess
        emulated, gflops = fp32_matmul()
        capability, more = (
            f"{emulated} (emulated on {capability}: fp32 matmul {gflops:.0f} GFLOP/s)",
            ("--precision=fp32",),
        )
    print(f"# demo recipe at {args.budget} of training, {torch.get_num_threads()} threads, CPU {capability}")
    print(f"{'candidate':<22}{'steps':>7}{'tok/s':>8}{'val bpb':>9}{'whole':>8}{'wall s':>8}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    for name in args.only.split(","):
        row = run(name, work, args.budget, more) | {"budget": args.budget, "cpu_capability": capability}
        results["runs"].append(row)
        print(
            f"{name:<22}{row['steps']:>7}{row['tokens_per_s']:>8.0f}{row['val_bpb']:>9.3f}{row['whole_split_bpb']:>8.3f}{row['wall_s']:>8.0f}"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")  # after each run: a long sweep keeps what it has
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
