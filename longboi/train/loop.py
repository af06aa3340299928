"""The training loop: one visible function, `train(cfg)`, from config to final checkpoint.

Per optimizer step: set the lr from the schedule; run `accum` micro-batches forward/backward (loss
averaged over the global batch); clip and measure the grad norm; check for NaN/inf/spikes and
skip, roll back or stop; step; then log, evaluate and checkpoint at their intervals. Everything a
resumed run needs (data position, counters, detector window, RNG) is in the checkpoint, so a run
killed at any point and restarted continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from longboi.checkpoint import remove_stale
from longboi.config import to_mpt_dict
from longboi.data.finetune import IGNORE
from longboi.data.stream import StreamingDataset, StreamLoader
from longboi.errors import UserError, check_output_location
from longboi.flops import model_stats
from longboi.hardware import MFU, resolve_precision
from longboi.lora import add_lora, is_lora
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer
from longboi.train import checkpoint as ckpt
from longboi.train.config import Duration, TrainConfig, parse_duration
from longboi.train.monitor import Metrics
from longboi.train.optim import build_optimizer, lr_multiplier, set_lr
from longboi.train.parallelize import (
    Dist,
    all_reduce_mean,
    anyone,
    barrier,
    from_rank0,
    init_distributed,
    materialize,
    parallelize,
)
from longboi.train.probe import find_micro_batch
from longboi.train.validation import evaluate, validation_set


class TrainingStopped(UserError):
    """The spike defence (action: stop, or too many events) ended the run."""


@dataclass
class Progress:
    """Counters saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    consumed: int = 0  # global samples handed out (the data position)
    losses: list[float] = field(default_factory=list)  # the spike detector's window
    events: int = 0
    elapsed: float = 0.0  # seconds spent in the loop (a wall-clock budget continues from here on resume)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    final: Path | None
    steps: int
    val_loss: float | None
    train_loss: float | None
    eval: dict = field(default_factory=dict)  # the last evaluation's metrics
    elapsed_s: float = 0.0  # wall clock of the loop, final evaluation and checkpoint included


class RunClock:
    """How far the run is, by optimizer steps or by wall-clock time against a budget.

    A step-based run's schedule depends only on the step (bit-exact on resume). A wall-clock run
    (max_duration 6min) trains until the time left would not fit one more step plus `reserve_s`,
    the measured (or, before measuring, estimated) cost of the final evaluation and checkpoint; its
    warmup and decay follow elapsed time over the training window, so the lr reaches its floor as
    the time runs out.
    """

    RESOLUTION = 10_000  # a wall-clock run's schedule is the step schedule over this many virtual steps

    def __init__(self, cfg: TrainConfig, tokens_per_step: int, steps_per_epoch: float, elapsed: float = 0.0):
        length = parse_duration(cfg.max_duration)
        self.budget_s = length.seconds if length.is_time else None
        self.total = None if length.is_time else length.steps(tokens_per_step, steps_per_epoch)
        warmup = parse_duration(cfg.schedule.warmup)
        if warmup.value == 0:  # no warmup, whatever its unit (the default `0ba` in a wall-clock run too)
            self.warmup: float = 0.0
        elif self.budget_s is None:
            self.warmup = warmup.steps(tokens_per_step, steps_per_epoch, self.total)
        else:  # seconds
            self.warmup = warmup.value * self.budget_s if warmup.unit == "dur" else warmup.seconds
        self.tokens_per_step, self.steps_per_epoch = tokens_per_step, steps_per_epoch
        self.now = time.monotonic  # replaceable, for tests of wall-clock behaviour
        self.start, self.reserve_s = self.now() - elapsed, 0.0
        self.agreed = elapsed  # elapsed seconds as every rank agrees (see finished)
        self.agreed_reserve = 0.0  # reserve_s as every rank agrees: the lr must be one number for all

    def elapsed(self) -> float:
        return self.now() - self.start

    def lr_multiplier(self, step: int, schedule) -> float:
        if self.budget_s is None:
            assert self.total is not None
            return lr_multiplier(step, self.total, int(self.warmup), schedule)
        window = max(self.budget_s - self.agreed_reserve, 1e-9)
        n = self.RESOLUTION
        done = min(n, int(n * self.agreed / window))
        return lr_multiplier(done, n, round(n * min(self.warmup / window, 1.0)), schedule)

    def finished(self, step: int, step_s: float, d: Dist) -> bool:
        """True after the run's last step: step count reached, or no time left for another step.

        On a wall clock every rank must take the same decision and the same lr, though their clocks
        differ a little: elapsed time, step time and reserve are averaged over ranks, one number for all.
        """
        if self.budget_s is None:
            return step >= (self.total or 0)
        times = torch.tensor([self.elapsed(), step_s, self.reserve_s], dtype=torch.float64)
        self.agreed, step_s, self.agreed_reserve = (float(x) for x in all_reduce_mean(times, d))
        return self.agreed + step_s + self.agreed_reserve >= self.budget_s

    def due(self, every: Duration, step: int, since: float, d: Dist) -> bool:
        """Is a periodic action (eval, checkpoint) due at this step? `since`: when it last ran."""
        if every.is_time or (every.unit == "dur" and self.budget_s is not None):
            seconds = every.seconds if every.is_time else every.value * self.budget_s
            flag = torch.tensor(float(seconds > 0 and self.now() - since >= seconds), device=d.device)
            return bool(all_reduce_mean(flag, d) > 0)  # clocks differ per rank: all act when any is due
        n = every.steps(self.tokens_per_step, self.steps_per_epoch, self.total)
        return n > 0 and step % n == 0


