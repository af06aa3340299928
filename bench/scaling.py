"""Optimizers on a scaling ladder, and a prediction put on record before its answer exists.

    python bench/scaling.py dev        # the development ladder (configs/scaling/dev): where the fitting form was chosen
    python bench/scaling.py ladder     # s1-s5 with AdamW and with Muon: fits, compute multiplier, predictions
    git add bench/results/scaling_prediction.json && git commit ...    # on record before p4/p16 are trained
    python bench/scaling.py heldout    # trains p4 and p16 with both optimizers; errors against the committed file

Data (ladder): Tiny Shakespeare + TinyStories + LAMBADA's passages (../shared/data), a 320-id byte-level BPE trained
on their first 90%, prepared into runs/scaling/data (10% held out). The development ladder uses Tiny Shakespeare +
TinyStories alone (runs/scaling/dev). Every run trains in fp32 (the same arithmetic on every CPU), lr 3e-3 cosine,
compute-optimal size and tokens under the Besiroglu et al. 2024 Chinchilla fit; Muon runs are the same configs with
`--optimizer.name muon` (its update is scaled to AdamW's RMS, so the lr carries over). Losses are held-out
validation loss (nats/token) over the whole split. --reuse keeps finished runs (fits are recomputed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from longboi.cli import main as longboi
from longboi.flops import model_stats
from longboi.hardware import cpu_capability, cpu_model
from longboi.runs import read_metrics
from longboi.scaling import (
    RunPoint,
    arrays_of,
    compute_multiplier,
    fit_power_law,
    fit_runs,
    predict,
    pyplot,
    read_run,
    save_loglog,
)
from longboi.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEXTS = [str(SHARED / "text" / f) for f in ("tinyshakespeare.txt", "tinystories_valid_head.txt")]
LAMBADA = SHARED / "eval" / "local_data" / "language_understanding" / "lambada_openai.jsonl"
WORK = ROOT / "runs" / "scaling"
LADDER, HELDOUT = ["s1", "s2", "s3", "s4", "s5"], ["p4", "p16"]
SEEDS = [17, 18]  # every ladder point twice (init and data order): a fit of one run per point cannot see the noise
OPTIMIZERS = ["adamw", "muon"]
RESULTS = ROOT / "bench" / "results"
PREDICTION = RESULTS / "scaling_prediction.json"
TRAIN_TOKENS = 2_128_629  # runs/scaling/data/train, as `prepare` reports it


def prepare(work: Path, texts: list[str]) -> None:
    if (work / "data" / "val" / "index.json").is_file():
        return
    tok = str(work / "tokenizer.json")
    assert longboi(["train-tokenizer", *texts, "--vocab-size", "320", "--holdout-fraction", "0.1", "--out", tok]) == 0
    args = ["prepare", *texts, "--out", str(work / "data"), "--tokenizer", tok, "--seq-len", "129"]
    assert longboi([*args, "--val-fraction", "0.1"]) == 0


def lambada_text() -> str:
    """LAMBADA's 5,153 novel passages (context + its last word) as one text file, passages apart by blank lines."""
    out = WORK / "lambada.txt"
    if not out.is_file():
        WORK.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in LAMBADA.read_text().splitlines() if line.strip()]
        out.write_text("\n\n".join(f"{r['context']} {r['continuation']}" for r in rows) + "\n")
    return str(out)


def train(config: Path, run: Path, optimizer: str | None, reuse: bool, seed: int = 17) -> float:
    """Train one config (AdamW as written, or another optimizer and seed by override); seconds of training."""
    if reuse and (run / "final").is_dir():  # its own training time, from its log
        return next(r["elapsed_s"] for r in reversed(read_metrics(run)) if r["kind"] == "train")
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    overrides = ["--run_dir", str(run), "--seed", str(seed), "--data.seed", str(seed)]
    overrides += ["--optimizer.name", optimizer] if optimizer else []
    assert longboi(["train", str(config), *overrides]) == 0
    return time.perf_counter() - start


def planned_flops(config: Path) -> float:
    """A run's training FLOPs from its config alone (tokens x the MFU counter's FLOPs/token)."""
    cfg = load_train_config(config)
    return float(cfg.max_duration.removesuffix("tok")) * model_stats(cfg.model, 128).train_flops_per_token


def env() -> dict:
    return {"cpu": cpu_model(), "cpu_capability": cpu_capability(), "threads": os.cpu_count()}


def point(run: RunPoint, seconds: float) -> dict:
    return vars(run) | {"seconds": round(seconds, 1)}


