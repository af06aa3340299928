"""Beyond one machine's launcher, for real: two torchrun agents rendezvousing over loopback (c10d), an
elastic restart after a SIGKILLed worker, and launch/slurm/train.sbatch on a real one-node Slurm."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_distributed import process_tree, write
from test_train import run_config, train_losses

from longboi.cli import main

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
KNOBS = {"global_batch_size": 8, "micro_batch_size": 2, "checkpoint.every": "2ba", "eval.every": "0ba"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agents(config: Path, nodes: int = 2, max_restarts: int = 0) -> list[subprocess.Popen]:
    """`nodes` torchrun agents, one worker each, meeting at a c10d rendezvous on loopback: a multi-node
    launch, each agent standing for one machine."""
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc-per-node=1"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=test", f"--max-restarts={max_restarts}"]
    cmd += ["-m", "longboi", "train", str(config)]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see init_distributed: a fresh store per round
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True, "env": env}
    return [subprocess.Popen(cmd, **popen) for _ in range(nodes)]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k].dtype == b[k].dtype and a[k].equal(b[k]))]
    assert not different, different[:5]


def kill_tree(pid: int) -> None:
    try:
        pids = process_tree(pid)
    except FileNotFoundError:  # already gone
        return
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, f"no {path} while running"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, data) -> Path:
    """An uninterrupted FSDP run over two agents (the reference for the elastic test)."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    cfg = run_config(data, tmp / "run", parallel="fsdp", max_duration="8ba", **KNOBS)
    finish(agents(write(tmp, "two", cfg)))
    return tmp / "run"


def test_two_agents_on_loopback_train_as_one_process_at_the_same_global_batch(tmp_path, data, two_nodes):
    cfg = run_config(data, tmp_path / "one", max_duration="8ba", **KNOBS)
    assert main(["train", str(write(tmp_path, "one", cfg))]) == 0
    one, two = train_losses(tmp_path / "one"), train_losses(two_nodes)
    assert one.keys() == two.keys() == set(range(1, 9))
    assert all(abs(one[k] - two[k]) < 1e-4 * max(1.0, abs(one[k])) for k in one), (one, two)


def test_a_killed_worker_restarts_from_the_newest_checkpoint_and_ends_bit_identical(tmp_path, data, two_nodes):
    """Elastic: `--max-restarts 2`; one agent's worker is SIGKILLed mid-run. Both agents restart their
    workers, which resume from the newest checkpoint with no human, and the final weights equal the
    uninterrupted run's bit for bit."""
    cfg = run_config(data, tmp_path / "run", parallel="fsdp", max_duration="8ba", **KNOBS)
    procs = agents(write(tmp_path, "elastic", cfg), max_restarts=2)
    try:
        wait_for(tmp_path / "run" / "checkpoints" / "step-00000004", procs)
        worker = process_tree(procs[1].pid)[1:]  # the agent's worker (and anything it started)
        assert worker, "the agent has no worker"
        os.kill(worker[0], signal.SIGKILL)
        finish(procs)
    finally:  # a failed wait must not leave agents running
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"kind": "resume"' in rows
    assert_bit_identical(final_weights(tmp_path / "run"), final_weights(two_nodes))