@dataclass
class Run:
    """Everything the loop works with, built once by `setup`."""

    cfg: TrainConfig
    d: Dist
    dir: Path
    tok: Tokenizer
    model: MPTForCausalLM  # the bare model (generation during eval, LoRA export)
    wrapped: torch.nn.Module  # after parallelize: what trains
    optimizer: torch.optim.Optimizer
    loader: StreamLoader
    clock: RunClock
    progress: Progress
    metrics: Metrics
    mfu: MFU
    autocast: contextlib.AbstractContextManager
    flops_per_token: int
    save_s: float | None = None  # how long the last checkpoint took
    stopped: bool = False  # a stop was requested (SIGUSR1 or LONGBOI_STOP_FILE): checkpointed, not finished


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training described by `cfg`."""
    with StopRequest() as stop:  # from the start: SIGUSR1 during set-up or the final save must not kill the run
        r = setup(cfg)
        loss, last_eval = run_loop(r, stop)
        if r.stopped:
            return _stopped(r, loss, last_eval, stop)
        return finish(r, loss, last_eval)


STOP_FILE_ENV = "LONGBOI_STOP_FILE"


class StopRequest:
    """Has anyone asked this run to stop early (a scheduler's warning before the time limit)?

    Two ways, for any launcher: SIGUSR1 to a training process, or the file named by LONGBOI_STOP_FILE
    appearing (launch/slurm/train.sbatch touches it when Slurm warns; a file reaches every node's
    ranks through the shared filesystem where a signal to the batch script reaches none). The run
    then checkpoints after its current step (no evaluation first) and ends, so a requeued job resumes
    there. Once the stop is saved, the file is removed (the same command resumes instead of stopping
    again) and FILE.stopped names the step, which tells a launcher "stopped, not finished".
    """

    def __init__(self):
        self.signalled = False
        self.file = os.environ.get(STOP_FILE_ENV)
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def __call__(self, d: Dist) -> bool:
        """True on every rank once any rank was asked (one process per node looks at the file)."""
        asked = self.signalled or bool(self.file and d.local_rank == 0 and os.path.exists(self.file))
        return anyone(asked, d)

    def done(self, step: int, d: Dist) -> None:
        """The stop is saved: consume the request and leave the marker."""
        if self.file and d.is_main:
            Path(self.file).unlink(missing_ok=True)
            Path(f"{self.file}.stopped").write_text(f"{step}\n")


def setup(cfg: TrainConfig) -> Run:
    """Model, data, optimizer and wrappers; then the newest checkpoint, if any, restored."""
    check_output_location(Path(cfg.run_dir) / "config.yaml", "run_dir")  # before minutes of set-up, not after
    d = init_distributed(cfg.device)
    choice = resolve_precision(cfg.precision, d.device, quiet=not d.is_main)
    if d.device.type == "cuda":  # fp32 matmuls on tensor cores (TF32), as the fp32 peak in MFU assumes
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = dataclasses.replace(cfg, precision=choice.precision)
    run, tok = Path(cfg.run_dir), Tokenizer(cfg.tokenizer)
    model, wrapped = _start_model(cfg, tok, d, choice.bf16)
    data = _training_data(cfg, tok, d)
    optimizer = build_optimizer(wrapped, cfg.optimizer, choice.bf16)
    per_rank = cfg.global_batch_size // d.world_size
    micro = cfg.micro_batch_size or find_micro_batch(wrapped, optimizer, data.seq_len, per_rank, choice.bf16, d)
    workers = cfg.data.num_workers if cfg.data else 0
    loader = StreamLoader(data, cfg.global_batch_size, micro, d.rank, d.world_size, workers)
    progress, resumed = _resume(cfg, run, wrapped, optimizer, loader, data, d)
    tokens_per_step = cfg.global_batch_size * data.seq_len
    clock = RunClock(cfg, tokens_per_step, len(data) / cfg.global_batch_size, progress.elapsed)
    metrics = Metrics(run, d.is_main, cfg.log.tensorboard, cfg.log.wandb, dataclasses.asdict(cfg))
    if d.is_main:
        _write_run_config(run, cfg, micro, clock)
    if resumed is not None:
        metrics.log("resume", progress.step, checkpoint=resumed.name, consumed=progress.consumed)
        if d.is_main:
            print(f"resumed from {resumed} (step {progress.step})", file=sys.stderr)
    return Run(
        cfg=cfg,
        d=d,
        dir=run,
        tok=tok,
        model=model,
        wrapped=wrapped,
        optimizer=optimizer,
        loader=loader,
        clock=clock,
        progress=progress,
        metrics=metrics,
        mfu=MFU(d.device, choice.bf16, cfg.log.peak_flops, d.world_size),
        autocast=torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=choice.bf16),
        flops_per_token=model_stats(cfg.model, data.seq_len).train_flops_per_token,
    )


def _resume(
    cfg: TrainConfig, run: Path, wrapped, optimizer, loader: StreamLoader, data, d: Dist
) -> tuple[Progress, Path | None]:
    """The newest checkpoint restored (model, optimizer, data position, RNG), or a fresh start."""
    if d.is_main:  # no save is running yet: what a killed save left half-written can go
        for stale in remove_stale(run / "checkpoints") + remove_stale(run):
            print(f"note: removed {stale}, left by a save that was interrupted", file=sys.stderr)
    barrier(d)
    torch.manual_seed(cfg.seed + d.rank)  # dropout masks differ per rank; a resume restores the saved RNG
    latest = newest_checkpoint(run, d) if cfg.checkpoint.autoresume else None
    if latest is not None:
        saved = ckpt.load(latest, wrapped, optimizer, d)
        progress = Progress(**saved["progress"])
        try:
            loader.load_state_dict(saved.get("data") or {**loader.state_dict(), "consumed": progress.consumed})
        except UserError as e:
            raise UserError(
                f"{latest}: {e}. To start fresh with this data, use a new run_dir, delete {run / 'checkpoints'}, "
                "or set checkpoint.autoresume: false"
            ) from e
        return progress, latest
    if ckpt.checkpoints(run) and d.is_main:
        print(f"note: autoresume is off; {run} has checkpoints, starting from step 0 anyway", file=sys.stderr)
    return Progress(), None


def run_loop(r: Run, stop: StopRequest | None = None) -> tuple[float | None, dict]:
    """The training loop, top to bottom. Returns the last loss and the last evaluation's metrics."""
    cfg, d, progress, clock = r.cfg, r.d, r.progress, r.clock
    bar = _progress_bar(r)
    batches, last_save, last_eval_at, last_eval, loss = iter(r.loader), clock.now(), clock.now(), {}, None
    eval_every = parse_duration(cfg.eval.every)
    save_every = parse_duration(cfg.checkpoint.every)
    has_eval = _has_eval(cfg)
    finished = clock.finished(progress.step, 0.0, d)
    r.stopped = not finished and stop is not None and stop(d)  # asked during set-up
    while not (finished or r.stopped):
        lr = set_lr(r.optimizer, cfg.optimizer.lr, clock.lr_multiplier(progress.step, cfg.schedule))
        start = time.perf_counter()
        loss, grad_norm = train_step(
            r.wrapped, r.optimizer, batches, r.loader.accum_steps, r.autocast, cfg.grad_clip, d
        )
        event = spike_event(loss, grad_norm, progress.losses, cfg)
        if anyone(event is not None, d):  # the same decision on every rank (their losses agree; be sure)
            batches = _defend(r, event or "a spike seen by another rank", loss, grad_norm, batches)
            finished = clock.finished(progress.step, time.perf_counter() - start, d)
            continue
        r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        progress.step += 1
        progress.tokens += clock.tokens_per_step
        progress.consumed = r.loader.consumed
        progress.losses = (progress.losses + [loss])[-cfg.spike.window :]
        progress.elapsed = clock.elapsed()
        tok_s = clock.tokens_per_step / seconds
        if not clock.reserve_s and has_eval:  # until an evaluation has been timed
            clock.reserve_s = _eval_estimate(r, tok_s) + _save_estimate(r)
        finished = clock.finished(progress.step, seconds, d)
        mfu = r.mfu(r.flops_per_token * tok_s)
        if progress.step % cfg.log.every == 0 or finished:
            r.metrics.log(
                "train",
                progress.step,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens=progress.tokens,
                flops=progress.tokens * r.flops_per_token,  # training FLOPs so far (MFU's counter; scaling fits)
                tokens_per_s=tok_s,
                mfu=mfu,
                elapsed_s=progress.elapsed,
            )
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
        bar.update(1 if clock.budget_s is None else round(progress.elapsed) - bar.n)
        if not finished and stop is not None and stop(d):  # checkpoint now: no evaluation, no periodic save
            r.stopped = True
            break
        if has_eval and (finished or clock.due(eval_every, progress.step, last_eval_at, d)):
            last_eval, last_eval_at = _timed_eval(r), clock.now()
        if not finished and clock.due(save_every, progress.step, last_save, d):
            _save(r)
            last_save = clock.now()
    bar.close()
    return loss, last_eval


def _defend(r: Run, event: str, loss: float, grad_norm: float, batches):
    """A NaN or a spike: log it, then stop, or skip the batch (and roll back when so configured)."""
    cfg, progress = r.cfg, r.progress
    progress.events += 1
    r.metrics.log("event", progress.step, what=event, action=cfg.spike.action, loss=loss, grad_norm=grad_norm)
    if r.d.is_main:
        tqdm.write(f"step {progress.step}: {event} -> {cfg.spike.action}", file=sys.stderr)
    if cfg.spike.action == "stop" or progress.events > cfg.spike.max_events:
        raise TrainingStopped(
            f"training stopped at step {progress.step}: {event} (event "
            f"{progress.events}; see {r.dir / 'metrics.jsonl'})"
        )
    r.optimizer.zero_grad(set_to_none=True)
    progress.consumed = r.loader.consumed  # the offending batch is skipped either way
    latest = newest_checkpoint(r.dir, r.d) if cfg.spike.action == "rollback" else None
    if latest is not None:
        return _rollback(latest, r.wrapped, r.optimizer, r.loader, progress, r.d, r.metrics)
    return batches


def _progress_bar(r: Run) -> tqdm:
    """Steps for a step-based run; seconds for a wall-clock run (so the ETA is the budget's)."""
    timed = r.clock.budget_s is not None
    return tqdm(
        total=round(r.clock.budget_s) if timed else r.clock.total,
        initial=round(r.progress.elapsed) if timed else r.progress.step,
        unit="s" if timed else "it",
        # seconds of the budget: the rate (seconds per second) says nothing; the ETA is the budget's
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]" if timed else None,
        desc="train",
        disable=not (r.d.is_main and r.cfg.log.progress),
        dynamic_ncols=True,
    )


