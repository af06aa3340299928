"""Shared fixtures: paths to the real data in ../shared/data and small model configs."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longboi.config import ModelConfig
from longboi.data.prepare import prepare
from longboi.model import MPTForCausalLM


def pytest_addoption(parser):
    parser.addoption(
        "--auto-precision",
        choices=["native", "fp32", "bf16"],
        default="native",
        help="what `precision: auto` / `--dtype auto` means in this run (and its subprocesses): the CPU's native "
        "choice, or as on the other kind of CPU (bf16 on an AVX2 machine is slow: pick the tests with -k)",
    )


def pytest_configure(config):
    import os

    from longboi.hardware import AUTO_PRECISION_ENV

    chosen = config.getoption("--auto-precision")
    if chosen != "native":
        os.environ[AUTO_PRECISION_ENV] = chosen  # inherited by the CLI subprocesses the tests start


ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


def small_config(**changes) -> ModelConfig:
    """A 2-layer model that runs in milliseconds; vocab large enough for the NeoX tokenizer."""
    base = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=50432)
    return ModelConfig(**{**base, **changes})


def build(cfg: ModelConfig, seed: int = 0) -> MPTForCausalLM:
    torch.manual_seed(seed)
    return MPTForCausalLM(cfg).eval()


def trained(tokenizer, steps: int = 40, text: str | None = None, **cfg) -> MPTForCausalLM:
    """A small model trained a few steps on Shakespeare (or `text`): peaked next-token distributions, so greedy
    decoding has real margins (random weights give near-ties that any rounding flips) and weights are not noise."""
    model = build(small_config(max_seq_len=128, **cfg), seed=1).train()
    text = text if text is not None else (SHARED / "text" / "tinyshakespeare.txt").read_text()[:40_000]
    ids = torch.tensor(tokenizer.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def submit_all(engine, jobs: list, record) -> None:
    """Submit serving-engine jobs together; `record(k, event)` gets every event of job k; returns once every
    job has sent its last event (two minutes at most)."""
    import threading

    done = threading.Semaphore(0)
    for k, job in enumerate(jobs):

        def sink(ev, k=k):
            record(k, ev)
            if ev.done:
                done.release()

        job.sink = sink
        engine.submit(job)
    for _ in jobs:
        assert done.acquire(timeout=120), "a job never ended"


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    if not TOKENIZER.is_file():
        pytest.fail(f"shared data missing: {TOKENIZER} (the repo expects ../shared/data beside it)")
    return TOKENIZER


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path) -> Path:
    """A random 2-layer ALiBi checkpoint named `tiny-alibi` (the serving tests call it by that name)."""
    from longboi.checkpoint import save_checkpoint
    from longboi.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("serve") / "tiny-alibi"
    save_checkpoint(build(small_config(max_seq_len=64), seed=5), path, Tokenizer(tokenizer_path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-data") / "shakespeare"
    prepare(
        [str(SHARED / "text" / "tinyshakespeare.txt")],
        str(out),
        str(TOKENIZER),
        seq_len=33,
        val_fraction=0.05,
        shard_mb=0.1,
    )
    return out


def finetune_run(base: Path, **changes) -> dict:
    """A small finetuning run config on the Dolly sample, starting from checkpoint `base`."""
    cfg = {
        "model": {"preset": "tiny", "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 64},
        "tokenizer": str(TOKENIZER),
        "init_from": str(base),
        "finetune": {"data": str(SHARED / "instruct" / "dolly_hhrlhf_small.jsonl")},
        "max_duration": "8ba",
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "precision": "fp32",
        "optimizer": {"lr": 1e-3},
        "checkpoint": {"every": "2ba"},
        "log": {"every": 1, "progress": False},
        "eval": {"every": "0ba"},
    }
    return {**cfg, **changes}


# Object storage: a real S3-compatible server (moto) on loopback, bucket longboi-test.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")  # one server: fsspec caches its clients, endpoint included
def s3(tmp_path_factory):
    port = _free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    for _ in range(100):
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir("longboi-test")
            break
        except Exception:
            time.sleep(0.1)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def open_llama(path, **kwargs):
    """llama_cpp.Llama without llama.cpp's extra weight buffers: on CPUs with AMX its repacking of q8_0
    weights segfaults in the first forward (ggml-org/llama.cpp#20824, seen here with llama-cpp-python
    0.3.36 on a Xeon with amx_int8), which would take the whole test session down. The plain CPU buffers
    compute the same quantized products."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        low.llama_model_default_params = default
