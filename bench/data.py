"""Benchmark the data pipeline on the shared Tiny Shakespeare + TinyStories files.

    python bench/data.py [--out bench/results/data.json]

- `prepare` throughput (MiB/s, tokens/s) with 1 and 2 worker processes, against the peer: plain
  `tokenizers` `encode_batch` (Rust, multi-threaded) on the same documents, no I/O or sharding;
- loader throughput (samples/s) of StreamLoader over the prepared shards, 0 and 2 workers;
- time to the first batch when resuming at sample 0 vs deep into the stream (should be flat);
- `locate` (global index -> source, sample) per sample on a 2-source mix: the per-window plan cache
  against the earlier code (`locate_uncached` below: plan rebuilt and shuffled for every sample),
  checked to give the same answers;
- `prepare --part I/N` for N = 1, 2, 4 parts run side by side as separate `longboi` processes (as an
  array job runs them, one core's worth of tokenizer threads each), and the `merge-index` that ends
  them: wall time, tokens/s, and the merged index checked equal to one process's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
INPUTS = [SHARED / "text" / "tinyshakespeare.txt", SHARED / "text" / "tinystories_valid_head.txt"]
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
SPLIT = "\n\n"  # blank-line separated speeches / stories: many documents, so work can be parallel


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def locate_uncached(ds, g: int) -> tuple[int, int]:
    """The earlier `StreamingDataset.locate`: the window's plan rebuilt and shuffled for every sample."""
    import numpy as np

    from longboi.data.stream import WINDOW, _rng

    epoch, pos = divmod(g, ds.epoch_samples)
    window, offset = divmod(pos, WINDOW)
    table = ds._window_counts(epoch)
    counts = table[window + 1] - table[window]
    plan = np.repeat(np.arange(len(counts)), counts)
    _rng(ds.seed, 2_000_003, epoch, window).shuffle(plan)
    source = int(plan[offset])
    k = int(epoch * ds.counts[source] + table[window, source] + np.count_nonzero(plan[:offset] == source))
    data = ds.data[source]
    pass_id, idx = divmod(k, data.size)
    return source, int(data.permutation(ds.seed, source, pass_id, ds.shuffle, ds.shuffle_block)[idx])