def dev(reuse: bool) -> None:
    """Backtest the two candidate forms on the development ladder: fit the first k runs, predict every larger one."""
    work, configs = WORK / "dev", ROOT / "configs" / "scaling" / "dev"
    prepare(work, TEXTS)
    names = ["r1", "r2", "r3", "r4", "r5", "heldout"]
    seconds = {n: train(configs / f"{n}.yaml", work / n, None, reuse) for n in names}
    points = [read_run(work / n) for n in names]
    flops, loss = arrays_of(points)
    backtest = []
    for floor in (False, True):
        for k in (3, 4, 5):
            fit = fit_power_law(flops[:k], loss[:k], floor)
            errors = {names[j]: 100 * (float(fit(flops[j])) / loss[j] - 1) for j in range(k, len(names))}
            backtest.append({"floor": floor, "fitted_runs": names[:k], "b": fit.b, "c": fit.c, "error_pct": errors})
            shown = "  ".join(f"{n} {e:+.2f}%" for n, e in errors.items())
            print(f"{'floor' if floor else 'no floor':8} fit r1-r{k}: b={fit.b:.3f} c={fit.c:.3f}   {shown}")
    result = {"env": env(), "runs": [point(p, seconds[p.name]) for p in points], "backtest": backtest}
    (RESULTS / "scaling_dev.json").write_text(json.dumps(result, indent=2) + "\n")


def ladder_points(optimizer: str, names: list[str], reuse: bool, seeds=(17,)) -> tuple[list[RunPoint], dict]:
    """Train configs/scaling/NAME.yaml once per seed into runs/scaling/OPTIMIZER/NAME[-seedS]."""
    configs, seconds, runs = ROOT / "configs" / "scaling", {}, []
    for n in names:
        for seed in seeds:
            run = WORK / optimizer / (n if seed == 17 else f"{n}-seed{seed}")
            other = None if optimizer == "adamw" else optimizer
            seconds[run.name] = train(configs / f"{n}.yaml", run, other, reuse, seed)
            runs.append(run)
    return [read_run(run) for run in runs], seconds


def ladder(reuse: bool) -> None:
    """Train s1-s5 with both optimizers, fit each with the frozen default procedure, predict p4 and p16 and write
    the prediction file (to be committed before `heldout` runs)."""
    prepare(WORK, [*TEXTS, lambada_text()])
    configs = ROOT / "configs" / "scaling"
    targets = {n: planned_flops(configs / f"{n}.yaml") for n in HELDOUT}
    out = {"env": env(), "procedure": "longboi.scaling defaults: pure power law (see its docstring)", "ladders": {}}
    points = {}
    for opt in OPTIMIZERS:
        points[opt], seconds = ladder_points(opt, LADDER, reuse, SEEDS)
        print(f"\n{opt}:")
        fit, _ = fit_runs(points[opt])
        preds = {n: predict(points[opt], fit, c) for n, c in targets.items()}
        out["ladders"][opt] = {
            "runs": [point(p, seconds[p.name]) for p in points[opt]],
            "fit": {"a": fit.a, "b": fit.b, "c": fit.c, "scale": fit.scale},
            "predictions": {
                n: {"flops": p.flops, "loss": p.loss, "low": p.low, "high": p.high} for n, p in preds.items()
            },
        }
    at = max(p.flops for p in points["adamw"])
    ratio, low, high = compute_multiplier(points["adamw"], points["muon"], at)
    print(
        f"\ncompute multiplier at AdamW's s5 loss: Muon needs 1/{ratio:.2f} of AdamW's compute "
        f"(90%: {low:.2f}-{high:.2f})"
    )
    out["multiplier"] = {"at_flops": at, "ratio": ratio, "low": low, "high": high}
    describe = ["git", "describe", "--always", "--dirty"]  # "-dirty": made from uncommitted code
    out["commit"] = subprocess.run(describe, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    PREDICTION.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {PREDICTION}: commit it before `python bench/scaling.py heldout`")


def committed(path: Path) -> bool:
    """The file is in git's HEAD exactly as it is on disk."""
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=ROOT, capture_output=True)
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", str(path)], cwd=ROOT)
    return tracked.returncode == 0 and clean.returncode == 0


