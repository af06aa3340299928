"""A meta-device start of the largest preset whose training state fits one device (bench/gpu.sh runs it).

    python bench/start_gpu.py [--device cuda] [--preset NAME] [--out bench/results/start_gpu.json]

Picks the largest preset whose fp32 weights, gradients and AdamW state (16 bytes per parameter) fit in
90% of the device's memory (or takes --preset), starts it the way training does (`_start_model`: built on
the meta device, then its weights drawn on the device), and records the seconds, the device's peak
allocated memory and the host's peak RSS. On a CPU it starts `tiny` (a check that the script runs).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


def largest_fitting(memory_bytes: float) -> str:
    from longboi.config import PRESETS
    from longboi.flops import model_stats

    sizes = {name: model_stats(cfg).params for name, cfg in PRESETS.items()}
    fitting = [name for name, n in sizes.items() if 16 * n <= 0.9 * memory_bytes]
    return max(fitting, key=sizes.__getitem__)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "start_gpu.json"))
    args = ap.parse_args()

    from longboi.config import preset
    from longboi.flops import model_stats
    from longboi.hardware import cpu_capability
    from longboi.tokenizer import Tokenizer
    from longboi.train.config import TrainConfig
    from longboi.train.loop import _start_model
    from longboi.train.parallelize import Dist

    cuda = args.device == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    name = args.preset or (largest_fitting(torch.cuda.get_device_properties(0).total_memory) if cuda else "tiny")
    cfg = TrainConfig(
        run_dir="unused", model=preset(name), tokenizer=str(TOKENIZER), max_duration="1ba", global_batch_size=1
    )
    start = time.perf_counter()
    model, _ = _start_model(cfg, Tokenizer(TOKENIZER), Dist(device=device), bf16=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    params = model_stats(cfg.model).params
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({cpu_capability()})",
        "torch": torch.__version__,
        "preset": name,
        "params": params,
        "start_s": seconds,
        "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "weights_gib": 4 * params / 2**30,
        "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
