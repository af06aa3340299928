import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SHARED, TOKENIZER, finetune_run
from safetensors.torch import load_file

import longboi.train.loop as loop
from longboi.cli import main
from longboi.errors import UserError
from longboi.train.config import ScheduleConfig, config_from_dict, load_train_config, parse_duration
from longboi.train.loop import TrainingStopped, train
from longboi.train.optim import Lion, lr_multiplier, param_groups
from longboi.train.validation import validation_loss

SMALL_MODEL = {"preset": "tiny", "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 32}


def run_config(data: Path, run_dir: Path, **changes) -> dict:
    base = {
        "run_dir": str(run_dir),
        "model": dict(SMALL_MODEL),
        "tokenizer": str(TOKENIZER),
        "data": {"sources": [str(data / "train")], "val": str(data / "val")},
        "max_duration": "8ba",
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "precision": "fp32",
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup": "2ba"},
        "checkpoint": {"every": "2ba", "keep": 10},
        "log": {"every": 1, "progress": False},
        "eval": {"every": "4ba", "val_batches": 2, "prompts": ["ROMEO:"], "max_new_tokens": 4},
    }
    for key, value in changes.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return base


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            losses[row["step"]] = row["loss"]  # a resumed run rewrites steps after its checkpoint
    return losses


# -- config ---------------------------------------------------------------------------------------


def test_every_recipe_in_configs_parses():
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        load_train_config(path)


def test_config_errors_name_the_key_and_suggest(tmp_path, data):
    cfg = run_config(data, tmp_path / "r")
    cfg["optimizer"]["lrr"] = 1.0
    with pytest.raises(UserError, match=r"run.yaml.optimizer: unknown key 'lrr' \(did you mean 'lr'\?\)"):
        load_train_config(write_config(tmp_path, cfg))
    cfg = run_config(data, tmp_path / "r")
    cfg["max_duraton"] = "8ba"
    with pytest.raises(UserError, match="did you mean 'max_duration'"):
        load_train_config(write_config(tmp_path, cfg))
    (tmp_path / "bad.yaml").write_text("run_dir: x\nmodel: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        load_train_config(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not a duration"):
        config_from_dict(run_config(data, tmp_path / "r", max_duration="8 batches"), "x")


def test_cli_overrides_are_typed_and_checked(tmp_path, data):
    path = write_config(tmp_path, run_config(data, tmp_path / "r"))
    cfg = load_train_config(path, ["--optimizer.lr", "1e-4", "--model.n_layers=3", "--precision", "bf16"])
    assert cfg.optimizer.lr == 1e-4 and cfg.model.n_layers == 3 and cfg.precision == "bf16"
    with pytest.raises(UserError, match="unknown key 'n_layer'"):
        load_train_config(path, ["--model.n_layer", "3"])
    with pytest.raises(UserError, match="expected int"):
        load_train_config(path, ["--global_batch_size", "big"])


def test_durations():
    assert parse_duration("1000ba").steps(100, 10) == 1000
    assert parse_duration("2e9tok").steps(4096 * 256, 10) == math.ceil(2e9 / (4096 * 256))
    assert parse_duration("1.5ep").steps(100, 10) == 15
    assert parse_duration("0.1dur").steps(100, 10, total_steps=500) == 50
    assert [parse_duration(t).seconds for t in ("90s", "6min", "1h", "0.5h")] == [90, 360, 3600, 1800]
    assert parse_duration("6min").is_time and not parse_duration("6ba").is_time


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_duration", "abc", "max_duration: 'abc' is not a duration; use e.g. 1000ba"),
        ("max_duration", "-1ba", "max_duration: '-1ba' must not be negative"),
        ("max_duration", "0s", "max_duration: '0s' must be more than zero"),
        ("max_duration", "2fortnights", "is not a duration"),
        ("max_duration", "0.5dur", "a fraction of the run needs a run length"),
        ("schedule.warmup", "2min", "schedule.warmup '2min' is a time, but max_duration '8ba' is not"),
        ("eval.every", "soon", "eval.every: 'soon' is not a duration"),
        ("checkpoint.every", "-5min", "checkpoint.every: '-5min' must not be negative"),
        ("run_dir", "/proc/nope/run", "run_dir /proc/nope/run/config.yaml: cannot write in /proc/nope/run: No such"),
        ("run_dir", "/etc/hostname/run", "cannot write in /etc/hostname/run: Not a directory"),
    ],
)
def test_bad_durations_are_one_line_errors_from_the_cli(tmp_path, data, capsys, key, value, message):
    path = write_config(tmp_path, run_config(data, tmp_path / "r"))
    assert main(["train", str(path), f"--{key}", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_a_wall_clock_run_refuses_a_step_count_warmup(tmp_path, data):
    cfg = run_config(data, tmp_path / "r", max_duration="2min")  # run_config warms up over 2ba
    with pytest.raises(UserError, match=r"give the warmup as a time \(20s\) or a fraction of the run"):
        config_from_dict(cfg, "x")


# Every kind of run length, a few optimizer steps long on the 33-token data (4 x 32 tokens per step).
RUN_LENGTHS = {"steps": "3ba", "tokens": "384tok", "epochs": "0.001ep", "time": "2s"}


def defaults_config(data: Path, run_dir: Path, max_duration: str) -> dict:
    """A run that leaves schedule, eval, checkpoint and spike settings at their defaults."""
    return {
        "run_dir": str(run_dir),
        "model": dict(SMALL_MODEL),
        "tokenizer": str(TOKENIZER),
        "data": {"sources": [str(data / "train")], "val": str(data / "val")},
        "max_duration": max_duration,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "precision": "fp32",
        "log": {"progress": False},
    }


@pytest.mark.parametrize("kind", RUN_LENGTHS)
def test_every_run_length_works_with_the_default_schedule_eval_checkpoint_and_spike(tmp_path, data, kind):
    """The real command line, nothing set but the run length: no traceback, a final checkpoint."""
    path = write_config(tmp_path, defaults_config(data, tmp_path / "run", RUN_LENGTHS[kind]))
    cmd = [sys.executable, "-m", "longboi", "train", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert train_losses(tmp_path / "run")  # it trained


@pytest.mark.parametrize("kind", RUN_LENGTHS)
@pytest.mark.parametrize("unit", ["0ba", "1ba", "100tok", "0.0005ep", "0.3dur", "0s", "1s"])
def test_any_unit_for_warmup_eval_and_checkpoint_trains_or_is_a_one_line_error(tmp_path, data, capsys, kind, unit):
    """warmup, eval.every and checkpoint.every in every unit against every kind of run length: the run
    trains, or the CLI refuses the config in one line (a step-based run does not warm up by the clock)."""
    cfg = defaults_config(data, tmp_path / "run", RUN_LENGTHS[kind])
    cfg |= {"schedule": {"warmup": unit}, "eval": {"every": unit, "val_batches": 1}, "checkpoint": {"every": unit}}
    code = main(["train", str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    refused = kind != "time" and unit == "1s" or kind == "time" and unit in ("1ba", "100tok", "0.0005ep")
    if refused:
        assert code == 2 and "schedule.warmup" in err and err.count("error: ") == 1, err
    else:
        assert code == 0, err
        assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


# -- optimizer and schedule ----------------------------------------------------------------------


def test_schedules():
    cos = ScheduleConfig(name="cosine", warmup="10ba", min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, 10, cos) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10, cos) == pytest.approx(1.0)
    assert lr_multiplier(10, 100, 10, cos) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10, cos) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, 10, cos) == pytest.approx(0.1)
    lin = ScheduleConfig(name="linear", min_lr_ratio=0.0)
    assert lr_multiplier(50, 100, 0, lin) == pytest.approx(0.5)
    assert lr_multiplier(70, 100, 0, ScheduleConfig(name="constant")) == 1.0
    assert lr_multiplier(39, 100, 10, ScheduleConfig(name="inverse_sqrt")) == pytest.approx(0.5)


def test_lion_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    m = torch.tensor([0.0, 0.0, 0.0])
    for g in ([0.3, -0.1, 0.0], [-0.2, 0.4, 0.1]):
        g = torch.tensor(g)
        expected = p.detach() * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
        p.grad = g
        opt.step()
        assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], m)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from longboi.config import ModelConfig
    from longboi.model import MPTForCausalLM
    from longboi.train.config import OptimizerConfig

    model = MPTForCausalLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, no_bias=False, vocab_size=512))
    decay, no_decay = param_groups(model, OptimizerConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "wte" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "transformer.wte.weight",
        "transformer.norm_f.weight",
        "transformer.blocks.0.attn.Wqkv.bias",
    }
    decay_all, _ = param_groups(model, OptimizerConfig(decay_norms_and_biases=True, decay_embeddings=True))
    assert len(decay_all["params"]) == len(list(model.parameters()))


