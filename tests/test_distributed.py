"""Distributed training on CPU: gloo backend, 2 processes under torchrun (the twin of NCCL on GPUs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import assert_resumed, run_config, train_losses

from longboi.cli import main

pytestmark = pytest.mark.distributed


def torchrun(config, nproc=2, command="train", **popen):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "longboi",
        command,
        str(config),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc), collected before any is killed."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [p for child in children for p in process_tree(int(child))]


def write(tmp_path, name, cfg):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


KNOBS = {
    "max_duration": "6ba",
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "eval.every": "3ba",
    "eval.prompts": ["ROMEO:"],
}


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("single")
    assert main(["train", str(write(tmp, "single", run_config(data, tmp / "run", **KNOBS)))]) == 0
    return train_losses(tmp / "run")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(mode, tmp_path, data, single):
    proc = torchrun(write(tmp_path, mode, run_config(data, tmp_path / "run", parallel=mode, **KNOBS)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    losses = train_losses(tmp_path / "run")
    assert losses.keys() == single.keys()
    assert all(abs(losses[k] - single[k]) < 1e-4 * max(1.0, abs(single[k])) for k in single), (losses, single)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_fsdp_save_on_two_processes_resumes_on_one(tmp_path, data, single):
    cfg = write(
        tmp_path, "fsdp", run_config(data, tmp_path / "run", parallel="fsdp", **KNOBS, **{"checkpoint.every": "2ba"})
    )
    proc = torchrun(cfg)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    for pid in process_tree(proc.pid):  # the launcher and both ranks (torchrun starts each in its own session)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert main(["train", str(cfg)]) == 0  # one process, no flags: resumes the 2-rank checkpoint
    assert_resumed(tmp_path / "run", from_at_least=4)
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 7))
    assert all(abs(losses[k] - single[k]) < 1e-4 * max(1.0, abs(single[k])) for k in single), (losses, single)


def test_lora_finetune_with_ddp_matches_one_process(tmp_path):
    from conftest import TOKENIZER, build, finetune_run, small_config

    from longboi.checkpoint import save_checkpoint
    from longboi.tokenizer import Tokenizer

    base = tmp_path / "base"
    save_checkpoint(build(small_config(max_seq_len=64)), base, Tokenizer(TOKENIZER))
    common = finetune_run(
        base,
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        parallel="ddp",
        max_duration="4ba",
        global_batch_size=8,
        optimizer={"lr": 1e-2},
    )
    one = write(tmp_path, "one", {**common, "run_dir": str(tmp_path / "one")})
    two = write(tmp_path, "two", {**common, "run_dir": str(tmp_path / "two")})
    assert main(["finetune", str(one)]) == 0
    proc = torchrun(two)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 * max(1.0, abs(a[k])) for k in a), (a, b)
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


def test_finetune_loss_is_the_token_mean_on_two_ranks_with_micro_1_as_with_one_process_micro_4(tmp_path):
    """Rows hold different numbers of target tokens; the loss must not depend on how they are split."""
    from conftest import TOKENIZER, build, finetune_run, small_config

    from longboi.checkpoint import save_checkpoint
    from longboi.tokenizer import Tokenizer

    base = tmp_path / "base"
    save_checkpoint(build(small_config(max_seq_len=64)), base, Tokenizer(TOKENIZER))
    common = finetune_run(base, parallel="ddp", max_duration="3ba", global_batch_size=8)
    one = write(tmp_path, "one", {**common, "run_dir": str(tmp_path / "one"), "micro_batch_size": 4})
    two = write(tmp_path, "two", {**common, "run_dir": str(tmp_path / "two"), "micro_batch_size": 1})
    assert main(["finetune", str(one)]) == 0
    proc = torchrun(two, command="finetune")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    a, b = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 * abs(a[k]) for k in a), (a, b)


def test_lora_with_fsdp_is_refused_with_a_clear_error(tmp_path):
    from conftest import TOKENIZER, build, finetune_run, small_config

    from longboi.checkpoint import save_checkpoint
    from longboi.tokenizer import Tokenizer

    base = tmp_path / "base"
    save_checkpoint(build(small_config(max_seq_len=64)), base, Tokenizer(TOKENIZER))
    cfg = {**finetune_run(base, lora={"r": 4}, parallel="fsdp"), "run_dir": str(tmp_path / "run")}
    proc = torchrun(write(tmp_path, "lora-fsdp", cfg), command="finetune")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: LoRA is not supported with FSDP here (untested with peft); set parallel: ddp" in err


def test_a_wall_clock_budget_on_two_ranks_ends_together(tmp_path, data):
    """Each rank's clock differs: they must still agree on the lr and on the last step (else a rank
    would wait forever in a collective the other never joins)."""
    cfg = run_config(data, tmp_path / "run", parallel="ddp", max_duration="8s", global_batch_size=8,
                     **{"schedule.warmup": "0.1dur", "eval.every": "4s", "checkpoint.every": "3s"})  # fmt: skip
    proc = torchrun(write(tmp_path, "timed", cfg))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    steps = [r for r in rows if r["kind"] == "train"]
    assert steps[-1]["elapsed_s"] <= 8 and len(steps) >= 5 and (tmp_path / "run" / "final").is_dir()
