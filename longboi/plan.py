"""Planning arithmetic: training memory per device, time and cost (FLOP counts: longboi.flops)."""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longboi.config import ModelConfig
from longboi.errors import UserError
from longboi.flops import model_stats
from longboi.hardware import ACCELERATORS, USABLE_MEMORY, Accelerator


def memory_table(params: int) -> list[tuple[str, float]]:
    """(what, GiB) rows for weights, grads and optimizer state; activations are extra."""
    gib = 2**30
    return [
        ("weights fp32", 4 * params / gib),
        ("weights bf16", 2 * params / gib),
        ("grads fp32", 4 * params / gib),
        ("grads bf16", 2 * params / gib),
        ("AdamW state (2 x fp32)", 8 * params / gib),
        ("Lion state (1 x fp32)", 4 * params / gib),
        ("train fp32 + AdamW (weights+grads+state)", 16 * params / gib),
        ("train bf16 autocast + AdamW (fp32 master)", 16 * params / gib),
        ("train fp32 + Lion", 12 * params / gib),
    ]


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


# LLM Foundry's published MFU at sequence length 2048, bf16, 8 GPUs (30b: 32 GPUs on A100-40GB; 70b: 64),
# from mosaicml/llm-foundry scripts/train/benchmarking/README.md (tables last changed 2024-01-06, 5e85bd62).
LLM_FOUNDRY_MFU = {
    "a100-40gb": {125e6: 0.4275, 350e6: 0.4917, 760e6: 0.5289, 1e9: 0.5623, 3e9: 0.5782, 7e9: 0.5092, 13e9: 0.4394,
                  30e9: 0.5174, 70e9: 0.3587},
    "a100-80gb": {125e6: 0.4479, 350e6: 0.5162, 760e6: 0.5685, 1e9: 0.5986, 3e9: 0.6211, 7e9: 0.6423, 13e9: 0.5957,
                  30e9: 0.553, 70e9: 0.5333},
    "h100": {760e6: 0.349, 1e9: 0.4182, 3e9: 0.4373, 7e9: 0.4644, 13e9: 0.3979, 30e9: 0.3811, 70e9: 0.4257},
}  # fmt: skip
# Goodput: the share of wall-clock time spent on useful training (evaluation, checkpointing, restarts
# and failures take the rest). Llama 3 (arXiv 2407.21783, section 3.3.4): "higher than 90% effective
# training time" over 54 days with 466 interruptions.
DEFAULT_GOODPUT = 0.9


