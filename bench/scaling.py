"""Does a ladder of small runs predict a bigger one? Train configs/scaling/r1-r5, fit L(C) = a * C^-b + c,
predict the held-out run (about 4x the largest compute) before training it, then train it and compare.

    python bench/scaling.py [--reuse] [--out bench/results/scaling.json] [--png bench/results/scaling.png]

Data: Tiny Shakespeare + TinyStories (../shared/data/text), a 320-id byte-level BPE trained on their
first 90%, prepared into runs/scaling/data (10% held out for validation). Every run trains in fp32
with the same recipe (configs/scaling/*.yaml); sizes and tokens are compute-optimal under the
Besiroglu et al. 2024 Chinchilla fit. The prediction's error is in held-out validation loss (nats/token).
--reuse keeps finished runs (the fit and prediction are recomputed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from longboi.cli import main as longboi
from longboi.flops import model_stats
from longboi.hardware import cpu_capability, cpu_model
from longboi.runs import read_metrics
from longboi.scaling import fit_runs, plot_fit, read_run
from longboi.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    str(ROOT.parent / "shared" / "data" / "text" / f) for f in ("tinyshakespeare.txt", "tinystories_valid_head.txt")
]
WORK = ROOT / "runs" / "scaling"
LADDER = ["r1", "r2", "r3", "r4", "r5"]


def prepare() -> None:
    if (WORK / "data" / "val" / "index.json").is_file():
        return
    tok = str(WORK / "tokenizer.json")
    assert longboi(["train-tokenizer", *TEXTS, "--vocab-size", "320", "--holdout-fraction", "0.1", "--out", tok]) == 0
    args = [
        "prepare",
        *TEXTS,
        "--out",
        str(WORK / "data"),
        "--tokenizer",
        tok,
        "--seq-len",
        "129",
        "--val-fraction",
        "0.1",
    ]
    assert longboi(args) == 0


def train(name: str, reuse: bool) -> float:
    """Train configs/scaling/NAME.yaml from the repository root; seconds taken (training alone when reused)."""
    run = WORK / name
    if reuse and (run / "final").is_dir():  # its own training time, from its log
        return next(r["elapsed_s"] for r in reversed(read_metrics(run)) if r["kind"] == "train")
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    assert longboi(["train", str(ROOT / "configs" / "scaling" / f"{name}.yaml")]) == 0
    return time.perf_counter() - start


def planned_flops(name: str) -> float:
    """The run's training FLOPs from its config alone (tokens x the MFU counter's FLOPs/token)."""
    cfg = load_train_config(ROOT / "configs" / "scaling" / f"{name}.yaml")
    tokens = float(cfg.max_duration.removesuffix("tok"))
    return tokens * model_stats(cfg.model, 128).train_flops_per_token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"))
    p.add_argument("--png", default=str(ROOT / "bench" / "results" / "scaling.png"))
    args = p.parse_args()
    import os

    os.chdir(ROOT)  # the configs' paths are relative to the repository root
    prepare()
    seconds = {name: train(name, args.reuse) for name in LADDER}
    points = [read_run(WORK / name) for name in LADDER]
    fit, pred = fit_runs(points, planned_flops("heldout"))  # predicted before the held-out run exists
    print("the same runs without a floor (c = 0):")
    bare, bare_pred = fit_runs(points, planned_flops("heldout"), floor=False)
    seconds["heldout"] = train("heldout", args.reuse)
    actual = read_run(WORK / "heldout")
    error, bare_error = (100 * (p.loss / actual.loss - 1) for p in (pred, bare_pred))
    inside = pred.low <= actual.loss <= pred.high
    print(
        f"held-out run: {actual.flops:.3g} FLOPs, loss {actual.loss:.4f}; predicted {pred.loss:.4f} ({error:+.2f}%), "
        f"{'inside' if inside else 'outside'} the 90% interval {pred.low:.4f}-{pred.high:.4f}; "
        f"without a floor {bare_pred.loss:.4f} ({bare_error:+.2f}%)"
    )
    plot_fit(points, fit, pred, args.png, actual=actual.loss, alt=(bare, bare_pred))
    result = {
        "env": {"cpu": cpu_model(), "cpu_capability": cpu_capability()},
        "runs": [vars(r) | {"seconds": seconds[r.name]} for r in [*points, actual]],
        "fit": {"a": fit.a, "b": fit.b, "c": fit.c, "scale": fit.scale},
        "prediction": {"flops": pred.flops, "loss": pred.loss, "low": pred.low, "high": pred.high},
        "actual_loss": actual.loss,
        "error_pct": error,
        "inside_interval": inside,
        "no_floor": {"a": bare.a, "b": bare.b, "prediction": bare_pred.loss, "error_pct": bare_error},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