# -- the loop ---------------------------------------------------------------------------------------


def test_training_learns_logs_evaluates_and_exports(tmp_path, data):
    cfg = config_from_dict(
        run_config(data, tmp_path / "run", max_duration="12ba", **{"log.tensorboard": True, "log.wandb": True}), "x"
    )
    os.environ["WANDB_SILENT"] = "true"
    result = train(cfg)
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1] - 1.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["lr"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 8, 12] and result.val_loss is not None
    assert [r for r in rows if r["kind"] == "samples"][0]["samples"]["ROMEO:"]
    assert list((tmp_path / "run" / "tensorboard").iterdir()) and list((tmp_path / "run" / "wandb").iterdir())
    assert (result.final / "model.safetensors").is_file()
    from longboi.checkpoint import load_model

    final = load_model(result.final)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in final.state_dict().items() if k in exported)
    assert main(["plot", str(tmp_path / "run")]) == 0 and (tmp_path / "run" / "curves.png").stat().st_size > 10_000


def test_wall_clock_budget_schedules_by_time_and_ends_inside_the_budget(tmp_path, data):
    budget = 20.0
    cfg = run_config(
        data,
        tmp_path / "run",
        max_duration=f"{budget:g}s",
        precision="auto",
        **{"schedule.warmup": "0.1dur", "eval.every": "8s", "checkpoint.every": "7s", "log.every": 5},
    )
    (tmp_path / "run" / "checkpoints" / ".tmp-step-00000003").mkdir(parents=True)  # a killed save's leftovers
    result = train(config_from_dict(cfg, "x"))
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-00000003").exists()  # removed at the start
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    step_s = max(4 * 33 / r["tokens_per_s"] for r in steps)  # the slowest step seen (4 x 33-token batches)
    assert steps[-1]["step"] == result.steps > 20  # the last step is always logged
    assert steps[-1]["elapsed_s"] <= budget  # training stopped in time for the final eval and checkpoint
    assert result.elapsed_s <= budget + step_s + 1.0  # ... which fit too (within a step and a save)
    peak, lrs = 3e-3, [r["lr"] for r in steps]
    assert lrs[0] < 0.5 * peak and max(lrs) > 0.9 * peak  # warmed up over the first 10% of the time
    assert lrs[-1] <= 0.1 * peak * 1.1  # cosine ends at the floor (min_lr_ratio 0.1) as time runs out
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert [r["step"] for r in rows if r["kind"] == "eval"][-1] == result.steps  # final eval inside the budget
    assert (tmp_path / "run" / "checkpoints" / f"step-{result.steps:08d}").is_dir()


