"""Distributed training on CPU: gloo backend, 2 processes under torchrun (the twin of NCCL on GPUs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
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


START = """
import sys, torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from longboi.tokenizer import Tokenizer
from longboi.train.config import load_train_config
from longboi.train.loop import _start_model
from longboi.train.parallelize import init_distributed

cfg = load_train_config(sys.argv[1])
d = init_distributed("cpu")
model, wrapped = _start_model(cfg, Tokenizer(cfg.tokenizer), d, bf16=False)
if d.enabled:
    assert all(hasattr(p, "to_local") for p in model.parameters())  # sharded: each rank holds a slice
full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if d.rank == 0:
    torch.save(full, sys.argv[2])
# a rank that exits with its process group alive can abort in gloo's thread at exit ("terminate called
# without an active exception", seen once in a full run): every rank leaves together, cleanly
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def start_weights(tmp_path, cfg: dict, nproc: int) -> dict:
    """The weights a run starts with, gathered from `nproc` FSDP ranks (or one process)."""
    script, out = tmp_path / "start.py", tmp_path / f"start-{nproc}.pt"
    script.write_text(START)
    path = write(tmp_path, f"start-{nproc}", cfg)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, str(script), str(path), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_a_sharded_start_has_one_processs_fresh_weights(tmp_path, data):
    """Built on the meta device, sharded, then each rank draws its slice: the gathered weights equal a
    one-process start with the same seed, bit for bit, and a new seed changes them."""
    cfg = run_config(data, tmp_path / "run", parallel="fsdp")
    one, two = start_weights(tmp_path, cfg, 1), start_weights(tmp_path, cfg, 2)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    other = start_weights(tmp_path, {**cfg, "seed": cfg.get("seed", 0) + 1}, 1)
    assert not torch.equal(other["transformer.wte.weight"], one["transformer.wte.weight"])
    assert one["transformer.blocks.0.attn.Wqkv.weight"].std() > 0  # drawn, not left as to_empty's memory


def test_a_sharded_init_from_reads_each_ranks_slices_into_the_checkpoints_weights(tmp_path, data):
    from conftest import build

    from longboi.checkpoint import save_checkpoint
    from longboi.train.config import config_from_dict

    base = str(tmp_path / "base")  # with activation checkpointing: its wrapper renames every block parameter
    cfg = run_config(data, tmp_path / "run", parallel="fsdp", init_from=base, activation_checkpointing=True)
    source = build(config_from_dict(cfg, "run.yaml").model, seed=5)
    save_checkpoint(source, tmp_path / "base", None)
    two = start_weights(tmp_path, cfg, 2)
    expected = source.state_dict()
    assert two.keys() == expected.keys() and all(torch.equal(two[k], expected[k]) for k in two)


STEP_MEMORY = """
import contextlib, json, resource, sys, torch
from longboi.tokenizer import Tokenizer
from longboi.train.config import load_train_config
from longboi.train.loop import _start_model, train_step
from longboi.train.optim import build_optimizer
from longboi.train.parallelize import init_distributed

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024

cfg = load_train_config(sys.argv[1])
d = init_distributed("cpu")
tok = Tokenizer(cfg.tokenizer)
base = rss()
model, wrapped = _start_model(cfg, tok, d, bf16=False)
optimizer = build_optimizer(wrapped, cfg.optimizer)
micro, accum = cfg.micro_batch_size, cfg.global_batch_size // cfg.micro_batch_size // d.world_size
ids = torch.randint(0, tok.vocab_size, (2 * accum * micro, cfg.model.max_seq_len + 1))
batches = iter(ids.split(micro))
for _ in range(2):
    train_step(wrapped, optimizer, batches, accum, contextlib.nullcontext(), None, d)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with open(f"{sys.argv[2]}.{d.rank}", "w") as f:
    json.dump({"accum": accum, "added": peak - base}, f)
# a rank that exits with its process group alive can abort in gloo's thread at exit ("terminate called
# without an active exception", seen once in a full run): every rank leaves together, cleanly
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def test_the_planners_memory_per_device_matches_a_measured_fsdp_step_with_accumulation(tmp_path, data):
    """`longboi plan`'s figure for one device against the peak RSS a 2-rank FSDP step adds on CPU, with 4
    micro-batches accumulated: gradients stay sharded, so the figure holds (measured within 4%; the
    bound is 15%). Live bytes are measured, as a GPU's peak allocated memory would be: with glibc's mmap
    threshold pinned at 128 KiB every tensor is its own mapping, returned when freed, so RSS follows
    what is live (left to itself, glibc keeps freed blocks and RSS also counts that slack)."""
    from longboi.plan import train_memory
    from longboi.train.config import config_from_dict

    model = {"preset": "tiny", "d_model": 512, "n_heads": 8, "n_layers": 8, "max_seq_len": 256}
    cfg = run_config(data, tmp_path / "run", model=model, parallel="fsdp", global_batch_size=16, micro_batch_size=2)
    script, out = tmp_path / "step.py", tmp_path / "measured"
    script.write_text(STEP_MEMORY)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    args = [str(script), str(write(tmp_path, "mem", cfg)), str(out)]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert all(m["accum"] == 4 for m in measured)
    planned = train_memory(config_from_dict(cfg, "mem.yaml").model, 256, 2, devices=2, mixed=False).total
    for m in measured:
        assert abs(m["added"] / planned - 1) < 0.15, (m["added"] / 2**20, planned / 2**20)


ICL_CLOCKS = """
import itertools, json, sys, torch
from longboi.config import ModelConfig
from longboi.eval.harness import evaluate, load_tasks
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer
from longboi.train.parallelize import anyone, init_distributed, materialize, parallelize

