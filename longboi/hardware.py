"""What the machine computes well: native bf16 or not, and its peak FLOP/s (for MFU).

`precision: auto` (everywhere: train, finetune, eval, generate, chat, perplexity) picks bf16 only where
the device computes it natively. On CPUs that matters a lot: with AVX512-BF16 or AMX a bf16 matmul
runs about 2x fp32, but on AVX2-only CPUs torch emulates it and it runs about 100x slower, so a
hard-coded bf16 turns a minutes-long run into a day.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch

from longboi.config import Precision
from longboi.errors import UserError

# One table of accelerators, used by MFU (the device torch reports) and by `longboi plan` (by name).
# Peak: dense bf16 tensor-core FLOP/s from the vendor datasheets (the sparse figures are 2x).
USABLE_MEMORY = 0.9  # of an accelerator's memory: the CUDA context and allocator fragmentation take the rest


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    memory_gib: float
    mfu_table: str | None  # which LLM Foundry table gives its default MFU (None: a proxy, said so)
    bf16: bool = True  # trains in bf16 autocast (a CPU without native bf16 trains in fp32)
    device_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name (the longest match wins)

    @property
    def usable_bytes(self) -> float:
        return USABLE_MEMORY * self.memory_gib * 2**30


ACCELERATORS = {
    a.name: a
    for a in (
        # NVIDIA A100 datasheet: 312 TFLOPS bf16 (624 sparse)
        Accelerator("a100-40gb", 312e12, 40, "a100-40gb", device_names=("A100",)),
        Accelerator("a100-80gb", 312e12, 80, "a100-80gb", device_names=("A100 80GB", "A100-SXM4-80GB", "A100-80GB")),
        Accelerator("h100", 989.4e12, 80, "h100", device_names=("H100",)),  # H100 SXM: 1,979 with sparsity
        Accelerator("h200", 989.4e12, 141, "h100", device_names=("H200",)),  # H100's compute, 141 GB HBM3e
        Accelerator("l4", 121e12, 24, None, device_names=("L4",)),  # L4: 242 TFLOPS bf16 with sparsity
        Accelerator("l40", 181e12, 48, None, device_names=("L40",)),  # L40: 362 with sparsity
        Accelerator("l40s", 362e12, 48, None, device_names=("L40S",)),  # L40S: 733 with sparsity
        Accelerator("a10", 125e12, 24, None, device_names=("A10",)),  # A10: 125 dense, 250 sparse
        Accelerator("a6000", 155e12, 48, None, device_names=("A6000",)),  # RTX A6000: 309.7 with sparsity
        Accelerator("rtx-3090", 71e12, 24, None, device_names=("RTX 3090",)),
        Accelerator("rtx-4090", 165.2e12, 24, None, device_names=("RTX 4090",)),  # Ada: bf16, fp32 accumulate
        Accelerator("mi300x", 1307.4e12, 192, None, device_names=("MI300X",)),  # AMD MI300X: bf16 dense
    )
}
UNKNOWN_GPU_PEAK = 100e12  # a GPU missing from the table (MFU says so: pass log.peak_flops to correct it)


def accelerator_of(device_name: str) -> Accelerator | None:
    """The table's entry for a device name as torch reports it ("NVIDIA H100 80GB HBM3"), or None."""
    found = [(len(n), a) for a in ACCELERATORS.values() for n in a.device_names if n in device_name]
    return max(found, key=lambda x: x[0])[1] if found else None


PEAK_CACHE = Path(os.path.expanduser("~/.cache/longboi/peak_flops.json"))