def test_explicit_bf16_runs_on_any_cpu_and_auto_takes_the_native_choice(tmp_path, data, capsys):
    """Both branches for real on this machine: `bf16` as asked (slowly, with a warning, where the CPU
    emulates it), and `auto` resolved to what this CPU computes natively, recorded in the run config."""
    from longboi import hardware
    from longboi.hardware import native_bf16, resolve_precision

    auto = resolve_precision("auto", torch.device("cpu"), quiet=True).precision  # the machine's, or --auto-precision
    hardware._ANNOUNCED.clear()  # the choice (and the emulation warning) prints once per process: maybe already
    for precision in ("bf16", "auto"):
        cfg = run_config(data, tmp_path / precision, precision=precision, max_duration="2ba", **{"eval.every": "0ba"})
        assert train(config_from_dict(cfg, "x")).steps == 2
        resolved = yaml.safe_load((tmp_path / precision / "config.yaml").read_text())["precision"]
        assert resolved == ("bf16" if precision == "bf16" else auto)
    err = capsys.readouterr().err
    assert ("slower than fp32 (measured)" in err) == (not native_bf16(torch.device("cpu"))[0])


def test_kill_9_and_autoresume_is_bit_identical(tmp_path, data):
    knobs = {
        "max_duration": "10ba",
        "model": {**SMALL_MODEL, "attn_pdrop": 0.1, "resid_pdrop": 0.1},
        "checkpoint.every": "2ba",
        "eval.every": "5ba",
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight_cfg = write_config(tmp_path / "a", run_config(data, tmp_path / "straight", **knobs))
    crashed_cfg = write_config(tmp_path / "b", run_config(data, tmp_path / "crashed", **knobs))
    assert main(["train", str(straight_cfg)]) == 0
    kill_at_then_resume(crashed_cfg, tmp_path / "crashed", 6)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")
    assert_resumed(tmp_path / "crashed", from_at_least=6)


def kill_at_then_resume(config: Path, run_dir: Path, step: int) -> None:
    """`longboi train` killed with SIGKILL once checkpoint `step` exists, then the same command again."""
    cmd = [sys.executable, "-m", "longboi", "train", str(config)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / f"step-{step:08d}").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)  # no flags: autoresume