def _has_eval(cfg: TrainConfig) -> bool:
    """Anything to evaluate, and evaluation not switched off (eval.every 0ba)?"""
    work = (cfg.data is not None and cfg.data.val) or cfg.eval.icl_tasks or cfg.eval.prompts
    return bool(work) and parse_duration(cfg.eval.every).value > 0


def _timed_eval(r: Run) -> dict:
    """Evaluate, and reserve what it took (plus a checkpoint) at the end of a wall-clock budget."""
    start = time.monotonic()
    results = evaluate(r.wrapped, r.model, r.tok, r.cfg, r.d, r.metrics, r.progress.step, r.autocast)
    r.clock.reserve_s = max(r.clock.reserve_s, 1.2 * (time.monotonic() - start) + _save_estimate(r))
    return results


def _eval_estimate(r: Run, train_tok_s: float) -> float:
    """Seconds an evaluation should take, before one was timed: validation forwards at three times the
    training rate (no backward), one-token decode steps at a thirtieth of it, and the ICL budget."""
    cfg = r.cfg.eval
    val_tokens = 0
    if r.cfg.data is not None and r.cfg.data.val:
        val, batch, n = validation_set(r.cfg, r.d)
        val_tokens = n * batch * val.seq_len
    generated = len(cfg.prompts) * cfg.max_new_tokens
    icl = cfg.icl_time_budget_s if cfg.icl_tasks else 0.0
    return val_tokens / (3 * train_tok_s) + 30 * generated / train_tok_s + icl