@dataclass(frozen=True)
class PrecisionChoice:
    precision: Literal["fp32", "bf16"]
    reason: str

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """torch's vector ISA for this CPU (AVX2, AVX512, ...), as printed next to every timing."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 matmuls natively, and the evidence."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'has' if ok else 'lacks'} bf16 tensor cores"
    flags = cpu_flags()
    found = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if found or _torch_cpu_probe("_is_avx512_bf16_supported") or _torch_cpu_probe("_is_amx_tile_supported"):
        return True, f"CPU {cpu_capability()} with {', '.join(found) or 'AVX512-BF16/AMX'}"
    if platform.machine() in ("aarch64", "arm64") and "bf16" in flags:
        return True, "Arm CPU with the BF16 extension"
    return False, f"CPU {cpu_capability()} without AVX512-BF16 or AMX (bf16 is emulated)"


def _torch_cpu_probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)
    return bool(probe()) if probe is not None else False


_ANNOUNCED: set[tuple] = set()


# Makes `auto` mean this precision whatever the device computes natively: the test suite runs as on the
# other kind of CPU with it (`pytest --auto-precision bf16`, or the variable set by hand).
AUTO_PRECISION_ENV = "LONGBOI_AUTO_PRECISION"


def resolve_precision(requested: Precision, device: torch.device, quiet: bool = False) -> PrecisionChoice:
    """`auto` -> bf16 where native, else fp32. The choice and its reason are printed once per process;
    an explicit bf16 on a CPU that emulates it runs, with a warning that gives the measured slowdown."""
    native, evidence = native_bf16(device)
    forced = os.environ.get(AUTO_PRECISION_ENV, "")
    if forced and forced not in ("fp32", "bf16"):
        raise UserError(f"environment variable {AUTO_PRECISION_ENV}={forced!r}: expected fp32 or bf16 (or unset)")
    if requested == "auto" and forced:
        choice = PrecisionChoice(forced, f"auto: {AUTO_PRECISION_ENV}={forced} ({evidence})")  # type: ignore[arg-type]
    elif requested == "auto":
        choice = PrecisionChoice("bf16" if native else "fp32", f"auto: {evidence}")
    else:
        choice = PrecisionChoice(requested, f"requested ({evidence})")
    key = (requested, device.type)
    if not quiet and key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(f"precision: {choice.precision} ({choice.reason})", file=sys.stderr)
        if choice.bf16 and not native and device.type == "cpu":
            slowdown = cpu_peak_flops(False) / cpu_peak_flops(True)
            print(
                f"warning: bf16 on this CPU runs matmuls {slowdown:.0f}x slower than fp32 (measured); "
                "use precision auto or fp32",
                file=sys.stderr,
            )
    return choice


def peak_flops(device: torch.device, bf16: bool, override: float | None = None) -> float:
    """Peak FLOP/s of one device in the training dtype: override, GPU datasheet, or measured on CPU."""
    if override:
        return override
    if device.type == "cuda":
        known = accelerator_of(torch.cuda.get_device_name(device))
        value = known.peak_flops if known else UNKNOWN_GPU_PEAK
        return value if bf16 else value / 2  # tf32 is about half the bf16 rate
    return cpu_peak_flops(bf16)


def cpu_peak_flops(bf16: bool, refresh: bool = False) -> float:
    """The CPU's matmul peak, measured once per (CPU model, ISA, threads, dtype) and cached on disk.

    `refresh` measures again and keeps the higher figure: a first measurement taken while another
    process held a core is too low, and would otherwise be kept forever (MFU above 100%).
    """
    key = _peak_key(bf16)
    known = _read_peak_cache()
    if refresh or key not in known:
        measured = measure_matmul_flops(torch.bfloat16 if bf16 else torch.float32)
        known = _read_peak_cache()  # another process may have written meanwhile
        known[key] = max(measured, known.get(key, 0.0)) if refresh else measured
        PEAK_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = PEAK_CACHE.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(PEAK_CACHE)
    return known[key]


def _peak_key(bf16: bool) -> str:
    model = cpu_model().replace(" ", "_")
    return f"{platform.machine()}-{model}-{cpu_capability()}-{torch.get_num_threads()}t-{'bf16' if bf16 else 'fp32'}"


def _read_peak_cache() -> dict[str, float]:
    try:
        return json.loads(PEAK_CACHE.read_text())
    except (OSError, ValueError):
        return {}


def measure_matmul_flops(dtype: torch.dtype, target_s: float = 0.01, repeats: int = 10) -> float:
    """Best-of-`repeats` FLOP/s of a square matmul sized so one product takes about `target_s`.

    Sizing to the dtype's speed keeps this well under a second both where bf16 is native (fast, so
    the matrix grows to 2048) and where it is emulated (~100x slower, so it stays small). Taking the
    best of several short runs makes it robust to a neighbour stealing a core for a moment.
    """
    n = 128
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a training run's dropout must not shift
    while True:
        a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
        seconds = _time_matmul(a, b)
        if seconds >= target_s or n >= 2048:
            break
        n *= 2
    best = min(_time_matmul(a, b) for _ in range(repeats))
    return 2 * n**3 / best


def _time_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


class MFU:
    """Model FLOPs utilization against a peak that is corrected when the run proves it too low.

    An MFU above 100% means the peak is wrong (measured while the machine was busy): the CPU peak is
    measured again once; if the run still beats it, the run's own rate becomes the peak. So the
    figure shown is never above 100%.
    """

    def __init__(self, device: torch.device, bf16: bool, override: float | None, devices: int = 1):
        self.bf16, self.devices = bf16, devices
        self.peak = peak_flops(device, bf16, override) * devices
        self.remeasured = override is not None or device.type != "cpu"

    def __call__(self, achieved_flops: float) -> float:
        if achieved_flops > self.peak and not self.remeasured:
            self.remeasured = True
            self.peak = max(self.peak, cpu_peak_flops(self.bf16, refresh=True) * self.devices)
        self.peak = max(self.peak, achieved_flops)
        return achieved_flops / self.peak