def accelerator(name: str) -> Accelerator:
    """A named accelerator from the table, or "cpu" (this machine: measured matmul peak, physical memory)."""
    key = name.lower()
    if key == "cpu":
        return _this_cpu()
    if key not in ACCELERATORS:
        close = difflib.get_close_matches(key, [*ACCELERATORS, "cpu"], n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown --gpu {name!r}{hint} (known: {', '.join([*ACCELERATORS, 'cpu'])})")
    return ACCELERATORS[key]


def _this_cpu() -> Accelerator:
    from longboi.hardware import cpu_peak_flops, native_bf16

    bf16 = native_bf16(torch.device("cpu"))[0]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Accelerator("cpu", cpu_peak_flops(bf16), memory, None, bf16)


def default_mfu(acc: Accelerator, params: float) -> tuple[float, str]:
    """LLM Foundry's MFU for the nearest model size on this accelerator's table (A100-80GB's as a proxy
    where it published none); a flat 0.5 for a CPU."""
    if acc.name == "cpu":
        return 0.5, "no published CPU table (pass --mfu measured:RUN for this machine's own)"
    name = acc.mfu_table or "a100-80gb"
    table = LLM_FOUNDRY_MFU[name]
    size = min(table, key=lambda s: abs(math.log(s / params)))
    proxy = "" if acc.mfu_table else ", a proxy: none published for this GPU"
    return table[size], f"LLM Foundry's {name} table, {human(size)} model{proxy}"


def measured_mfu(run_dir: str | Path) -> tuple[float, str]:
    """The median MFU over the second half of a run's logged steps (its own hardware's peak)."""
    from longboi.runs import read_metrics

    values = [r["mfu"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
    if not values:
        raise UserError(f"{run_dir}/metrics.jsonl: no training records with mfu")
    return float(np.median(values[len(values) // 2 :])), f"measured by {run_dir} (on its own hardware)"


@dataclass(frozen=True)
class Memory:
    """Bytes per device for one training step."""

    # fp32 master weights, gradients and optimizer states, sharded across devices by FSDP; gradients stay
    # sharded under accumulation too (the trainer reduce-scatters every micro-batch)
    state: float
    gathered: float  # working bf16 copies: FSDP's two unsharded blocks + embedding, or autocast's cast weights
    activations: float  # kept for the backward pass
    logits: float  # the chunked LM-head loss: a chunk's fp32 logits and their gradient + head-gradient buffers

    @property
    def total(self) -> float:
        return self.state + self.gathered + self.activations + self.logits


def train_memory(
    cfg: ModelConfig, seq_len: int, micro_batch: int, devices: int = 1, checkpointing: bool = False,
    optimizer: str = "adamw", mixed: bool = True,
) -> Memory:  # fmt: skip
    """Per-device training memory (FSDP full sharding when devices > 1).

    Activations follow Korthikanti et al. 2022 (arXiv 2205.05198) with fused attention: 17 values of
    d_model per token per layer (34 bytes in bf16), no seq^2 term. Activation checkpointing keeps each
    block's input and recomputes one block at a time.
    """
    from longboi.model import LOSS_CHUNK_ROWS

    stats = model_stats(cfg, seq_len)
    n, d, v = stats.params, cfg.d_model, cfg.vocab_size
    act = 2 if mixed else 4
    state = (8 + (8 if optimizer == "adamw" else 4)) * n / devices
    block = stats.non_embedding_params / cfg.n_layers
    gathered = act * (2 * block + v * d) if devices > 1 else (2 * n if mixed else 0)
    tokens = micro_batch * seq_len
    per_layer = 17 * tokens * d * act
    outside = 3 * tokens * d * act  # embedding output, final norm, the loss's gradient for h
    activations = outside + (cfg.n_layers * tokens * d * act + per_layer if checkpointing else cfg.n_layers * per_layer)
    # ChunkedLMLoss holds a chunk's (rows x vocab) fp32 logits (softmax in place) and their gradient, and
    # two more (vocab x d) fp32 head gradients (its own and the scaled one autograd hands back)
    logits = 2 * min(LOSS_CHUNK_ROWS, tokens) * v * 4 + 2 * v * d * 4
    return Memory(state, gathered, activations, logits)


def largest_micro_batch(cfg: ModelConfig, seq_len: int, acc: Accelerator, devices: int, checkpointing: bool) -> int:
    """The largest micro-batch (<= 256) whose estimate fits in the usable memory; 0 if none does."""
    fits = [
        b
        for b in range(1, 257)
        if train_memory(cfg, seq_len, b, devices, checkpointing, mixed=acc.bf16).total <= acc.usable_bytes
    ]
    return max(fits, default=0)


@dataclass(frozen=True)
class TrainingPlan:
    params: int
    flops_per_token: int
    tokens: float
    accelerator: Accelerator
    devices: int
    mfu: float
    mfu_source: str
    goodput: float
    price_per_hour: float | None

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.mfu * self.accelerator.peak_flops / self.flops_per_token

    @property
    def ideal_s(self) -> float:
        """Wall clock at the benchmark rate, every second spent training."""
        return self.tokens / (self.tokens_per_s_per_device * self.devices)

    @property
    def expected_s(self) -> float:
        """Wall clock once evaluation, checkpointing, restarts and failures take their share (1 - goodput)."""
        return self.ideal_s / self.goodput

    @property
    def device_hours(self) -> float:
        return self.expected_s / 3600 * self.devices

    @property
    def usd(self) -> float | None:
        return None if self.price_per_hour is None else self.device_hours * self.price_per_hour


def plan_training(
    cfg: ModelConfig, tokens: float, acc: Accelerator, devices: int, seq_len: int,
    mfu: float | None = None, mfu_source: str = "given", goodput: float = DEFAULT_GOODPUT,
    price_per_hour: float | None = None,
) -> TrainingPlan:  # fmt: skip
    stats = model_stats(cfg, seq_len)
    if mfu is None:
        mfu, mfu_source = default_mfu(acc, stats.params)
    return TrainingPlan(
        stats.params, stats.train_flops_per_token, tokens, acc, devices, mfu, mfu_source, goodput, price_per_hour
    )


def nearest_preset(params: float) -> tuple[str, int]:
    """The preset whose parameter count is nearest `params` (in ratio)."""
    from longboi.config import PRESETS

    sizes = {name: model_stats(cfg).params for name, cfg in PRESETS.items()}
    name = min(sizes, key=lambda k: abs(math.log(sizes[k] / params)))
    return name, sizes[name]


def duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.2f} days"
    return f"{seconds / 3600:.2f} hours" if seconds >= 3600 else f"{seconds / 60:.1f} minutes"


def report(p: TrainingPlan, cfg: ModelConfig, seq_len: int, micro_batch: int | None, checkpointing: bool) -> dict:
    """Print the plan: compute, memory per device (with and without activation checkpointing), time, cost."""
    acc = p.accelerator
    print(
        f"model        {human(p.params)} parameters; {human(p.flops_per_token)} training FLOPs/token at seq {seq_len}"
    )
    print(f"training     {human(p.tokens)} tokens = {p.flops:.3g} FLOPs ({p.tokens / p.params:.1f} tokens/parameter)")
    print(
        f"hardware     {p.devices} x {acc.name} ({acc.peak_flops / 1e12:.3g} TFLOP/s "
        f"{'bf16' if acc.bf16 else 'fp32'} dense, {acc.memory_gib:.0f} GiB)"
    )
    out: dict = {"params": p.params, "flops": p.flops, "flops_per_token": p.flops_per_token}
    for ac in (False, True):
        batch = micro_batch or largest_micro_batch(cfg, seq_len, acc, p.devices, ac) or 1
        mem = train_memory(cfg, seq_len, batch, p.devices, ac, mixed=acc.bf16)
        fits = mem.total <= acc.usable_bytes
        label = "with activation checkpointing" if ac else "without checkpointing"
        gib = [x / 2**30 for x in (mem.state, mem.gathered, mem.activations, mem.logits, mem.total)]
        print(
            f"memory/GPU   {label}, micro-batch {batch}: state {gib[0]:.1f} + working weights {gib[1]:.1f} + "
            f"activations {gib[2]:.1f} + logits {gib[3]:.1f} = {gib[4]:.1f} GiB -> "
            f"{'fits' if fits else 'does NOT fit'} in {USABLE_MEMORY:.0%} of {acc.memory_gib:.0f} GiB"
            + (" (chosen)" if ac == checkpointing else "")
        )
        out[f"memory_gib_{'ac' if ac else 'no_ac'}"] = {"micro_batch": batch, "total": gib[4], "fits": fits}
    print(f"throughput   MFU {p.mfu:.1%} ({p.mfu_source}) -> {p.tokens_per_s_per_device:,.0f} tokens/s per GPU")
    source = " (default: Llama 3's >90% effective training time, arXiv 2407.21783)"
    print(
        f"time         ideal {duration(p.ideal_s)} at that MFU; expected {duration(p.expected_s)} at goodput "
        f"{p.goodput:.0%}{source if p.goodput == DEFAULT_GOODPUT else ''}"
    )
    cost = f"; ${p.usd:,.0f} at ${p.price_per_hour:.2f}/GPU-hour" if p.usd is not None else ""
    print(f"cost         {p.device_hours:,.0f} GPU-hours{cost}")
    return out | {
        "tokens_per_s_per_gpu": p.tokens_per_s_per_device,
        "ideal_days": p.ideal_s / 86400,
        "expected_days": p.expected_s / 86400,
        "gpu_hours": p.device_hours,
        "usd": p.usd,
        "mfu": p.mfu,
    }