tasks, data_root, tokenizer, out = sys.argv[1:5]
d = init_distributed("cpu")
with torch.device("meta"):
    model = MPTForCausalLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=512, vocab_size=50432))
parallelize(model, d, "fsdp", False, False, False)
materialize(model, d.device, 0)
ticks = itertools.count()
rate = 100.0 if d.rank == 0 else 0.001  # seconds per reading: rank 0's clock races, rank 1's crawls
results, skipped = evaluate(
    model, Tokenizer(tokenizer), load_tasks(tasks), data_root, limit=4, time_budget_s=150,
    anyone=lambda flag: anyone(flag, d), clock=lambda: next(ticks) * rate,
)
with open(f"{out}.{d.rank}", "w") as f:
    json.dump({"ran": [r.label for r in results], "skipped": skipped}, f)
# a rank that exits with its process group alive can abort in gloo's thread at exit ("terminate called
# without an active exception", seen once in a full run): every rank leaves together, cleanly
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def test_icl_tasks_run_on_every_rank_together_when_their_clocks_disagree(tmp_path):
    """In-training ICL under FSDP: rank 0's clock says the time budget is spent after the first task,
    rank 1's says it is not. Both must skip the same tasks (a rank running alone would wait in its
    all-gather forever); the run ends, with the same tasks on both ranks."""
    from conftest import SHARED, TOKENIZER

    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("""icl_tasks:
- {label: piqa, dataset_uri: piqa_small.jsonl, num_fewshot: [0], icl_task_type: multiple_choice,
   continuation_delimiter: "\\nAnswer: "}
- {label: lambada, dataset_uri: lambada_small.jsonl, num_fewshot: [0], icl_task_type: language_modeling}
""")
    script, out = tmp_path / "icl.py", tmp_path / "ran"
    script.write_text(ICL_CLOCKS)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    args = [str(tasks), str(SHARED / "eval" / "tests_local_data"), str(TOKENIZER), str(out)]
    proc = subprocess.run([*launcher, str(script), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in range(2))
    assert rank0["ran"] == rank1["ran"] == ["piqa"]
    assert rank0["skipped"] == rank1["skipped"] == ["lambada (time budget 150s spent)"]


# -- evaluation split across ranks -------------------------------------------------------------------

EVAL_TASKS = """icl_tasks:
- {label: piqa, dataset_uri: commonsense_reasoning/piqa.jsonl, num_fewshot: [0, 1], icl_task_type: multiple_choice,
   continuation_delimiter: "\\nAnswer: "}
- {label: lambada, dataset_uri: language_understanding/lambada_openai.jsonl, num_fewshot: [0],
   icl_task_type: language_modeling}
- {label: winograd, dataset_uri: language_understanding/winograd_wsc.jsonl, num_fewshot: [0], icl_task_type: schema}
- {label: gen, dataset_uri: gen.jsonl, num_fewshot: [0], icl_task_type: generation_task_with_answers,
   continuation_delimiter: "", do_normalization: false}
"""


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """A trained checkpoint (real margins: ranks batch differently, and near-ties would flip), the tasks
    (every type) and a generation task whose answers are what this model says for a third of its rows."""
    from conftest import SHARED, TOKENIZER, trained

    from longboi.checkpoint import save_checkpoint
    from longboi.eval.scoring import greedy_generate
    from longboi.eval.tasks import TaskBuilder, TaskConfig
    from longboi.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("eval")
    tok = Tokenizer(TOKENIZER)
    model = trained(tok, steps=40)
    save_checkpoint(model, d / "ck", tok)
    root = d / "data"
    for sub in ("commonsense_reasoning", "language_understanding"):
        (root / sub).mkdir(parents=True)
        for f in (SHARED / "eval" / "local_data" / sub).glob("*.jsonl"):
            (root / sub / f.name).symlink_to(f)
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()[200_000:]
    rows = [{"context": text[i * 997 : i * 997 + 90], "answer": "qqqq zzzz"} for i in range(24)]
    cfg = TaskConfig("gen", "gen.jsonl", "generation_task_with_answers", continuation_delimiter="")
    builder = TaskBuilder(cfg, tok, rows, 0)
    said = greedy_generate(model, tok, [e.prompt for e in builder.examples()], [], builder.max_answer_tokens(), 128)
    right = [i for i in range(0, 24, 3) if said[i].strip()]  # this model's words as the answer of some rows
    for i in right:
        rows[i]["answer"] = said[i].strip()
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "tasks.yaml").write_text(EVAL_TASKS)
    return d, len(right) / len(rows)


