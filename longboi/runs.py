"""A run directory's records (RUN/metrics.jsonl), read by plotting, planning (measured MFU) and scaling fits."""

from __future__ import annotations

import json
from pathlib import Path

from longboi.errors import UserError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a longboi run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