def _save(r: Run) -> None:
    start = time.monotonic()
    ckpt.save(
        r.dir,
        r.progress.step,
        r.wrapped,
        r.optimizer,
        _train_state(r.progress, r.cfg, r.loader),
        r.d,
        r.cfg.checkpoint.keep,
    )
    r.save_s = time.monotonic() - start


def _save_estimate(r: Run) -> float:
    """The last checkpoint's time, or a guess from the state size (weights + two Adam moments)."""
    return r.save_s or 1.0 + 12 * sum(p.numel() for p in r.model.parameters()) / 200e6


def finish(r: Run, loss: float | None, last_eval: dict) -> TrainResult:
    """The final checkpoint and weights export; close the metrics."""
    final = None
    if r.cfg.checkpoint.save_final and r.progress.step > 0:
        if not _saved_at_this_step(r):
            _save(r)
        if is_lora(r.model):
            final = ckpt.export_lora(r.model, r.cfg, r.dir, r.tok, r.d)
        else:
            final = ckpt.export_final(r.wrapped, r.dir / "final", r.tok, r.d)
    r.metrics.close()
    barrier(r.d)
    if r.clock.budget_s is not None and r.d.is_main:
        print(
            f"wall-clock budget {r.clock.budget_s:g} s: trained {r.progress.step} steps in "
            f"{r.progress.elapsed:.1f} s, finished at {r.clock.elapsed():.1f} s",
            file=sys.stderr,
        )
    return TrainResult(r.dir, final, r.progress.step, last_eval.get("val_loss"), loss, last_eval, r.clock.elapsed())