def assert_same_run(a_dir: Path, b_dir: Path) -> None:
    """Bit-identical final weights and the same losses at every step."""
    a = load_file(str(a_dir / "final" / "model.safetensors"))
    b = load_file(str(b_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(a_dir) == train_losses(b_dir)


def assert_resumed(run_dir: Path, from_at_least: int) -> None:
    """The rerun loaded a checkpoint (a restart from step 0 with the same seed would match just as well)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    marks = [i for i, r in enumerate(rows) if r["kind"] == "resume"]
    assert len(marks) == 1, "the rerun did not resume"
    step = rows[marks[0]]["step"]
    assert step >= from_at_least and rows[marks[0]]["checkpoint"] == f"step-{step:08d}"
    after = [r["step"] for r in rows[marks[0] :] if r["kind"] == "train"]
    assert after and after[0] == step + 1  # it went on from there, not from step 1
    assert sum(1 for r in rows if r["kind"] == "train" and r["step"] == 1) == 1


def test_nan_is_skipped_and_the_run_finishes(tmp_path, data, monkeypatch):
    real, calls = loop.train_step, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, norm = real(*args, **kwargs)
        return (float("nan"), norm) if calls["n"] == 3 else (loss, norm)

    monkeypatch.setattr(loop, "train_step", poisoned)
    result = train(config_from_dict(run_config(data, tmp_path / "run", max_duration="6ba"), "x"))
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert result.steps == 6 and calls["n"] == 7  # one batch skipped, six applied
    assert len(events) == 1 and "non-finite loss" in events[0]["what"] and events[0]["action"] == "skip"


def test_spike_rollback_restores_the_checkpoint_and_skips_the_data(tmp_path, data, monkeypatch):
    real, calls = loop.train_step, {"n": 0}

    def spiky(*args, **kwargs):
        calls["n"] += 1
        loss, norm = real(*args, **kwargs)
        return (loss * 10, norm) if calls["n"] == 6 else (loss, norm)

    monkeypatch.setattr(loop, "train_step", spiky)
    cfg = run_config(
        data,
        tmp_path / "run",
        max_duration="8ba",
        **{"spike.action": "rollback", "spike.min_history": 3, "spike.threshold": 3.0},
    )
    result = train(config_from_dict(cfg, "x"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    event = next(r for r in rows if r["kind"] == "event")
    rollback = next(r for r in rows if r["kind"] == "rollback")
    assert "loss spike" in event["what"] and event["step"] == 5
    assert rollback["checkpoint"] == "step-00000004" and rollback["skipped_samples"] == 2 * 4
    assert result.steps == 8 and calls["n"] == 8 + 1 + 1  # the spike, plus step 5 redone after the rollback


def test_spike_stop_exits_with_a_report(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: (float("inf"), 1.0))
    cfg = run_config(data, tmp_path / "run", **{"spike.action": "stop"})
    with pytest.raises(TrainingStopped, match="training stopped at step 0: non-finite loss"):
        train(config_from_dict(cfg, "x"))
    assert main(["train", str(write_config(tmp_path, cfg))]) == 2
    assert "training stopped" in capsys.readouterr().err


def test_tokenizer_mismatch_with_the_data_is_refused(tmp_path, data):
    other = tmp_path / "tok.json"
    other.write_text(TOKENIZER.read_text().replace('"<|padding|>"', '"<|pad|>"'))
    cfg = config_from_dict(run_config(data, tmp_path / "run", tokenizer=str(other)), "x")
    with pytest.raises(UserError, match="prepared with a different tokenizer"):
        train(cfg)


AUTO_MICRO = """
import resource, sys, torch
from longboi.config import preset
from longboi.model import MPTForCausalLM
from longboi.train.config import OptimizerConfig
from longboi.train.probe import find_micro_batch
from longboi.train.optim import build_optimizer
from longboi.train.parallelize import Dist
model = MPTForCausalLM(preset("tiny").replace(n_layers=2, vocab_size=512))  # activations, not the LM head, fill memory
before = {k: v.clone() for k, v in model.state_dict().items()}
optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3))
cap = 3 * 2**30  # address space: 4096 x 64 tokens of activations need several times more
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
print(find_micro_batch(model, optimizer, 65, 4096, False, Dist()))
assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the probe changed weights"
assert not optimizer.state and optimizer.param_groups[0]["lr"] == 1e-3, "the probe left optimizer state"
"""


def test_micro_batch_is_found_by_trying_smaller_sizes_on_oom():
    """Probing runs the optimizer step too (its state counts), and leaves weights and optimizer as they were."""
    out = subprocess.run([sys.executable, "-c", AUTO_MICRO], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    micro = int(out.stdout.strip())
    assert 1 <= micro < 4096 and 4096 % micro == 0


def test_activation_checkpointing_gives_the_same_run(tmp_path, data):
    plain = train(config_from_dict(run_config(data, tmp_path / "plain", max_duration="3ba"), "x"))
    ckpt = train(
        config_from_dict(run_config(data, tmp_path / "ckpt", max_duration="3ba", activation_checkpointing=True), "x")
    )
    assert plain.steps == ckpt.steps == 3
    a, b = train_losses(tmp_path / "plain"), train_losses(tmp_path / "ckpt")
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a)
    assert (
        load_file(str(tmp_path / "ckpt" / "final" / "model.safetensors")).keys()
        == load_file(str(tmp_path / "plain" / "final" / "model.safetensors")).keys()
    )  # no wrapper prefixes


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path, data):
    train(config_from_dict(run_config(data, tmp_path / "eager", max_duration="3ba"), "x"))
    train(config_from_dict(run_config(data, tmp_path / "compiled", max_duration="3ba", compile=True), "x"))
    a, b = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert all(abs(a[k] - b[k]) < 1e-3 for k in a)


def test_live_icl_eval_during_training_logs_to_metrics(tmp_path, data):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("""icl_tasks:
- {label: piqa, dataset_uri: piqa_small.jsonl, num_fewshot: [0], icl_task_type: multiple_choice}
- {label: lambada, dataset_uri: lambada_small.jsonl, num_fewshot: [0], icl_task_type: language_modeling}
""")
    knobs = {
        "max_duration": "4ba",
        "eval.icl_tasks": str(tasks),
        "model": {**SMALL_MODEL, "max_seq_len": 256},
        "eval.icl_data_root": str(SHARED / "eval" / "tests_local_data"),
    }
    cfg = run_config(data, tmp_path / "run", **knobs)
    result = train(config_from_dict(cfg, "x"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    icl = [r for r in rows if r["kind"] == "icl"]
    assert [r["step"] for r in icl] == [4] and 0 <= icl[0]["piqa/0-shot"] <= 1 and "lambada/0-shot" in icl[0]
    assert "icl/piqa/0-shot" in result.eval
    budget = run_config(data, tmp_path / "run2", **knobs, **{"eval.icl_time_budget_s": 0.0})
    train(config_from_dict(budget, "x"))
    rows = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    icl = next(r for r in rows if r["kind"] == "icl")
    assert "lambada/0-shot" not in icl and any("time budget" in s for s in icl["skipped"])


def test_finetune_resumes_bit_identically_after_kill_9(tmp_path):
    from conftest import build, small_config

    from longboi.checkpoint import save_checkpoint
    from longboi.tokenizer import Tokenizer

    base = tmp_path / "base"
    save_checkpoint(build(small_config()), base, Tokenizer(TOKENIZER))
    common = finetune_run(base)
    paths = {}
    for name in ("straight", "crashed"):
        (tmp_path / name).mkdir()
        paths[name] = write_config(tmp_path / name, {**common, "run_dir": str(tmp_path / name / "run")})
    assert main(["finetune", str(paths["straight"])]) == 0
    cmd = [sys.executable, "-m", "longboi", "finetune", str(paths["crashed"])]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "crashed" / "run" / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    a = load_file(str(tmp_path / "straight" / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = train_losses(tmp_path / "straight" / "run")
    assert losses == train_losses(tmp_path / "crashed" / "run") and losses[8] < losses[1]
    assert_resumed(tmp_path / "crashed" / "run", from_at_least=4)


def test_loss_and_gradients_are_the_global_token_mean_whatever_the_micro_batch():
    """Finetuning rows hold different numbers of target tokens: micro 1, 2 and 4 over the same global
    batch of 4 give the loss and gradients of one cross-entropy over all its target tokens."""
    from contextlib import nullcontext

    from conftest import build, small_config

    from longboi.train.parallelize import Dist

    cfg = small_config()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 24), generator=g)
    labels = torch.randint(0, 1000, (4, 24), generator=g)
    for row, kept in enumerate([3, 20, 7, 24]):  # very different target counts per row
        labels[row, : 24 - kept] = -100
    seq = torch.zeros_like(ids)
    reference = build(cfg).train()
    logits = reference(ids, sequence_id=seq)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    expected.backward()
    for micro in (1, 2, 4):
        model = build(cfg).train()
        rows = [{"input_ids": ids[i : i + micro], "labels": labels[i : i + micro], "sequence_id": seq[i : i + micro]}
                for i in range(0, 4, micro)]  # fmt: skip
        loss, _ = loop.train_step(model, None, iter(rows), 4 // micro, nullcontext(), None, Dist())
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm(), (micro, name)  # fp32 summation order


def test_resuming_on_changed_data_is_refused_with_how_to_start_fresh(tmp_path, data):
    run = tmp_path / "run"
    base = run_config(data, run, max_duration="4ba", **{"checkpoint.every": "2ba", "eval.every": "0ba"})
    train(config_from_dict(base, "x"))
    saved = json.loads((run / "checkpoints" / "step-00000004" / "train_state.json").read_text())["data"]
    assert saved["consumed"] == 16 and len(saved["fingerprint"]) == 16 and str(data / "train") in saved["sources"]
    changed = [
        {"data.seed": 18},  # another shuffle of the same files
        {
            "data.sources": [
                {"path": str(data / "train"), "proportion": 1.0},
                {"path": str(data / "val"), "proportion": 1.0},
            ]
        },
    ]
    for change in changed:
        cfg = run_config(data, run, max_duration="6ba", **{"checkpoint.every": "2ba", "eval.every": "0ba"}, **change)
        with pytest.raises(UserError, match=r"training data changed since this checkpoint.*start fresh.*new run_dir"):
            train(config_from_dict(cfg, "x"))
    assert train(config_from_dict({**base, "max_duration": "6ba"}, "x")).steps == 6  # the same data resumes


def test_each_mixing_window_is_planned_once_not_per_sample(data, monkeypatch):
    import longboi.data.stream as stream

    ds = stream.StreamingDataset([stream.Source(str(data / "train"), 0.7), stream.Source(str(data / "val"), 0.3)])
    real, shuffles = stream._rng, []

    def counting(*key):
        shuffles.append(key) if key[1] == 2_000_003 else None
        return real(*key)

    monkeypatch.setattr(stream, "_rng", counting)
    located = [ds.locate(g) for g in range(3000)]
    assert len(shuffles) == 1 and len({s for s, _ in located}) == 2  # one window, both sources drawn


def test_keep_last_k_checkpoints(tmp_path, data):
    cfg = run_config(data, tmp_path / "run", max_duration="6ba", **{"checkpoint.every": "1ba", "checkpoint.keep": 2})
    train(config_from_dict({**cfg, "eval": {"every": "0ba"}}, "x"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005", "step-00000006"]


def test_one_process_checkpoints_raise_no_distributed_warning_and_other_warnings_still_show(tmp_path, data):
    """`make demo`'s progress bar showed torch.distributed.checkpoint's "assuming the intent is to save in a
    single process" at every save; in one process that is the intent. Anything else still warns."""
    import warnings

    from longboi.train.checkpoint import _one_process_io

    cfg = run_config(data, tmp_path / "run", max_duration="4ba", **{"checkpoint.every": "1ba"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train(config_from_dict({**cfg, "eval": {"every": "0ba"}}, "x"))  # saves 4 checkpoints
        train(config_from_dict({**cfg, "max_duration": "5ba", "eval": {"every": "0ba"}}, "x"))  # resumes (a load)
        with _one_process_io():
            warnings.warn("something else", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "torch.distributed is disabled" in m], messages
    assert "something else" in messages


def test_a_30min_checkpoint_interval_follows_the_clock(tmp_path, data):
    now = {"t": 1000.0}
    cfg = config_from_dict(run_config(data, tmp_path / "r"), "x")
    clock = loop.RunClock(cfg, tokens_per_step=128, steps_per_epoch=100)
    clock.now = lambda: now["t"]
    every, d = parse_duration("30min"), loop.Dist()
    assert every.is_time and every.seconds == 1800
    now["t"] = 1000.0 + 1799.9
    assert not clock.due(every, step=7, since=1000.0, d=d)
    now["t"] = 1000.0 + 1800.0
    assert clock.due(every, step=8, since=1000.0, d=d)


MEASURE_LOSS_MEMORY = """
import resource, sys, torch
from longboi.config import ModelConfig
from longboi.model import MPTForCausalLM
torch.manual_seed(0)
model = MPTForCausalLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=512, vocab_size=50432))
ids = torch.randint(0, 50000, (8, 513))
model(ids[:1, :-1], labels=ids[:1, 1:]).backward()  # warm up allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(ids[:, :-1], labels=ids[:, 1:]).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_training_never_materializes_the_logits():
    """8 x 512 tokens x 50,432 vocab: the fp32 logits alone would be 826 MB; peak memory grows far less."""
    out = subprocess.run([sys.executable, "-c", MEASURE_LOSS_MEMORY], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip())
    logits_bytes = 8 * 512 * 50432 * 4
    assert grew < logits_bytes / 3, f"peak memory grew {grew / 2**20:.0f} MiB (logits: {logits_bytes / 2**20:.0f} MiB)"


def test_long_context_finetune_beats_the_base_past_its_length(tmp_path):
    """bench/long_context.py scaled down: a base trained at 32 tokens, finetuned at 128 (4x) on the same
    text, scores held-out text better than the base at 4x and 16x its trained length."""
    from longboi.cli import perplexity
    from longboi.data.prepare import prepare
    from longboi.tokenizer import train_bpe

    text = str(SHARED / "text" / "tinyshakespeare.txt")
    tok = train_bpe([text], 512, tmp_path / "tok.json", holdout_fraction=0.1)
    for seq in (33, 129):
        prepare([text], str(tmp_path / f"d{seq}"), str(tok.path), seq_len=seq, val_fraction=0.1)

    def run(name: str, seq_len: int, steps: int, batch: int, lr: float, **more) -> Path:
        cfg = {
            "run_dir": str(tmp_path / name),
            "model": {"preset": "tiny", "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 512,
                      "max_seq_len": seq_len},
            "tokenizer": str(tok.path),
            "data": {"sources": [str(tmp_path / f"d{seq_len + 1}" / "train")]},
            "max_duration": f"{steps}ba",
            "global_batch_size": batch,
            "precision": "fp32",
            "optimizer": {"lr": lr},
            "log": {"progress": False},
            "eval": {"every": "0ba"},
            **more,
        }  # fmt: skip
        return train(config_from_dict(cfg, name)).final

    base = run("base", 32, steps=60, batch=8, lr=3e-3)
    tuned = run("long", 128, steps=30, batch=2, lr=1e-3, init_from=str(base))
    held_out = str(tmp_path / "d33" / "val")
    for seq_len in (128, 512):
        before = perplexity(str(base), held_out, seq_len=seq_len, dtype="fp32")["perplexity"]
        after = perplexity(str(tuned), held_out, seq_len=seq_len, dtype="fp32")["perplexity"]
        assert after < before, (seq_len, before, after)


def test_validation_scores_the_same_samples_whatever_the_micro_batch(tmp_path, data):
    """The sweep that chose the demo recipe compared runs at different batch sizes: their validation
    figures must come from the same held-out samples."""
    results = []
    for micro in (1, 4):
        cfg = config_from_dict(run_config(data, tmp_path / f"m{micro}", micro_batch_size=micro), "x")
        tok = loop.Tokenizer(cfg.tokenizer)
        model = loop._start_model(cfg, tok, loop.Dist(), bf16=False)[0].eval()
        with torch.no_grad():
            results.append(validation_loss(model, tok, cfg, loop.Dist(), torch.autocast("cpu", enabled=False)))
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_init_from_weights_that_do_not_fit_the_run_name_the_key_and_shapes(tmp_path, data, capsys):
    from conftest import build

    from longboi.checkpoint import save_checkpoint

    cfg = run_config(data, tmp_path / "run", init_from=str(tmp_path / "base"))
    wider = config_from_dict({**cfg, "model": {**SMALL_MODEL, "d_model": 128}}, "x").model
    save_checkpoint(build(wider), tmp_path / "base", None)
    assert main(["train", str(write_config(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    assert f"init_from {tmp_path / 'base'}: transformer.wte.weight has shape [50432, 128]" in err, err
    assert "needs [50432, 64]" in err and "Traceback" not in err
    untied = config_from_dict({**cfg, "model": {**SMALL_MODEL, "tie_word_embeddings": False}}, "x").model
    save_checkpoint(build(untied), tmp_path / "base", None)  # a trained head the tied run has no place for
    assert main(["train", str(write_config(tmp_path, cfg))]) == 2
    assert "unexpected ['lm_head.weight']" in capsys.readouterr().err
    (tmp_path / "base" / "model.safetensors").unlink()
    assert main(["train", str(write_config(tmp_path, cfg))]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["signal", "file"])
def test_a_stop_request_checkpoints_and_stops_then_the_same_command_resumes(tmp_path, data, how):
    """What a scheduler's warning before a time limit asks of a run (SIGUSR1 to a training process, or
    the file LONGBOI_STOP_FILE names appearing): finish the step, checkpoint, stop. The request is
    consumed, so the same command then resumes instead of stopping again."""
    cfg = write_config(tmp_path, run_config(data, tmp_path / "run", max_duration="400ba", **{"eval.every": "0ba"}))
    stop_file = tmp_path / "stop"
    env = {**os.environ, "LONGBOI_STOP_FILE": str(stop_file)}
    cmd = [sys.executable, "-m", "longboi", "train", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the request"
        time.sleep(0.05)
    if how == "signal":
        proc.send_signal(signal.SIGUSR1)
    else:
        stop_file.touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = re.search(r"stopped on request at step (\d+), checkpoint saved", err)
    assert stopped, err[-3000:]
    step = int(stopped.group(1))
    assert 4 <= step < 400 and (tmp_path / "run" / "checkpoints" / f"step-{step:08d}").is_dir()
    assert not (tmp_path / "run" / "final").exists()
    assert not stop_file.exists() and (tmp_path / "stop.stopped").read_text() == f"{step}\n"
    rerun = subprocess.run([*cmd, "--max_duration", f"{step + 2}ba"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0 and (tmp_path / "run" / "final").is_dir(), rerun.stderr[-3000:]
    assert_resumed(tmp_path / "run", from_at_least=step)


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_the_same_command_resumes_once_freed(tmp_path, data):
    """A run on a 60 MB tmpfs: its step-2 checkpoint (~40 MB: weights and two Adam moments) fits, step 4's
    does not. One line says where, how much is free and which checkpoint a resume takes; the partial save is
    gone; once the tmpfs grows, the same command resumes from step 2 and finishes."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(small)]).returncode == 0
    )
    if not mounted:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        cfg = write_config(tmp_path, run_config(data, small / "run", max_duration="6ba", **{"eval.every": "0ba"}))
        cmd = [sys.executable, "-m", "longboi", "train", str(cfg)]
        full = subprocess.run(cmd, capture_output=True, text=True)
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
        last = full.stderr.strip().splitlines()[-1]
        checkpoints = small / "run" / "checkpoints"
        assert last.startswith(
            f"error: checkpoint of step 4 could not be written to {checkpoints}: the disk is full ("
        ), last
        assert f"it resumes from {checkpoints / 'step-00000002'})" in last and "MiB free" in last
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002"]  # the partial save removed
        subprocess.run(["mount", "-o", "remount,size=400m", str(small)], check=True)
        again = subprocess.run(cmd, capture_output=True, text=True)
        assert again.returncode == 0 and (small / "run" / "final").is_dir(), again.stderr[-3000:]
        assert_resumed(small / "run", from_at_least=2)
    finally:
        subprocess.run(["umount", "-l", str(small)])