def main() -> None:
    from tokenizers import Tokenizer as HFTokenizer

    from longboi.data.prepare import prepare
    from longboi.data.stream import Source, StreamingDataset, StreamLoader

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    args = parser.parse_args()
    mib = sum(p.stat().st_size for p in INPUTS) / 2**20
    docs = [d for p in INPUTS for d in p.read_text().split(SPLIT) if d.strip()]
    import torch

    cpu = torch.backends.cpu.get_cpu_capability()
    machine = {"cores": os.cpu_count(), "python": sys.version.split()[0], "cpu": cpu}
    results: dict = {"machine": machine, "input_mib": mib}
    tmp = Path(tempfile.mkdtemp(prefix="longboi-bench-"))

    peer = HFTokenizer.from_file(str(TOKENIZER))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    t_peer = timed(lambda: peer.encode_batch(docs, add_special_tokens=False))
    n_tokens = sum(len(e.ids) for e in peer.encode_batch(docs, add_special_tokens=False))
    results["peer_tokenizers_encode_batch"] = {"seconds": t_peer, "mib_s": mib / t_peer, "tok_s": n_tokens / t_peer}
    print(f"# data pipeline: {mib:.2f} MiB, {len(docs)} documents, {n_tokens:,} tokens")
    print(f"{'what':<40}{'seconds':>9}{'MiB/s':>9}{'tokens/s':>12}")
    print(f"{'peer: tokenizers encode_batch':<40}{t_peer:>9.2f}{mib / t_peer:>9.2f}{n_tokens / t_peer:>12,.0f}")
    for workers in (0, 1, 2):

        def run(workers=workers):
            return prepare(
                [str(p) for p in INPUTS],
                str(tmp / "ds"),
                str(TOKENIZER),
                seq_len=256,
                split_on=SPLIT,
                val_fraction=0.05,
                workers=workers,
            )

        t = timed(run)
        results[f"prepare_{workers}proc"] = {
            "seconds": t,
            "mib_s": mib / t,
            "tok_s": n_tokens / t,
            "vs_peer": t_peer / t,
        }
        label = "threads, in-process" if workers == 0 else f"{workers} process(es)"
        print(
            f"{'longboi prepare, ' + label:<40}{t:>9.2f}{mib / t:>9.2f}"
            f"{n_tokens / t:>12,.0f}   ({t_peer / t:.2f}x peer speed)"
        )

    ds = StreamingDataset(str(tmp / "ds" / "train"), seed=0)
    for workers in (0, 2):
        loader = StreamLoader(ds, global_batch=32, micro_batch=32, num_workers=workers, stop=32 * 60)
        start = time.perf_counter()
        n = sum(len(b) for b in loader)
        rate = n / (time.perf_counter() - start)
        results[f"loader_{workers}workers_samples_s"] = rate
        print(f"{'loader, ' + str(workers) + ' workers (samples/s)':<40}{rate:>30,.0f}")
    for position in (0, 32 * 10**6):  # 32M samples in = 8B tokens at seq 256
        loader = StreamLoader(StreamingDataset(str(tmp / "ds" / "train"), seed=0), 32, 32)
        loader.load_state_dict({"consumed": position, "seed": 0, "epoch_samples": len(ds)})
        start = time.perf_counter()
        next(iter(loader))
        t = time.perf_counter() - start
        results[f"resume_at_{position}_first_batch_s"] = t
        print(f"{'resume at sample ' + format(position, ','):<40}{t:>9.3f}  s to the first batch")
    mixed = StreamingDataset([Source(str(tmp / "ds" / "train"), 0.7), Source(str(tmp / "ds" / "train"), 0.3)], seed=0)
    indices = range(1_000_000, 1_002_000)
    assert [mixed.locate(g) for g in indices] == [locate_uncached(mixed, g) for g in indices]
    for name, fn in (("cached", mixed.locate), ("uncached", lambda g: locate_uncached(mixed, g))):
        start = time.perf_counter()
        for g in indices:
            fn(g)
        per = (time.perf_counter() - start) / len(indices)
        results[f"locate_{name}_us"] = 1e6 * per
        print(f"{'locate per sample, ' + name + ' (us)':<40}{1e6 * per:>30,.1f}")
    results["parts"] = parts_scaling(tmp, docs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def parts_scaling(tmp: Path, docs: list[str], copies: int = 4) -> dict:
    """N parts side by side, each a `longboi prepare --part I/N` process with cores/N tokenizer threads,
    then merge-index; the corpus is the documents as one jsonl, `copies` times (about 7 MiB), in groups
    of 0.5 MiB so there is work for every part."""
    from longboi.data.prepare import merge

    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs * copies))
    mib = corpus.stat().st_size / 2**20
    common = [str(corpus), "--tokenizer", str(TOKENIZER), "--seq-len", "256", "--val-fraction", "0.05"]
    common += ["--group-mb", "0.5"]
    cores = os.cpu_count() or 1
    out: dict = {"input_mib": mib, "group_mb": 0.5, "cores": cores}
    print(f"\n# prepare in parts: {mib:.1f} MiB jsonl, {cores} cores; parts run side by side")
    print(f"{'parts':<8}{'threads each':>13}{'wall s':>9}{'merge s':>9}{'tokens/s':>12}{'vs 1 thread':>13}")
    reference = None
    for n, threads in ((1, 1), (1, cores), (2, max(1, cores // 2)), (4, max(1, cores // 4))):
        target = tmp / f"parts{n}x{threads}"
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}  # the tokenizer's threads: cores split between parts
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "longboi", "prepare", *common, "--out", str(target), "--part", f"{i}/{n}"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for i in range(n)
        ]
        assert all(p.wait() == 0 for p in procs), f"a part of {n} failed"
        wall = time.perf_counter() - start
        start = time.perf_counter()
        report = merge(str(target))
        merge_s = time.perf_counter() - start
        index = (target / "train" / "index.json").read_bytes()
        reference = reference or (wall, index)
        assert index == reference[1], f"{n} parts merged differ from 1 part"
        tok_s, speedup = report.tokens_read / wall, reference[0] / wall
        key = f"{n}_parts_{threads}_threads"
        out[key] = {"parts": n, "threads": threads, "wall_s": wall, "merge_s": merge_s, "tok_s": tok_s}
        out[key]["speedup"] = speedup
        print(f"{n:<8}{threads:>13}{wall:>9.2f}{merge_s:>9.3f}{tok_s:>12,.0f}{speedup:>12.2f}x")
    return out


if __name__ == "__main__":
    main()