def _saved_at_this_step(r: Run) -> bool:
    """Is the newest checkpoint this step's? Rank 0's listing decides: saving is a collective, and a node
    whose view of a shared filesystem lags must not skip it while the others save."""
    newest = ckpt.checkpoints(r.dir)[-1:]
    return bool(from_rank0(bool(newest) and newest[0].name == f"step-{r.progress.step:08d}", r.d))


def _stopped(r: Run, loss: float | None, last_eval: dict, stop: StopRequest) -> TrainResult:
    """A requested stop: checkpoint where the run is (unless that step is saved), and say how it resumes."""
    if r.progress.step > 0 and not _saved_at_this_step(r):
        _save(r)
    stop.done(r.progress.step, r.d)
    r.metrics.log("stop", r.progress.step, reason="stop requested (SIGUSR1 or LONGBOI_STOP_FILE)")
    r.metrics.close()
    barrier(r.d)
    if r.d.is_main:
        print(
            f"stopped on request at step {r.progress.step}, checkpoint saved; run the same command again to "
            "resume (a requeued Slurm job does so by itself)",
            file=sys.stderr,
        )
    return TrainResult(r.dir, None, r.progress.step, last_eval.get("val_loss"), loss, last_eval, r.clock.elapsed())


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches,
    accum: int,
    autocast,
    grad_clip: float | None,
    d: Dist,
) -> tuple[float, float]:
    """Forward/backward over `accum` micro-batches; returns (mean loss over the global batch, grad norm).

    The loss is the exact mean over every target token of the global batch, whatever the micro-batch
    size and world size: target tokens are counted first (finetuning masks a varying number per
    row), then each micro-batch's mean is weighted by its share. Gradients are averaged over ranks
    by DDP / FSDP, hence the world size in the weight.
    """
    micro = [_micro_batch(next(batches), d.device) for _ in range(accum)]
    counts = torch.stack([(labels != IGNORE).sum() for _, labels, _ in micro]).tolist()  # one device sync
    global_count = float(all_reduce_mean(torch.tensor(float(sum(counts))), d)) * d.world_size
    total = torch.zeros((), device=d.device)
    for i, ((inputs, labels, seq), count) in enumerate(zip(micro, counts)):
        weight = count * d.world_size / max(global_count, 1.0)
        with _no_sync(model, last=i == accum - 1):
            with autocast:
                loss = model(inputs, sequence_id=seq, labels=labels)  # fused, chunked LM head + cross-entropy
            (loss * weight).backward()
        total += loss.detach() * weight
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(all_reduce_mean(total, d)), float(norm)


