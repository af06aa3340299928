"""Shared fixtures: paths to the real data in ../shared/data and small model configs."""

from pathlib import Path

import pytest
import torch

from longboi.config import ModelConfig
from longboi.data.prepare import prepare
from longboi.model import MPTForCausalLM

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


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    if not TOKENIZER.is_file():
        pytest.fail(f"shared data missing: {TOKENIZER} (the repo expects ../shared/data beside it)")
    return TOKENIZER


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
