"""Benchmark longboi's MPT against transformers' MptForCausalLM on the same config and weights.

    python bench/model.py [--models tiny,mpt-125m] [--repeats 5] [--out bench/results/model.json]

Measures, alternating ours and the peer in one process run (CPU timings drift; ratios are what
count): a training step (forward + backward + AdamW) in fp32 and bf16 autocast, prefill time and
peak RSS at 512/2048/8192/32768 tokens (each in a fresh subprocess with a memory cap, so peak RSS is
the run's own and an out-of-memory peer fails cleanly), and greedy decode tokens/s at batch 1 and 8.
Prints a table of medians with ours/peer ratios (speed: >1 means ours is faster) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from longboi.checkpoint import save_checkpoint
from longboi.config import preset
from longboi.generate import SamplingParams, generate_ids
from longboi.model import MPTForCausalLM

TRAIN_SHAPES = {"tiny": (8, 256), "mpt-125m": (4, 512)}  # (batch, seq) per model
PREFILL_LENGTHS = (512, 2048, 8192, 32768)
MEMORY_CAP_GIB = 20  # the machine has 24: a peer that needs more fails instead of swapping the box


def load_pair(name: str, max_seq_len: int | None = None):
    """Ours and HF's model with identical weights (HF loads the directory we save)."""
    from transformers import MptForCausalLM

    cfg = preset(name)
    if max_seq_len:
        cfg = cfg.replace(max_seq_len=max_seq_len)  # HF cannot run past its configured length
    torch.manual_seed(0)
    ours = MPTForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(ours, tmp)
        theirs = MptForCausalLM.from_pretrained(tmp)
    return ours, theirs


def median_pair(run_ours, run_peer, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds of two callables, run alternately after warm-up."""
    for _ in range(warmup):
        run_ours()
        run_peer()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((run_ours, a), (run_peer, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def train_steps(name: str, dtype: torch.dtype, repeats: int) -> dict:
    ours, theirs = load_pair(name)
    batch, seq = TRAIN_SHAPES.get(name, (4, 512))
    ids = torch.randint(0, 50000, (batch, seq + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    # longboi's trainer uses the fused CPU/GPU AdamW kernel; the peer loop uses torch's default.
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step_ours():
        with autocast:
            loss = ours(inputs, labels=labels)  # longboi's fused, chunked LM head + cross-entropy
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        with autocast:
            loss = theirs(inputs, labels=ids[:, :-1]).loss  # HF shifts labels inside
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    t_ours, t_peer = median_pair(step_ours, step_theirs, warmup=2, repeats=repeats)
    tokens = batch * seq
    return {"ours": tokens / t_ours, "peer": tokens / t_peer, "unit": "tok/s", "shape": f"{batch}x{seq}"}


def decode(name: str, batch: int, dtype: torch.dtype, repeats: int, new_tokens: int = 128) -> dict:
    ours, theirs = load_pair(name)
    ours, theirs = ours.to(dtype).eval(), theirs.to(dtype).eval()
    prompts = torch.randint(0, 50000, (batch, 32))
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def run_ours():
        for _ in generate_ids(ours, prompts.tolist(), params, eos_id=None):
            pass

    @torch.no_grad()
    def run_theirs():
        theirs.generate(
            prompts,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=1,
            eos_token_id=None,
        )

    t_ours, t_peer = median_pair(run_ours, run_theirs, warmup=1, repeats=repeats)
    tokens = batch * new_tokens
    return {"ours": tokens / t_ours, "peer": tokens / t_peer, "unit": "tok/s", "shape": f"bs{batch}"}


def peak_rss_mib() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that across exec from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefill_worker(impl: str, name: str, length: int) -> dict:
    """Runs in its own process: one prefill, its time and this process's peak RSS."""
    cap = MEMORY_CAP_GIB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        ours, theirs = load_pair(name, max_seq_len=max(length, 2048))
        model = ours if impl == "ours" else theirs
        ids = torch.randint(0, 50000, (1, length))
        base = peak_rss_mib()
        with torch.no_grad():
            start = time.perf_counter()
            if impl == "ours":
                model(ids, logits_to_keep=1)
            else:
                model(ids, logits_to_keep=1, use_cache=False)
            seconds = time.perf_counter() - start
        peak = peak_rss_mib()
        return {"seconds": seconds, "peak_rss_mib": peak, "added_rss_mib": peak - base}
    except (MemoryError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}


def prefill(name: str, length: int) -> dict:
    out = {}
    for impl in ("ours", "peer"):
        proc = subprocess.run(
            [sys.executable, __file__, "--prefill-worker", impl, name, str(length)], capture_output=True, text=True
        )
        lines = proc.stdout.strip().splitlines()
        out[impl] = (
            json.loads(lines[-1])
            if proc.returncode == 0 and lines
            else {
                "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:120] if proc.stderr else ''}"
            }
        )
    return out


def fmt_ratio(ours: float, peer: float) -> str:
    return f"{ours / peer:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mpt-125m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-model", default="tiny")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: train,prefill,decode")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "model.json"))
    parser.add_argument("--prefill-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prefill_worker:
        impl, name, length = args.prefill_worker
        print(json.dumps(prefill_worker(impl, name, int(length))))
        return
    skip = set(args.skip.split(","))
    machine = {"cpu_cores": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    print(f"# longboi vs transformers MptForCausalLM  ({machine})")
    results: dict = {"machine": machine, "train": [], "decode": [], "prefill": []}
    print(f"{'benchmark':<34}{'ours':>12}{'peer':>12}{'ours/peer':>11}")
    for name in args.models.split(","):
        for dtype in (torch.float32, torch.bfloat16):
            dname = str(dtype).removeprefix("torch.")
            if "train" not in skip:
                r = train_steps(name, dtype, args.repeats) | {"model": name, "dtype": dname}
                results["train"].append(r)
                print(
                    f"{'train ' + name + ' ' + dname + ' ' + r['shape']:<34}{r['ours']:>12.0f}{r['peer']:>12.0f}"
                    f"{fmt_ratio(r['ours'], r['peer']):>11}  tok/s"
                )
            if "decode" not in skip:
                for batch in (1, 8):
                    r = decode(name, batch, dtype, max(2, args.repeats // 2)) | {"model": name, "dtype": dname}
                    results["decode"].append(r)
                    print(
                        f"{'decode ' + name + ' ' + dname + ' bs' + str(batch):<34}{r['ours']:>12.1f}"
                        f"{r['peer']:>12.1f}{fmt_ratio(r['ours'], r['peer']):>11}  tok/s"
                    )
    if "prefill" not in skip:
        for length in PREFILL_LENGTHS:
            r = prefill(args.prefill_model, length) | {"model": args.prefill_model, "tokens": length}
            results["prefill"].append(r)
            o, p = r["ours"], r["peer"]
            cell = lambda x: f"{x['seconds']:.2f}s/{x['peak_rss_mib']:.0f}M" if "seconds" in x else "FAILED"  # noqa: E731
            ratio = fmt_ratio(p["seconds"], o["seconds"]) if "seconds" in o and "seconds" in p else "-"
            print(
                f"{'prefill ' + args.prefill_model + ' fp32 ' + str(length):<34}{cell(o):>12}{cell(p):>12}"
                f"{ratio:>11}  time/peak RSS"
            )
            for impl in ("ours", "peer"):
                if "error" in r[impl]:
                    print(f"    {impl}: {r[impl]['error']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