def _micro_batch(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, labels, sequence_id) on the device, for either kind of batch."""
    if isinstance(batch, dict):  # finetuning: packed rows, labels already shifted and masked
        return tuple(batch[k].to(device) for k in ("input_ids", "labels", "sequence_id"))  # type: ignore[return-value]
    batch = batch.to(device, non_blocking=True)  # pretraining: fixed-length samples
    return batch[:, :-1], batch[:, 1:], None


@contextlib.contextmanager
def _no_sync(model: torch.nn.Module, last: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch (its gradients are full-size
    anyway). FSDP2 reduce-scatters every micro-batch instead: skipping it (set_requires_gradient_sync)
    would keep full, unsharded fp32 gradients alive until the last micro-batch, +4 bytes per parameter
    on every device (26.6 GB for mpt-7b), which neither `longboi plan` nor the micro-batch probe (one
    micro-batch) would see. Sharded gradients keep both truthful; the reduce-scatter overlaps backward."""
    if not last and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def spike_event(loss: float, grad_norm: float, window: list[float], cfg: TrainConfig) -> str | None:
    """Why this step must not be applied (non-finite or spiking loss), or None."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    if len(window) >= cfg.spike.min_history:
        mean, std = statistics.fmean(window), statistics.pstdev(window)
        if loss > mean + cfg.spike.threshold * max(std, 1e-3 * abs(mean)):
            return f"loss spike ({loss:.4f} vs window mean {mean:.4f}, std {std:.4f})"
    return None


def newest_checkpoint(run: Path, d: Dist) -> Path | None:
    """The newest complete checkpoint as rank 0 sees it, the same on every rank. A rank that cannot see it
    (run_dir on a node-local disk) stops every rank with the reason, instead of loading something else."""
    newest = ckpt.checkpoints(run)[-1:]
    chosen = from_rank0(newest[0].name if newest else None, d)
    if chosen is None:
        return None
    path = run / "checkpoints" / chosen
    if anyone(not (path / "train_state.json").is_file(), d):
        raise UserError(
            f"{path}: rank 0 resumes from this checkpoint but another rank cannot see it; run_dir must be on "
            "storage every node shares (a shared filesystem)"
        )
    return path


def _rollback(latest: Path, model, optimizer, loader: StreamLoader, progress: Progress, d: Dist, metrics) -> object:
    """Restore the newest checkpoint (`latest`) but keep the data position past the offending batch."""
    skip_to, events = progress.consumed, progress.events
    saved = Progress(**ckpt.load(latest, model, optimizer, d)["progress"])
    progress.__dict__.update(saved.__dict__)
    progress.consumed, progress.events = skip_to, events
    loader.consumed = skip_to
    metrics.log("rollback", progress.step, checkpoint=latest.name, skipped_samples=skip_to - saved.consumed)
    return iter(loader)


def _start_model(cfg: TrainConfig, tok: Tokenizer, d: Dist, bf16: bool) -> tuple[MPTForCausalLM, torch.nn.Module]:
    """The bare model and what trains (torchtitan's order): built on the meta device, then sharded
    (FSDP) before any rank allocates its slice, or given full weights first (one process, DDP, LoRA).

    Weights: `init_from`'s under the run's model config (which may differ in training-only fields,
    e.g. a longer max_seq_len for long-context finetuning), or a fresh init from `cfg.seed` that is
    the same whatever the world size.
    """
    tok.check_fits(cfg.model.vocab_size)
    with torch.device("meta"):
        model = MPTForCausalLM(cfg.model)
    sharded = d.enabled and cfg.parallel == "fsdp"
    if not sharded:
        materialize(model, d.device, cfg.seed, cfg.init_from)
    if cfg.lora is not None:
        if sharded:
            raise UserError("LoRA is not supported with FSDP here (untested with peft); set parallel: ddp")
        model = add_lora(model, cfg.lora)
    wrapped = parallelize(model, d, cfg.parallel, bf16, cfg.activation_checkpointing, cfg.compile)
    if sharded:
        materialize(model, d.device, cfg.seed, cfg.init_from)
    return model, wrapped


def _training_data(cfg: TrainConfig, tok: Tokenizer, d: Dist):
    """Pretraining shards (StreamingDataset), or finetuning jsonl packed into max_seq_len rows."""
    if cfg.data is not None:
        data = StreamingDataset(
            cfg.data.sources, seed=cfg.data.seed, shuffle_block=cfg.data.shuffle_block, cache=cfg.data.cache
        )
        _check_data(data, tok, cfg)
        return data
    from longboi.data.finetune import PackedDataset, load_examples, pack

    ft = cfg.finetune
    assert ft is not None
    examples, report = load_examples(
        ft.data, tok, cfg.model.max_seq_len, ft.target_prompts, ft.target_responses, ft.overflow, ft.on_bad_input
    )
    rows, efficiency = pack(examples, cfg.model.max_seq_len, tok.pad_id)
    if d.is_main:
        print(
            f"finetune data: {report.examples} examples ({report.truncated} truncated, {report.dropped} dropped, "
            f"{report.skipped} skipped) packed into {len(rows['input_ids'])} rows of {cfg.model.max_seq_len} "
            f"tokens, packing efficiency {efficiency:.1%}",
            file=sys.stderr,
        )
    return PackedDataset(rows, ft.seed)


def _check_data(data: StreamingDataset, tok: Tokenizer, cfg: TrainConfig) -> None:
    index = data.data[0].index
    if index.tokenizer_sha256 != tok.sha256():
        raise UserError(
            f"the data in {cfg.data.sources[0].path} was prepared with a different tokenizer than "
            f"{cfg.tokenizer}; re-run `longboi prepare` with it"
        )
    if index.layout != "chunks":
        raise UserError("pretraining reads chunks-layout data (prepare with --layout chunks)")
    if cfg.global_batch_size % (cfg.micro_batch_size or 1):
        raise UserError(
            f"global_batch_size {cfg.global_batch_size} is not divisible by micro_batch_size {cfg.micro_batch_size}"
        )


def _train_state(progress: Progress, cfg: TrainConfig, loader: StreamLoader) -> dict:
    return {
        "progress": dataclasses.asdict(progress),
        "data": loader.state_dict() | {"consumed": progress.consumed},
        "model_config": to_mpt_dict(cfg.model),
        "tokenizer": str(Path(cfg.tokenizer).resolve()),
    }


def _write_run_config(run: Path, cfg: TrainConfig, micro: int, clock: RunClock) -> None:
    run.mkdir(parents=True, exist_ok=True)
    resolved = {"micro_batch_size": micro, "total_steps": clock.total, "budget_s": clock.budget_s}
    resolved = dataclasses.asdict(cfg) | {"resolved": resolved}
    (run / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