def test_torchrun_eval_splits_every_task_type_and_reports_one_process_numbers(eval_setup):
    d, gen_accuracy = eval_setup
    common = ["eval", str(d / "ck"), "--tasks", str(d / "tasks.yaml"), "--data-root", str(d / "data")]
    common += ["--dtype", "fp32", "--limit", "30"]
    assert main([*common, "--out", str(d / "one")]) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "longboi"]
    proc = subprocess.run([*launcher, *common, "--out", str(d / "two")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((d / o / "results.json").read_text()) for o in ("one", "two"))
    assert one["world_size"] == 1 and two["world_size"] == 2 and one["skipped"] == two["skipped"] == []
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(t) for t in two["tasks"]] == [strip(t) for t in one["tasks"]]
    kinds = {t["task_type"] for t in one["tasks"]}
    assert kinds == {"multiple_choice", "language_modeling", "schema", "generation_task_with_answers"}
    gen = next(t for t in one["tasks"] if t["label"] == "gen")
    assert 0 < gen["accuracy"] == gen_accuracy < 0.5  # the rows answered with the model's own words
    assert "Evaluated by 2 processes" in (d / "two" / "results.md").read_text()


def test_torchrun_perplexity_equals_one_process(eval_setup, capsys):
    from conftest import SHARED

    d, _ = eval_setup
    args = ["perplexity", str(d / "ck"), str(SHARED / "text" / "tinyshakespeare.txt"), "--seq-len", "200"]
    args += ["--max-tokens", "6000", "--batch-size", "2", "--dtype", "fp32"]
    assert main(args) == 0
    one = capsys.readouterr().out.strip().splitlines()[-1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "longboi"]
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [x for x in proc.stdout.splitlines() if "perplexity" in x]
    assert len(two) == 1 and "2 processes" in two[0]  # rank 0 reports
    numbers = lambda line: line.split(" (")[0]  # noqa: E731  # loss, perplexity, bits/byte, tokens
    assert numbers(two[0]) == numbers(one)


ICL_SPLIT = """
import json, sys, torch
from longboi.checkpoint import load_model
from longboi.eval.scoring import Share
from longboi.eval.harness import evaluate, load_tasks
from longboi.tokenizer import Tokenizer
from longboi.train.parallelize import all_gather_objects, anyone, full_weights, init_distributed, parallelize

ck, tasks, data_root, out = sys.argv[1:5]
d = init_distributed("cpu")
model = load_model(ck, dtype=torch.float32)
parallelize(model, d, "fsdp", False, False, False)
tok, calls = Tokenizer(f"{ck}/tokenizer.json"), [0]
model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
run = lambda **kw: evaluate(model, tok, load_tasks(tasks), data_root, limit=30, anyone=lambda f: anyone(f, d), **kw)
together, _ = run()  # every rank runs every example, in step (each forward all-gathers)
in_step, calls[0] = calls[0], 0
with full_weights(model):
    split, _ = run(share=Share(d.rank, d.world_size, lambda v: all_gather_objects(v, d)))
loss = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[2, 3, 4]]))  # training goes on sharded
loss.backward()
strip = lambda rs: [{k: v for k, v in r.__dict__.items() if k != "seconds"} for r in rs]
with open(f"{out}.{d.rank}", "w") as f:
    json.dump({"together": strip(together), "split": strip(split), "calls": [in_step, calls[0]]}, f)
# a rank that exits with its process group alive can abort in gloo's thread at exit ("terminate called
# without an active exception", seen once in a full run): every rank leaves together, cleanly
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def test_live_icl_under_fsdp_splits_the_work_and_keeps_the_scores(eval_setup, tmp_path):
    """Live evaluation in an FSDP run: with the weights gathered for the evaluation, each rank scores
    its share (fewer forwards than running in step) and the scores are those of running in step."""
    d, _ = eval_setup
    script, out = tmp_path / "split.py", tmp_path / "icl"
    script.write_text(ICL_SPLIT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    args = [str(d / "ck"), str(d / "tasks.yaml"), str(d / "data"), str(out)]
    proc = subprocess.run([*launcher, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    for r in ranks:
        assert r["split"] == r["together"] == ranks[0]["together"]
        in_step, split = r["calls"]
        assert split < 0.7 * in_step, r["calls"]  # about half the forwards each (the split is by tokens)
