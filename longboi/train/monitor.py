"""Watching a run: metrics.jsonl (always), TensorBoard / W&B (when enabled), MFU and `longboi plot`.

MFU = achieved model FLOPs per second / peak FLOPs of the hardware (see longboi.hardware).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from longboi.errors import UserError
from longboi.runs import read_metrics


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
