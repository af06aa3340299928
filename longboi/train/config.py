"""The training run configuration: one typed tree, loaded from YAML plus `--section.key value` overrides.

Every key is checked on load: an unknown or misspelt key is an error naming the file and the
nearest valid key. `model` is a preset name, a full model config, or `{preset: NAME, key: value}`
(a preset with some fields changed).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from longboi.config import ModelConfig, Precision, from_dict, preset
from longboi.data.stream import CacheConfig, Source
from longboi.errors import UserError
from longboi.lora import LoraSettings


@dataclass(frozen=True)
class DataConfig:
    """Training data: prepared splits (see `longboi prepare`), mixed by proportion or count."""

    sources: list[Source]
    val: str | None = None  # a prepared validation split, for periodic validation loss
    seed: int = 17
    shuffle_block: int = 4
    num_workers: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass(frozen=True)
class FinetuneConfig:
    """Instruction / chat finetuning data (see longboi.data.finetune for formats and masking)."""

    data: str  # a jsonl of {prompt, response} or {messages}
    target_prompts: str = "none"  # none | all | length>=N
    target_responses: Literal["last", "all"] = "last"
    overflow: Literal["truncate", "drop"] = "truncate"  # examples longer than the model's max_seq_len
    on_bad_input: Literal["error", "skip"] = "error"
    seed: int = 17


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "lion", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    lr: float = 6e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled: applied as lr * weight_decay * param
    decay_norms_and_biases: bool = False
    decay_embeddings: bool = False
    momentum: float = 0.95  # muon only: the matrices' momentum (Nesterov)


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["cosine", "linear", "constant", "inverse_sqrt"] = "cosine"
    warmup: str = "0ba"  # a duration: 100ba, 1e6tok, 0.01dur (fraction of the run); 20s in wall-clock runs
    min_lr_ratio: float = 0.1  # cosine/linear end at lr * min_lr_ratio


@dataclass(frozen=True)
class CheckpointConfig:
    every: str = "1000ba"  # a duration, or minutes like 30min
    keep: int = 3  # newest checkpoints kept (0: keep all)
    autoresume: bool = True
    save_final: bool = True


@dataclass(frozen=True)
class SpikeConfig:
    """Loss-spike and NaN defence: what counts as a spike, and what to do about it."""

    action: Literal["skip", "rollback", "stop"] = "skip"
    window: int = 50  # losses in the rolling window
    threshold: float = 4.0  # spike: loss > mean + threshold * std of the window
    min_history: int = 20  # no spike detection before this many steps
    max_events: int = 20  # stop after this many events: the run is sick


@dataclass(frozen=True)
class LogConfig:
    every: int = 10  # optimizer steps between metrics lines
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False  # offline mode; `wandb sync` later
    peak_flops: float | None = None  # per device; None: known GPU table or measured once on CPU


@dataclass(frozen=True)
class EvalConfig:
    every: str = "500ba"  # a duration: steps, a fraction of the run, or a time (10min)
    val_batches: int = 20  # batches of 8 samples per rank from the held-out split (capped at its size)
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 50
    icl_tasks: str | None = None  # an LLM Foundry-style task YAML, run at every eval
    icl_data_root: str = "."  # the tasks' dataset_uri paths are relative to this
    icl_limit: int | None = 200  # examples per task (None: all)
    icl_time_budget_s: float = 120.0  # stop starting new tasks after this long; the rest are logged skipped


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    model: ModelConfig
    tokenizer: str
    max_duration: str  # 1000ba (optimizer steps), 2e9tok (tokens), 1ep (epochs), or wall clock: 90s, 6min, 1h
    global_batch_size: int
    data: DataConfig | None = None  # pretraining data (prepared shards)
    finetune: FinetuneConfig | None = None  # or finetuning data (jsonl), with init_from a checkpoint
    lora: LoraSettings | None = None  # train LoRA adapters only (on init_from's weights)
    micro_batch_size: int | None = None  # None: the largest that fits, found by trying
    precision: Precision = "auto"  # auto: bf16 where the device computes it natively, else fp32
    grad_clip: float | None = 1.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    activation_checkpointing: bool = False
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = "fsdp"  # with more than one process
    init_from: str | None = None  # a checkpoint directory to start from (finetuning)
    seed: int = 17
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML run config, apply `--a.b value` overrides, validate every key and type."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from e
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value, str(path))
    return config_from_dict(data, str(path))


def config_from_dict(data: dict[str, Any], where: str) -> TrainConfig:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    if "model" in data:
        data["model"] = _model_config(data["model"], f"{where}: model")
    data_section = data.get("data")
    if isinstance(data_section, dict) and isinstance(data_section.get("sources"), (str, list)):
        sources = data_section["sources"]
        sources = [sources] if isinstance(sources, str) else sources
        data["data"] = {**data_section, "sources": [{"path": s} if isinstance(s, str) else s for s in sources]}
    cfg = from_dict(TrainConfig, data, where)
    if cfg.lora is not None and cfg.init_from is None:
        raise UserError(f"{where}: lora trains adapters on a base model: set init_from to its checkpoint")
    if (cfg.data is None) == (cfg.finetune is None):
        raise UserError(f"{where}: give exactly one of `data` (pretraining shards) or `finetune` (jsonl)")
    _check_durations(cfg, where)
    _check_optimizer(cfg, where)
    if cfg.global_batch_size <= 0 or (cfg.micro_batch_size is not None and cfg.micro_batch_size <= 0):
        raise UserError(f"{where}: global_batch_size and micro_batch_size must be positive")
    return cfg


def _check_optimizer(cfg: TrainConfig, where: str) -> None:
    """Every optimizer and schedule number in its range, the key named: a negative lr trains (ascending)."""
    o, s = cfg.optimizer, cfg.schedule
    checks = [
        ("optimizer.lr", o.lr, o.lr > 0, "> 0"),
        ("optimizer.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        ("optimizer.eps", o.eps, o.eps > 0, "> 0"),
        ("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optimizer.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("schedule.min_lr_ratio", s.min_lr_ratio, 0 <= s.min_lr_ratio <= 1, "in [0, 1]"),
    ]
    for key, value, ok, wanted in checks:
        if not ok:
            raise UserError(f"{where}: {key}: {value!r} must be {wanted}")


def _check_durations(cfg: TrainConfig, where: str) -> None:
    """Every duration parses, and the schedule's units fit the run's: a wall-clock run warms up over
    a time or a fraction of it; a step-based run never depends on the clock (it stays bit-exact)."""
    total = parse_duration(cfg.max_duration, f"{where}: max_duration", positive=True)
    warmup = parse_duration(cfg.schedule.warmup, f"{where}: schedule.warmup")
    parse_duration(cfg.eval.every, f"{where}: eval.every")
    parse_duration(cfg.checkpoint.every, f"{where}: checkpoint.every")
    if total.unit == "dur":
        raise UserError(f"{where}: max_duration {cfg.max_duration!r}: a fraction of the run needs a run length")
    if total.is_time and warmup.value > 0 and warmup.unit not in ("dur", "s", "min", "h"):
        raise UserError(
            f"{where}: schedule.warmup {cfg.schedule.warmup!r}: with a wall-clock max_duration "
            f"({cfg.max_duration}), give the warmup as a time (20s) or a fraction of the run (0.05dur)"
        )
    if not total.is_time and warmup.is_time and warmup.value > 0:
        raise UserError(
            f"{where}: schedule.warmup {cfg.schedule.warmup!r} is a time, but max_duration "
            f"{cfg.max_duration!r} is not: use steps (100ba) or a fraction (0.05dur)"
        )


def _model_config(value: Any, where: str) -> ModelConfig:
    if isinstance(value, str):
        return preset(value)
    if isinstance(value, dict) and "preset" in value:
        changes = {k: v for k, v in value.items() if k != "preset"}
        base = dataclasses.asdict(preset(value["preset"]))
        return from_dict(ModelConfig, {**base, **changes}, where)
    return from_dict(ModelConfig, value, where)


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--optimizer.lr 1e-3 --model.n_layers=2` -> [("optimizer.lr", 0.001), ("model.n_layers", 2)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise UserError(f"override {arg} needs a value")
            value, i = args[i + 1], i + 1
        out.append((key.replace("-", "_"), yaml.safe_load(value)))
        i += 1
    return out


def _set_dotted(data: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "model":  # `model: tiny` + --model.n_layers 2
            child = {"preset": child}
        node[part] = child if isinstance(child, dict) else {}
        node = node[part]
    node[parts[-1]] = value


TIME_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Duration:
    """A length of training: optimizer steps (ba), tokens (tok), epochs (ep), a fraction of the run
    (dur), or wall-clock time (s, min, h)."""

    value: float
    unit: Literal["ba", "tok", "ep", "dur", "s", "min", "h"]

    @property
    def is_time(self) -> bool:
        return self.unit in TIME_UNITS

    @property
    def seconds(self) -> float:
        return self.value * TIME_UNITS[self.unit]

    def steps(self, tokens_per_step: int, steps_per_epoch: float, total_steps: int | None = None) -> int:
        """This duration in optimizer steps (not defined for wall-clock durations)."""
        if self.unit == "ba":
            return int(self.value)
        if self.unit == "tok":
            return math.ceil(self.value / tokens_per_step)
        if self.unit == "ep":
            return math.ceil(self.value * steps_per_epoch)
        if self.unit == "dur" and total_steps is not None:
            return int(self.value * total_steps)
        raise UserError(f"{self.value:g}{self.unit} cannot be counted in steps here")


def parse_duration(text: str, where: str = "duration", positive: bool = False) -> Duration:
    """`1000ba`, `2e9tok`, `1ep`, `0.1dur`, `90s`, `6min`, `1h` -> Duration; anything else is a one-line error."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(ba|tok|ep|dur|s|min|h)\s*", str(text))
    if not m:
        raise UserError(
            f"{where}: {text!r} is not a duration; use e.g. 1000ba, 2e9tok, 1ep, 0.1dur, or a time: 90s, 6min, 1h"
        )
    try:
        value = float(m.group(1))
    except ValueError as e:
        raise UserError(f"{where}: {text!r} has no valid number") from e
    if value < 0 or not math.isfinite(value):
        raise UserError(f"{where}: {text!r} must not be negative")
    if positive and value == 0:
        raise UserError(f"{where}: {text!r} must be more than zero")
    return Duration(value, m.group(2))  # type: ignore[arg-type]
