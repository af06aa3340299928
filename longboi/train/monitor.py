"""Watching a run: metrics.jsonl (always), TensorBoard / W&B (when enabled), MFU and `longboi plot`.

MFU = achieved model FLOPs per second / peak FLOPs of the hardware. Peak comes from the config,
a table of known GPUs, or on CPU a matmul measured once per machine and cached.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from longboi.errors import UserError

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets).
GPU_PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10": 125e12,
    "L4": 121e12,
    "L40": 181e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "A6000": 155e12,
}


def peak_flops(device: torch.device, bf16: bool, override: float | None = None) -> float:
    """Peak FLOP/s of one device in the training dtype."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if bf16 else value / 2  # tf32 is about half the bf16 rate
        return 100e12
    return _measured_cpu_peak(bf16)


def _measured_cpu_peak(bf16: bool) -> float:
    """Best of a few 2048^3 matmuls, cached per machine, thread count and dtype."""
    precision = "bf16" if bf16 else "fp32"
    key = f"{platform.machine()}-{_cpu_model()}-{torch.get_num_threads()}t-{precision}"
    cache = Path(os.path.expanduser("~/.cache/longboi/peak_flops.json"))
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key not in known:
        dtype = torch.bfloat16 if bf16 else torch.float32
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        known[key] = 2 * 2048**3 / best
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, indent=1))
    return known[key]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip().replace(" ", "_")
    except OSError:
        pass
    return "cpu"


class Metrics:
    """Appends one JSON object per event to RUN/metrics.jsonl; mirrors scalars to TB/W&B if enabled."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool = False, wandb: bool = False, config: dict | None = None
    ):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("log.tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise UserError("log.wandb needs the wandb package: pip install 'longboi[wandb]'") from e
            self.wandb = wandb_lib.init(mode="offline", dir=str(run_dir), config=config or {})

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a longboi run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss (train and validation), learning rate and throughput curves of a run, as one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UserError("plotting needs matplotlib: pip install 'longboi[plot]'") from e
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "eval" and "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    axes[2].set(title="tokens/s", xlabel="step")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
