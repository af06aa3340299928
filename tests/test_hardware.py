"""Precision by capability and honest MFU (longboi.hardware)."""

import json
import platform
import time

import pytest
import torch

import longboi.hardware as hw
from longboi.hardware import MFU, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def machine_decides(monkeypatch):
    """These tests are about the machine's own decision: no `--auto-precision` switch in effect."""
    monkeypatch.delenv(hw.AUTO_PRECISION_ENV, raising=False)


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has these /proc/cpuinfo flags (torch's own probes agree)."""

    def make(*flags: str, machine: str = "x86_64"):
        monkeypatch.setattr(hw, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(hw, "_torch_cpu_probe", lambda name: bool({"avx512_bf16", "amx_bf16"} & set(flags)))
        monkeypatch.setattr(platform, "machine", lambda: machine)
        monkeypatch.setattr(hw, "_ANNOUNCED", set())

    return make


@pytest.mark.parametrize(
    "flags, machine, requested, expected",
    [
        (("avx2", "fma"), "x86_64", "auto", "fp32"),  # AVX2 only: bf16 is emulated, ~100x slower
        (("avx2", "avx512f", "avx512bw"), "x86_64", "auto", "fp32"),  # AVX-512 without its BF16 extension
        (("avx2", "avx512f", "avx512_bf16"), "x86_64", "auto", "bf16"),  # e.g. Zen4, Cooper Lake
        (("avx2", "avx512f", "amx_bf16", "amx_tile"), "x86_64", "auto", "bf16"),  # Sapphire Rapids
        (("fp", "asimd", "bf16"), "aarch64", "auto", "bf16"),  # Arm with the BF16 extension
        (("fp", "asimd"), "aarch64", "auto", "fp32"),
        (("avx2", "avx512f", "avx512_bf16"), "x86_64", "fp32", "fp32"),  # an explicit choice is kept
        (("avx2", "fma"), "x86_64", "bf16", "bf16"),
    ],
)
def test_precision_decision_table(cpu_with, flags, machine, requested, expected):
    cpu_with(*flags, machine=machine)
    choice = resolve_precision(requested, CPU, quiet=True)
    assert choice.precision == expected
    assert choice.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_cuda_precision_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_precision("auto", torch.device("cuda"), quiet=True).precision == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda"), quiet=True).precision == "bf16"


def test_the_choice_is_printed_once_with_its_reason(cpu_with, capsys):
    cpu_with("avx2", "fma")
    for _ in range(3):
        resolve_precision("auto", CPU)
    err = capsys.readouterr().err
    assert err.count("precision: fp32") == 1 and "without AVX512-BF16 or AMX" in err


def test_explicit_bf16_on_an_emulating_cpu_warns_with_the_measured_slowdown(cpu_with, capsys, monkeypatch):
    cpu_with("avx2", "fma")
    monkeypatch.setattr(hw, "cpu_peak_flops", lambda bf16, refresh=False: 1.5e9 if bf16 else 150e9)
    assert resolve_precision("bf16", CPU).precision == "bf16"
    assert "bf16 on this CPU runs matmuls 100x slower than fp32 (measured)" in capsys.readouterr().err


def test_this_machines_capability_gives_its_branch():
    """The real probe: bf16 exactly where torch says the CPU has AVX512-BF16 or AMX."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", CPU, quiet=True).bf16 == native


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_measurement_is_quick_for_either_dtype(dtype):
    start = time.perf_counter()
    flops = hw.measure_matmul_flops(dtype)
    assert time.perf_counter() - start < 2.0  # sized to the dtype: ~100x slower bf16 stays small
    assert 1e8 < flops < 1e13


def test_peak_cache_is_keyed_by_cpu_isa_threads_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(hw, "PEAK_CACHE", tmp_path / "peak.json")
    monkeypatch.setattr(hw, "measure_matmul_flops", lambda dtype: 7e9 if dtype == torch.bfloat16 else 9e9)
    assert hw.cpu_peak_flops(False) == 9e9 and hw.cpu_peak_flops(True) == 7e9
    keys = sorted(json.loads((tmp_path / "peak.json").read_text()))
    assert len(keys) == 2
    for key in keys:
        assert hw.cpu_capability() in key and f"{torch.get_num_threads()}t" in key
    assert keys[0].endswith("bf16") and keys[1].endswith("fp32")


def test_a_peak_measured_on_a_busy_machine_is_corrected_and_mfu_never_exceeds_100(tmp_path, monkeypatch):
    cache = tmp_path / "peak.json"
    monkeypatch.setattr(hw, "PEAK_CACHE", cache)
    key = hw._peak_key(False)
    cache.write_text(json.dumps({key: 1e6}))  # what a measurement under heavy load might have kept
    mfu = MFU(CPU, bf16=False, override=None)
    assert mfu.peak == 1e6
    first = mfu(2e9)  # "200,000% MFU": the peak is measured again, and the real one kept
    real = json.loads(cache.read_text())[key]
    assert real > 2e9 and mfu.peak == real and first == pytest.approx(2e9 / real)
    assert all(0 < mfu(x) <= 1.0 for x in (1e9, 5e11, 5e13))  # beyond even that: clamped at 100%


def test_mfu_with_a_given_peak_is_plain_and_still_capped():
    mfu = MFU(CPU, bf16=False, override=100e9)
    assert mfu(50e9) == 0.5 and mfu(150e9) == 1.0


def test_measuring_the_peak_leaves_the_training_rng_alone():
    """A re-measurement mid-run (MFU above 100%) must not shift dropout masks: step-based runs stay bit-exact."""
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    hw.measure_matmul_flops(torch.float32)
    assert torch.equal(torch.rand(4), expected)


def test_the_auto_precision_switch_overrides_the_machine_and_says_so(cpu_with, monkeypatch, capsys):
    cpu_with("avx2", "fma")
    monkeypatch.setenv(hw.AUTO_PRECISION_ENV, "bf16")
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "bf16" and hw.AUTO_PRECISION_ENV in choice.reason
    assert resolve_precision("fp32", CPU, quiet=True).precision == "fp32"  # an explicit choice still wins
    monkeypatch.setenv(hw.AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(hw.UserError, match="expected fp32 or bf16"):
        resolve_precision("auto", CPU, quiet=True)


def test_one_accelerator_table_names_gpus_as_torch_reports_them():
    """MFU (by the device name torch reports) and `longboi plan` (by --gpu name) read one table."""
    from longboi.hardware import ACCELERATORS, accelerator_of
    from longboi.plan import accelerator

    cases = {
        "NVIDIA H100 80GB HBM3": "h100",
        "NVIDIA A100-SXM4-80GB": "a100-80gb",
        "NVIDIA A100-SXM4-40GB": "a100-40gb",
        "NVIDIA A10": "a10",  # not the A100, though "A10" is in "A100"
        "NVIDIA L40S": "l40s",
        "NVIDIA H200": "h200",
    }
    for device_name, name in cases.items():
        assert accelerator_of(device_name) is ACCELERATORS[name] is accelerator(name), device_name
    assert accelerator_of("NVIDIA Tesla K80") is None