def heldout(reuse: bool) -> None:
    """Train p4 and p16 with both optimizers and score the committed predictions."""
    if not committed(PREDICTION):
        raise SystemExit(f"{PREDICTION} is not committed as it is: run `ladder` and commit its prediction first")
    predicted = json.loads(PREDICTION.read_text())
    if reuse:
        refuse_runs_older_than_the_prediction()
    out = predicted | {"env_heldout": env(), "heldout": {}}
    for opt in OPTIMIZERS:
        runs, seconds = ladder_points(opt, HELDOUT, reuse)
        for run in runs:
            pred = predicted["ladders"][opt]["predictions"][run.name]
            error = 100 * (pred["loss"] / run.loss - 1)
            inside = pred["low"] <= run.loss <= pred["high"]
            print(
                f"{opt} {run.name}: loss {run.loss:.4f}, predicted {pred['loss']:.4f} ({error:+.2f}%), "
                f"{'inside' if inside else 'outside'} the 90% interval {pred['low']:.4f}-{pred['high']:.4f}"
            )
            out["heldout"].setdefault(opt, {})[run.name] = point(run, seconds[run.name]) | {
                "error_pct": error,
                "inside_interval": inside,
            }
    out["heldout_multiplier"] = heldout_multiplier(out["heldout"])
    out["diagnostics"] = diagnostics(out)
    (RESULTS / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(out, RESULTS / "scaling.png")


def refuse_runs_older_than_the_prediction() -> None:
    """--reuse may keep held-out runs only if they were trained after the prediction was committed."""
    log = ["git", "log", "-1", "--format=%ct", "--", str(PREDICTION)]
    committed_at = int(subprocess.run(log, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    for opt in OPTIMIZERS:
        for name in HELDOUT:
            final = WORK / opt / name / "final"
            if final.is_dir() and final.stat().st_mtime < committed_at:
                raise SystemExit(f"{final} was trained before the prediction was committed: delete it, or drop --reuse")


def diagnostics(result: dict) -> dict:
    """Not the judged procedure, recorded beside it: what a floored fit would have predicted (computed after the
    answers), and each run's final train/validation gap (the data repeats more the further out a run is)."""
    floored, gaps = {}, {}
    for opt, lad in result["ladders"].items():
        runs = lad["runs"]
        fit = fit_power_law(np.array([r["flops"] for r in runs]), np.array([r["loss"] for r in runs]), floor=True)
        floored[opt] = {"c": fit.c, "b": fit.b}
        for name, run in result["heldout"][opt].items():
            guess = float(fit(run["flops"]))
            floored[opt][name] = {"prediction": guess, "error_pct": 100 * (guess / run["loss"] - 1)}
        for name in ["s5", *HELDOUT]:
            train = [r for r in read_metrics(WORK / opt / name) if r["kind"] == "train"][-10:]
            train_loss = sum(r["loss"] for r in train) / len(train)
            gaps.setdefault(opt, {})[name] = {
                "train_loss_last_10_logs": train_loss,
                "val_minus_train": read_run(WORK / opt / name).loss - train_loss,
                "epochs": train[-1]["tokens"] / TRAIN_TOKENS,
            }
    return {"post_hoc_floored_fit": floored, "train_val_gap": gaps}


def heldout_multiplier(runs: dict) -> dict:
    """The multiplier measured on the held-out runs themselves, no fit: the compute AdamW needs for each Muon
    run's loss, on the log-log line through AdamW's p4 and p16 (beyond p16: that line extended), over Muon's."""
    a4, a16 = runs["adamw"]["p4"], runs["adamw"]["p16"]
    slope = np.log(a16["loss"] / a4["loss"]) / np.log(a16["flops"] / a4["flops"])
    out = {}
    for name, m in runs["muon"].items():
        adamw_flops = a4["flops"] * np.exp(np.log(m["loss"] / a4["loss"]) / slope)
        out[name] = float(adamw_flops / m["flops"])
        print(f"Muon {name}: AdamW would need {out[name]:.2f}x its compute for the same loss (held-out runs, no fit)")
    return out


def plot(result: dict, path: Path) -> None:
    """Both ladders, their fits, the predictions with intervals and the held-out runs, log-log."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    top = max(p["flops"] for lad in result["ladders"].values() for p in lad["predictions"].values()) * 1.5
    for color, (opt, lad) in zip(("C0", "C1"), result["ladders"].items()):
        runs, fit = lad["runs"], lad["fit"]
        grid = np.logspace(np.log10(min(r["flops"] for r in runs) / 1.5), np.log10(top), 200)
        curve = fit["a"] * (grid / fit["scale"]) ** -fit["b"] + fit["c"]
        ax.plot(grid, curve, "-", color=color, label=f"{opt}: {fit['a']:.3g}(C/{fit['scale']:.2g})^-{fit['b']:.3f}")
        ax.scatter([r["flops"] for r in runs], [r["loss"] for r in runs], color=color, zorder=3)
        for name, p in lad["predictions"].items():
            err = [[p["loss"] - p["low"]], [p["high"] - p["loss"]]]
            ax.errorbar([p["flops"]], [p["loss"]], yerr=err, fmt="s", mfc="none", color=color, capsize=4)
            actual = result.get("heldout", {}).get(opt, {}).get(name)
            if actual:
                ax.scatter([actual["flops"]], [actual["loss"]], marker="*", s=140, color=color, edgecolor="k", zorder=4)
    ax.scatter([], [], marker="s", facecolor="none", edgecolor="gray", label="predicted (90%), committed first")
    ax.scatter([], [], marker="*", s=140, color="gray", edgecolor="k", label="held-out runs (4x, 16x)")
    print(f"wrote {save_loglog(fig, ax, path)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["dev", "ladder", "heldout", "plot"])
    p.add_argument("--reuse", action="store_true")
    args = p.parse_args()
    os.chdir(ROOT)  # the configs' paths are relative to the repository root
    if args.phase == "plot":  # redraw from the committed results
        result = json.loads(
            ((RESULTS / "scaling.json") if (RESULTS / "scaling.json").is_file() else PREDICTION).read_text()
        )
        return plot(result, RESULTS / "scaling.png")
    {"dev": dev, "ladder": ladder, "heldout": heldout}[args.phase](args.reuse)


if __name__ == "__main__":
    main()