# -- Slurm ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurm_cluster import Cluster, why_not

    reason = why_not()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def wait_state(slurm, job: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while (state := slurm.state(job)) not in states:
        assert time.time() < deadline, f"job {job} is {state}, waited for {states}"
        time.sleep(0.2)
    return state


def newest_step(run_dir: Path) -> int:
    steps = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def wait_step(slurm, job: str, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while newest_step(run_dir) < step:
        assert slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), slurm.state(job)
        assert time.time() < deadline, f"no checkpoint {step} in time"
        time.sleep(0.05)


def test_sbatch_trains_and_survives_a_time_limit_warning_and_a_requeue_bit_identical(tmp_path, data, slurm):
    """`sbatch launch/slurm/train.sbatch CONFIG` on a real one-node Slurm. Mid-run, the warning Slurm
    sends before a time limit (USR1 to the batch script): the run checkpoints, stops, and the job
    requeues itself. Later, `scontrol requeue` (what a node failure does) kills the job mid-run. Each
    time it comes back, resumes from the newest checkpoint by itself, and the final weights equal an
    uninterrupted run's bit for bit."""
    knobs = {**KNOBS, "global_batch_size": 4, "checkpoint.every": "4ba", "eval.every": "1ba"}
    knobs |= {"eval.prompts": ["ROMEO:"], "eval.max_new_tokens": 8}  # slower steps: time to act mid-run
    steps = 32
    cfg = write(tmp_path, "run", run_config(data, tmp_path / "run", max_duration=f"{steps}ba", **knobs))
    reference = write(tmp_path, "ref", run_config(data, tmp_path / "ref", max_duration=f"{steps}ba", **knobs))
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["LONGBOI_RDZV_PORT"] = str(free_port())
    # One thread in both runs: on a 2-core AVX512/AMX Xeon, the same fp32 step in two processes with 2 threads
    # gave 3 different results in 6 runs (1 thread: always the same), so only one thread makes the comparison
    # about the resume rather than about how the CPU kernels split their work that time.
    env["OMP_NUM_THREADS"] = "1"
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/job.out", str(SBATCH), str(cfg)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    run = tmp_path / "run"

    wait_step(slurm, job, run, 8)
    slurm.run("scancel", "--batch", "--signal=USR1", job, check=True)  # the time-limit warning
    wait_state(slurm, job, {"PENDING"})  # requeued by the script; starts again once its old credential expires
    first_stop = newest_step(run)
    assert 8 <= first_stop < steps

    wait_step(slurm, job, run, first_stop + 8)
    slurm.run("scontrol", "requeue", job, check=True)  # killed mid-run, as when a node fails
    wait_state(slurm, job, {"PENDING"})
    assert wait_state(slurm, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED", (
        tmp_path / "job.out"
    ).read_text()[-3000:]

    out = (tmp_path / "job.out").read_text()
    assert "USR1 received" in out and "requeueing job" in out and "training finished" in out, out[-3000:]
    rows = (run / "metrics.jsonl").read_text()
    assert rows.count('"kind": "resume"') == 2 and '"kind": "stop"' in rows
    assert sorted(train_losses(run)) == list(range(1, steps + 1))
    ref = subprocess.run(  # the same launcher, uninterrupted, one thread too
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "longboi", "train",
         str(reference)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert_bit_identical(final_weights(run), final_weights(tmp_path / "ref"))


def test_sbatch_array_prepares_in_parts_and_a_dependent_job_merges_them_byte_identical(tmp_path, slurm):
    """`sbatch --array=0-2 launch/slurm/prepare.sbatch ...` then a merge job that waits for the whole
    array (afterok): the dataset equals one process's byte for byte."""
    from test_prepare_parts import OPTIONS, files_of

    from longboi.data.prepare import prepare

    inputs = tmp_path / "in"
    inputs.mkdir()
    text = (ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt").read_text()
    (inputs / "plays.jsonl").write_text("".join(f'{{"text": {json.dumps(s)}}}\n' for s in text.split("\n\n")))
    (inputs / "part00").write_text(text[:50_000])
    tokenizer = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    options = ["--tokenizer", str(tokenizer), "--seq-len", "64", "--val-fraction", "0.05", "--shard-mb", "0.02"]
    options += ["--group-mb", "0.1"]
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    sbatch = ["sbatch", "--parsable", f"--chdir={tmp_path}"]
    array = subprocess.run(
        [*sbatch, "--array=0-2", str(ROOT / "launch" / "slurm" / "prepare.sbatch"), str(inputs),
         "--out", str(tmp_path / "out"), *options],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert array.returncode == 0, array.stderr
    job = array.stdout.strip().split(";")[0]
    merge = subprocess.run(
        [*sbatch, f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes", f"--output={tmp_path}/merge.out",
         "--wrap", f"longboi merge-index {tmp_path / 'out'}"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert merge.returncode == 0, merge.stderr
    merged = merge.stdout.strip().split(";")[0]
    assert wait_state(slurm, merged, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", [
        p.read_text()[-2000:] for p in tmp_path.glob("*.out")
    ]
    logs = sorted(tmp_path.glob("longboi-prepare-*.out"))
    assert len(logs) == 3 and all(f"part {i} of 3" in p.read_text() for i, p in enumerate(logs))
    records = sorted(p.name for p in (tmp_path / "out" / "parts").iterdir())
    assert records == [f"part-{i:05d}-of-00003.json" for i in range(3)]
    prepare([str(inputs)], str(tmp_path / "one"), str(tokenizer), **(OPTIONS | {"on_bad_input": "error"}))
    assert files_of(tmp_path / "out") == files_of(tmp_path / "one")
    assert "merged: the parts read 2 files" in (tmp_path / "merge.out").read_text()


def test_a_job_stopped_before_any_new_step_in_each_allocation_fails_instead_of_requeueing_forever(
    tmp_path, data, slurm
):
    """Set-up that outlasts the time limit minus the warning: the warning (USR1) comes in every allocation
    before the first step. The first stop is a planned requeue; a stop at the same step again is a failure, so
    with LONGBOI_MAX_REQUEUES=1 the job ends FAILED after three allocations instead of cycling forever."""
    cfg = write(tmp_path, "run", run_config(data, tmp_path / "run", max_duration="400ba", **KNOBS))
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LONGBOI_MAX_REQUEUES": "1"}
    env["LONGBOI_RDZV_PORT"] = str(free_port())
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/job.out", str(SBATCH), str(cfg)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job, warned, deadline = submit.stdout.strip().split(";")[0], 0, time.time() + 600
    log = tmp_path / "job.out"
    while (state := slurm.state(job)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        out = log.read_text() if log.exists() else ""
        assert time.time() < deadline and warned <= 4, out[-3000:]
        started = out.count(f"longboi: job {job} (restart")
        if started > warned and "USR1 received" not in out.split(f"longboi: job {job} (restart")[-1]:
            time.sleep(0.5)  # past the script's trap; the run's set-up takes seconds more
            slurm.run("scancel", "--batch", "--signal=USR1", job, check=True)  # this allocation's warning
            warned = started
        time.sleep(0.1)
    out = log.read_text()
    assert state == "FAILED", out[-3000:]
    assert out.count("requeueing job") == 2 and "stopped at step 0 again, no step made" in out, out[-3000:]
    assert "giving up" in out and newest_step(tmp_path / "run") == 0
