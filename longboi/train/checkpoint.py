"""Training checkpoints: save, find the newest complete one, resume, and export weights.

A checkpoint is `RUN/checkpoints/step-00000100/`: model and optimizer state through
`torch.distributed.checkpoint` (sharded per rank under FSDP, and reshardable: a save from 2 ranks
resumes on 1), `train_state.json` (step, tokens, data position, detector state, model config) and
`rng-rankN.pt`. It is written to `.tmp-step-...` and renamed when every rank has finished, so a
crash at any moment leaves the previous checkpoints intact; only renamed directories are resumed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from longboi.checkpoint import load_model, publish, save_checkpoint, unwrap
from longboi.config import from_mpt_dict
from longboi.errors import UserError
from longboi.lora import load_adapter, merge, save_adapter
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer
from longboi.train.config import TrainConfig
from longboi.train.parallelize import Dist, barrier

STEP_DIR = re.compile(r"step-(\d{8})")


@contextlib.contextmanager
def _one_process_io() -> Iterator[None]:
    """torch.distributed.checkpoint warns at every save and load without a process group ("assuming the
    intent is to save in a single process"). In one process that is exactly the intent: silence that
    warning alone; a run with a process group never takes this path, and every other warning shows."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "train_state.json").is_file()]
    return sorted(done)


def save(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    d: Dist,
    keep: int,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _disk_full_said(run_dir, tmp, step):
        with _one_process_io():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(_rng_state(d), tmp / f"rng-rank{d.rank}.pt")
    barrier(d)
    if d.is_main:
        with _disk_full_said(run_dir, tmp, step):
            (tmp / "train_state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
        publish(tmp, final)  # atomic, also when re-saving the same step (after a rollback)
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


FULL_BELOW = 16 * 2**20  # free bytes under which a failed write is taken for a full disk


@contextlib.contextmanager
def _disk_full_said(run_dir: str | Path, tmp: Path, step: int) -> Iterator[None]:
    """A save that fails on a full disk (ENOSPC, or a writer's own error such as torch's "unexpected pos"
    while almost nothing is free) becomes one line: where, how much is free once the partial save is removed,
    what a checkpoint takes, and which checkpoint the same command resumes from. Other failures pass as they are."""
    try:
        yield
    except (Exception, CheckpointException) as e:  # dcp's exception (a BaseException) wraps each rank's error
        free = shutil.disk_usage(tmp.parent).free
        if not (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < FULL_BELOW):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        done = checkpoints(run_dir)
        size = sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file()) if done else 0
        resume = f"it resumes from {done[-1]}" if done else "no checkpoint was saved yet: it starts at step 0"
        took = f"; the last checkpoint took {size / 2**20:.0f} MiB" if size else ""
        raise UserError(
            f"checkpoint of step {step} could not be written to {tmp.parent}: the disk is full "
            f"({shutil.disk_usage(tmp.parent).free / 2**20:.0f} MiB free once the partial save was removed{took}); "
            f"free space, then run the same command ({resume})"
        ) from e


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """Restore model + optimizer (resharded to this world size) and this rank's RNG; return train_state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    with _one_process_io():
        dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    rng_file = path / f"rng-rank{d.rank}.pt"
    if rng_file.is_file():  # a new rank (larger world) keeps its seeded RNG
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_tuple(rng["python"]))
        if "cuda" in rng and d.device.type == "cuda":  # dropout masks on the GPU come from its own generator
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    return json.loads((path / "train_state.json").read_text())


def _rng_state(d: Dist) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if d.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(d.device)
    return state


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def export_weights(train_ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Weights-only checkpoint directory (config.json + model.safetensors + tokenizer.json) from a
    training checkpoint; HF-loadable when its config is representable. Runs in one process."""
    train_ckpt = Path(train_ckpt)
    info = json.loads((train_ckpt / "train_state.json").read_text())
    cfg = from_mpt_dict(info["model_config"], str(train_ckpt / "train_state.json"))
    model = MPTForCausalLM(cfg)
    state = {"model": model.state_dict()}
    with _one_process_io():
        dcp.load(state, checkpoint_id=str(train_ckpt))
    model.load_state_dict(state["model"])
    tok_path = tokenizer or info.get("tokenizer")
    return save_checkpoint(model, out, Tokenizer(tok_path) if tok_path else None)


def export_final(model: torch.nn.Module, out: Path, tok: Tokenizer, d: Dist) -> Path:
    """Gather full weights to rank 0 and write the foundation checkpoint format there."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        inner = unwrap(model)
        fresh = MPTForCausalLM(inner.config)
        fresh.load_state_dict(full)
        save_checkpoint(fresh, out, tok)
    barrier(d)
    return out


def export_lora(model: MPTForCausalLM, cfg: TrainConfig, run: Path, tok: Tokenizer, d: Dist) -> Path:
    """RUN/adapter (the LoRA weights alone) and RUN/final (base + adapter merged, a plain checkpoint)."""
    if d.is_main:
        adapter = save_adapter(model, run / "adapter", base=cfg.init_from)
        base = MPTForCausalLM(cfg.model)
        base.load_state_dict(load_model(cfg.init_from).state_dict())  # type: ignore[arg-type]
        save_checkpoint(merge(load_adapter(base, adapter)), run / "final", tok)
    barrier(d)
    return run / "final"
