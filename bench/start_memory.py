"""Peak host memory per rank when a sharded (FSDP2) run starts, before and after the meta-device start.

    python bench/start_memory.py [--preset mpt-125m] [--ranks 2] [--out bench/results/start_memory.json]

Each case is a real `torchrun --nproc-per-node RANKS` (gloo, CPU) whose ranks build the model, shard it
and stop; each rank reports its peak RSS (ru_maxrss) and its RSS before the model (imports and
process group). Cases: a fresh init and an `init_from` (a safetensors checkpoint written first), each
the old way (the whole fp32 model built on every rank, `init_from` loaded whole beside it, then
`fully_shard`) and the new way (`longboi.train.loop._start_model`: meta device, shard, then each rank
fills its slice). Target: about half of one full copy per rank plus overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def worker(way: str, preset_name: str, init_from: str | None, out: str) -> None:
    """One rank: start the model the given way, report (baseline, peak) RSS in MiB."""

    from longboi.config import preset
    from longboi.tokenizer import Tokenizer
    from longboi.train.config import TrainConfig
    from longboi.train.loop import _start_model
    from longboi.train.parallelize import init_distributed, parallelize

    d = init_distributed("cpu")
    tok = Tokenizer(TOKENIZER)
    base = rss_mib()
    cfg = preset(preset_name)
    if way == "new":
        train_cfg = TrainConfig(
            run_dir="unused",
            model=cfg,
            tokenizer=str(TOKENIZER),
            max_duration="1ba",
            global_batch_size=2,
            init_from=init_from,
            parallel="fsdp",
        )
        _start_model(train_cfg, tok, d, bf16=False)
    else:  # what longboi did before: a full model per rank, init_from loaded whole beside it, then sharded
        from longboi.checkpoint import load_model
        from longboi.model import MPTForCausalLM

        torch.manual_seed(0)
        model = MPTForCausalLM(cfg)
        if init_from:
            model.load_state_dict(load_model(init_from).state_dict())
        parallelize(model, d, "fsdp", False, False, False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(f"{out}.rank{d.rank}").write_text(json.dumps({"baseline_mib": base, "peak_mib": peak}))


def run_case(way: str, preset_name: str, init_from: str | None, ranks: int, tmp: Path) -> list[dict]:
    out = tmp / f"{way}-{'init_from' if init_from else 'fresh'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", __file__]
    cmd += ["--worker", way, "--preset", preset_name, "--result", str(out)] + (
        ["--init-from", init_from] if init_from else []
    )
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ)
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mpt-125m")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "start_memory.json"))
    ap.add_argument("--worker")
    ap.add_argument("--init-from")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.preset, args.init_from, args.result)

    from longboi.checkpoint import save_checkpoint
    from longboi.config import preset
    from longboi.flops import model_stats
    from longboi.hardware import cpu_capability
    from longboi.model import MPTForCausalLM

    params = model_stats(preset(args.preset)).params
    full_mib = 4 * params / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        save_checkpoint(MPTForCausalLM(preset(args.preset)), ckpt, None)
        for source in (None, str(ckpt)):
            for way in ("old", "new"):
                ranks = run_case(way, args.preset, source, args.ranks, Path(tmp))
                added = max(r["peak_mib"] - r["baseline_mib"] for r in ranks)
                rows.append(
                    {
                        "start": "init_from" if source else "fresh",
                        "way": way,
                        "peak_rss_mib": max(r["peak_mib"] for r in ranks),
                        "added_mib": added,
                        "added_over_full_copy": added / full_mib,
                    }
                )
    print(f"{args.preset}: {params / 1e6:.0f}M parameters, one fp32 copy {full_mib:.0f} MiB; {args.ranks} gloo ranks")
    print(f"{'start':10} {'way':4} {'peak RSS/rank':>14} {'added/rank':>11} {'x full copy':>12}")
    for r in rows:
        print(
            f"{r['start']:10} {r['way']:4} {r['peak_rss_mib']:11.0f} MiB {r['added_mib']:7.0f} MiB "
            f"{r['added_over_full_copy']:11.2f}x"
        )
    result = {
        "preset": args.preset,
        "params": params,
        "full_copy_mib": full_mib,
        "ranks": args.ranks,
        "cpu_capability": cpu_capability(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
