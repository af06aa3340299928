"""The `longboi` command. Each subcommand is a plain typed function (also the Python API);
`--help` text and argument parsing are generated from its signature and docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from longboi.config import Precision, Quantize
from longboi.errors import UserError, check_output_location


def info(target: str, seq_len: int | None = None) -> dict:
    """Parameter count, FLOPs per token and training memory of a preset or checkpoint.

    Args:
        target: a preset name (tiny, mpt-125m ... mpt-30b) or a checkpoint directory.
        seq_len: sequence length for the attention FLOPs term (default: the model's max_seq_len).
    """
    from longboi.flops import model_stats
    from longboi.plan import human, memory_table

    cfg = _config_of(target)
    stats = model_stats(cfg, seq_len)
    print(
        f"{target}: d_model {cfg.d_model}, n_heads {cfg.n_heads} (kv {cfg.kv_heads}), n_layers {cfg.n_layers}, "
        f"ffn {cfg.ffn_hidden}, vocab {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}"
    )
    print(f"parameters          {stats.params:>16,}  ({human(stats.params)})")
    print(f"  non-embedding     {stats.non_embedding_params:>16,}  ({human(stats.non_embedding_params)})")
    print(
        f"train FLOPs/token   {stats.train_flops_per_token:>16,}  ({human(stats.train_flops_per_token)}, "
        f"seq_len {stats.seq_len}: 6N + 12*L*d*T)"
    )
    for what, gib in memory_table(stats.params):
        print(f"{what:<44} {gib:>10.2f} GiB")
    return {
        "params": stats.params,
        "non_embedding_params": stats.non_embedding_params,
        "train_flops_per_token": stats.train_flops_per_token,
    }


def plan(
    *,
    model: str | None = None,
    tokens: float | None = None,
    gpu: str = "a100-40gb",
    gpus: int = 8,
    seq_len: int | None = None,
    mfu: str | None = None,
    goodput: float = 0.9,
    price_per_gpu_hour: float | None = None,
    activation_checkpointing: bool = False,
    micro_batch: int | None = None,
    budget_flops: float | None = None,
    budget_gpu_hours: float | None = None,
    budget_usd: float | None = None,
    inference_tokens: float | None = None,
    fit: Literal["epoch", "hoffmann"] = "epoch",
) -> dict:
    """Plan a training run: FLOPs, memory per GPU, time and cost; or size one for a budget (Chinchilla).

    Args:
        model: a preset (mpt-7b, ...) or checkpoint directory to train; omit it with a --budget-* option.
        tokens: training tokens, e.g. 1e12.
        gpu: a100-40gb, a100-80gb, h100, h200, l4, a10, rtx-4090, mi300x, or cpu (this machine, measured).
        gpus: how many (FSDP full sharding across them).
        seq_len: training sequence length (default: the model's max_seq_len).
        mfu: model FLOPs utilization, e.g. 0.4, or measured:RUN_DIR (a run's logged MFU); default: LLM
            Foundry's published MFU for the nearest model size on that GPU.
        goodput: share of wall-clock time spent training (evaluation, checkpoints, restarts take the rest).
        price_per_gpu_hour: dollars per GPU-hour, for the cost line.
        activation_checkpointing: plan with activation checkpointing (both are shown).
        micro_batch: per-GPU micro-batch for the memory estimate (default: the largest that fits).
        budget_flops: size a compute-optimal model for this many training FLOPs.
        budget_gpu_hours: ... or for this many GPU-hours of --gpu.
        budget_usd: ... or for this many dollars at --price-per-gpu-hour.
        inference_tokens: with a budget: lifetime tokens to be served, for the inference-aware size.
        fit: the published L(N, D) fit for sizing: epoch (Besiroglu et al. 2024) or hoffmann (2022).
    """
    from longboi import plan as P

    _check_plan_numbers(tokens=tokens, gpus=gpus, goodput=goodput, price_per_gpu_hour=price_per_gpu_hour,
                        micro_batch=micro_batch, budget_flops=budget_flops, budget_gpu_hours=budget_gpu_hours,
                        budget_usd=budget_usd, inference_tokens=inference_tokens)  # fmt: skip
    acc = P.accelerator(gpu)
    rate, source = _mfu_option(mfu)
    budgets = [b for b in (budget_flops, budget_gpu_hours, budget_usd) if b is not None]
    if budgets and (model or tokens):
        raise UserError("give either --model with --tokens, or one --budget-* option, not both")
    if len(budgets) > 1:
        raise UserError("give one of --budget-flops, --budget-gpu-hours, --budget-usd")
    sizing: dict = {}
    if budgets:
        model, tokens, sizing = _size_for_budget(acc, gpus, rate, goodput, price_per_gpu_hour, fit, inference_tokens,
                                                 budget_flops, budget_gpu_hours, budget_usd)  # fmt: skip
    if model is None or tokens is None:
        raise UserError("give --model and --tokens (or a --budget-* option to size the model)")
    cfg = _config_of(model)
    seq = seq_len or cfg.max_seq_len
    p = P.plan_training(cfg, tokens, acc, gpus, seq, rate, source or "given", goodput, price_per_gpu_hour)
    return sizing | P.report(p, cfg, seq, micro_batch, activation_checkpointing)


def _check_plan_numbers(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
    if values["goodput"] is not None and values["goodput"] > 1:
        raise UserError(f"--goodput is a fraction of wall-clock time (0-1], got {values['goodput']:g}")


def _mfu_option(mfu: str | None) -> tuple[float | None, str | None]:
    from longboi.plan import measured_mfu

    if mfu is None:
        return None, None
    if mfu.startswith("measured:"):
        return measured_mfu(mfu.removeprefix("measured:"))
    try:
        rate = float(mfu)
    except ValueError:
        raise UserError(f"--mfu takes a fraction (0.4) or measured:RUN_DIR, got {mfu!r}") from None
    if not 0 < rate <= 1:
        raise UserError(f"--mfu is a fraction of peak FLOP/s in (0, 1], got {rate:g}")
    return rate, "given"


def _size_for_budget(acc, gpus, rate, goodput, price, fit, inference_tokens, flops, hours, usd):
    """Chinchilla-optimal (N, D) for the budget, the nearest preset and its tokens: (preset, tokens, report)."""
    from longboi.plan import default_mfu, human, nearest_preset
    from longboi.scaling import FITS

    law = FITS[fit]
    if usd is not None:
        if price is None:
            raise UserError("--budget-usd needs --price-per-gpu-hour")
        hours = usd / price
    n = 1e9
    for _ in range(3):  # the default MFU depends on the size the budget buys
        mfu = rate if rate is not None else default_mfu(acc, n)[0]
        budget = flops if hours is None else hours * 3600 * acc.peak_flops * mfu * goodput
        n, d = law.optimal(budget)
    name, size = nearest_preset(n)
    tokens = d * n / size  # the preset's tokens at the same FLOPs (6ND)
    print(
        f"budget       {budget:.3g} training FLOPs"
        + ("" if hours is None else f" ({hours:,.0f} GPU-hours of {acc.name})")
    )
    print(
        f"optimal      N = {human(n)} parameters, D = {human(d)} tokens ({d / n:.1f} tokens/parameter), "
        f"L = {law.loss(n, d):.3f} nats/token on MassiveText ({law.source})"
    )
    print(f"nearest      {name} ({human(size)} parameters): {human(tokens)} tokens at this budget")
    out = {"optimal_params": n, "optimal_tokens": d, "preset": name, "preset_tokens": tokens}
    if inference_tokens is not None:
        ni, di = law.inference_aware(budget, inference_tokens)
        total, total_opt = 6 * ni * di + 2 * ni * inference_tokens, 6 * n * d + 2 * n * inference_tokens
        print(
            f"inference    serving {human(inference_tokens)} tokens: N = {human(ni)}, D = {human(di)} reaches the "
            f"same loss for {total / total_opt - 1:+.1%} total FLOPs (training {6 * ni * di / budget - 1:+.1%})"
        )
        out |= {"inference_params": ni, "inference_tokens_trained": di}
    return name, tokens, out


def scaling(
    action: Literal["fit", "compare"],
    runs: list[str],
    *,
    predict_flops: float | None = None,
    predict_model: str | None = None,
    tokens: float | None = None,
    seq_len: int | None = None,
    png: str | None = "scaling.png",
    floor: bool = False,
    baseline: list[str] | None = None,
    at_flops: float | None = None,
) -> dict:
    """Fit L(C) = a * C^-b (+ c) to finished runs and predict a larger run, or compare two ladders' compute.

    Args:
        action: fit (fit RUNS, predict a larger run) or compare (how many times less compute RUNS need than
            the --baseline runs for the same loss, with a 90% bootstrap interval).
        runs: run directories (each with config.yaml and metrics.jsonl with an evaluation), or quoted globs.
        predict_flops: predict the loss of a run with this many training FLOPs.
        predict_model: ... or of this model (preset or checkpoint) trained on --tokens tokens.
        tokens: training tokens of --predict-model.
        seq_len: sequence length of --predict-model (default: its max_seq_len).
        png: write the log-log plot here (none: no plot).
        floor: also fit an irreducible-loss floor c (default: a pure power law; see longboi/scaling.py).
        baseline: compare: the baseline ladder's run directories or quoted globs (the flag repeats).
        at_flops: compare: at the loss the baseline's fit reaches at this compute (default: its largest run's).
    """
    from longboi.scaling import fit_runs, plot_fit

    points = _ladder(runs)
    if action == "compare":
        return _compare_ladders(points, _ladder(baseline or []), at_flops, floor)
    predict_flops = _predict_flops(predict_flops, predict_model, tokens, seq_len)
    fit, pred = fit_runs(points, predict_flops, floor)
    if png:
        print(f"wrote {plot_fit(points, fit, pred, png)}")
    out = {"a": fit.a, "b": fit.b, "c": fit.c, "scale": fit.scale}
    return out | ({"prediction": pred.loss, "low": pred.low, "high": pred.high} if pred else {})


def _ladder(paths: list[str]) -> list:
    """Finished runs from directories or globs of them (a glob that matches nothing is an error)."""
    import glob

    from longboi.scaling import read_run

    found = []
    for path in paths:
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            raise UserError(f"{path}: matches no run directory")
        found += matches
    return [read_run(r) for r in found]


def _predict_flops(flops: float | None, model: str | None, tokens: float | None, seq_len: int | None) -> float | None:
    from longboi.flops import model_stats

    if model is not None:
        if tokens is None or tokens <= 0:
            raise UserError("--predict-model needs --tokens (a positive count)")
        flops = tokens * model_stats(_config_of(model), seq_len).train_flops_per_token
    if flops is not None and flops <= 0:
        raise UserError(f"--predict-flops must be positive, got {flops:g}")
    return flops


def _compare_ladders(points: list, baseline: list, at_flops: float | None, floor: bool) -> dict:
    from longboi.scaling import compute_multiplier, fit_runs

    if not baseline:
        raise UserError("scaling compare needs --baseline RUN_DIR (or a quoted glob), once per baseline run")
    at = at_flops if at_flops is not None else max(p.flops for p in baseline)
    if at <= 0:
        raise UserError(f"--at-flops must be positive, got {at:g}")
    print("baseline:")
    base_fit, _ = fit_runs(baseline, None, floor)
    print("compared:")
    fit_runs(points, None, floor)
    ratio, low, high = compute_multiplier(baseline, points, at, floor)
    loss = float(base_fit(at))
    print(
        f"at the baseline's loss {loss:.4f} (its fit at {at:.3g} FLOPs) the compared runs need 1/{ratio:.2f} "
        f"of its compute: a {ratio:.2f}x compute multiplier (90%: {low:.2f}-{high:.2f})"
    )
    return {"at_flops": at, "loss": loss, "multiplier": ratio, "low": low, "high": high}


def init(preset: str, out: str, *, tokenizer: str, seed: int = 0) -> Path:
    """Create a randomly initialized checkpoint directory from a preset.

    Args:
        preset: model preset name (tiny, mpt-125m, ... mpt-30b).
        out: checkpoint directory to write (replaced atomically if it exists).
        tokenizer: path to a HF tokenizer.json, copied into the checkpoint.
        seed: random seed for the initialization.
    """
    import torch

    from longboi.checkpoint import save_checkpoint
    from longboi.config import preset as get_preset
    from longboi.model import MPTForCausalLM
    from longboi.tokenizer import Tokenizer

    check_output_location(out)
    cfg = get_preset(preset)
    tok = Tokenizer(tokenizer)
    tok.check_fits(cfg.vocab_size)
    torch.manual_seed(seed)
    path = save_checkpoint(MPTForCausalLM(cfg), out, tok)
    print(f"wrote {path} ({preset}, seed {seed})", file=sys.stderr)
    return path


def generate(
    ckpt: str,
    prompt: str | None = None,
    prompt_file: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    dtype: Precision = "auto",
    quantize: Quantize = "none",
    allow_pickle: bool = False,
    device: str = "auto",
    compile: bool = False,
) -> str:
    """Generate a completion of a prompt, streaming it to stdout.

    Args:
        ckpt: a checkpoint (longboi or HF MPT), run (its final/) or LoRA adapter directory.
        prompt: the prompt text.
        prompt_file: read the prompt from this file instead.
        max_new_tokens: most tokens to generate.
        temperature: sampling temperature; 0 means greedy.
        top_k: sample only from the k most likely tokens (none: no limit).
        top_p: nucleus sampling: smallest set of tokens with this total probability.
        repetition_penalty: >1 discourages repeating tokens already in the text.
        stop: stop when the text contains one of these strings (repeatable).
        seed: random seed, for reproducible sampling.
        dtype: weights/compute dtype: auto (bf16 where the device computes it natively, else fp32), fp32, bf16.
        quantize: int8: int8 weights for the linear layers and LM head (CPU decoding, ~3x fp32 on mpt-125m).
        allow_pickle: allow loading .bin/.pt weights (pickle can run code: trusted files only).
        device: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N.
        compile: compile the decode step (torch.compile; 1.2-3x faster decoding on a CPU after a
            one-off compile of tens of seconds; with int8, bf16 activations: needs native bf16).
    """
    from longboi.generate import SamplingParams, stream
    from longboi.inference import load_for_inference

    text = _read_prompt(prompt, prompt_file)
    model, tok = load_for_inference(ckpt, dtype, quantize, device, allow_pickle, compiled=compile)
    _note_long_prompt(model.config, len(tok.encode(text)))
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop or ()),
        seed=seed,
    )
    pieces = []
    for piece in stream(model, tok, text, params, _decoder(model, compile)):
        pieces.append(piece)
        print(piece, end="", flush=True)
    print()
    return "".join(pieces)


def convert(
    src: str,
    dst: str,
    *,
    to: Literal["hf", "vllm", "longboi", "gguf", "onnx"],
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f32",
    allow_pickle: bool = False,
) -> Path:
    """Convert a checkpoint between longboi and Hugging Face transformers' MPT, or export it for a runtime.

    Args:
        src: source directory (longboi checkpoint, or an HF MPT directory saved by transformers); for vllm, gguf
            and onnx also a run directory (its final weights) or a LoRA adapter directory (merged onto its base).
        to: "hf" (loads with MptForCausalLM.from_pretrained), "vllm" (any config: `vllm serve DIR` with
            longboi's vLLM plugin), "longboi", "gguf" (llama.cpp's mpt) or "onnx" (onnxruntime: a decoder
            with KV cache in Optimum's naming).
        dst: directory to write (for gguf: the .gguf file).
        outtype: gguf weight type: f32, f16, bf16 or q8_0 (norms stay f32). ONNX is written in f32.
        allow_pickle: allow reading .bin/.pt weights from src (pickle can run code: trusted files only).
    """
    from longboi.export.hf import export_hf, export_vllm, import_checkpoint

    check_output_location(dst)
    if to in ("gguf", "onnx"):
        return _export_for_runtime(src, dst, to, outtype)
    if to == "vllm":
        path = export_vllm(src, dst)
    else:
        path = (export_hf if to == "hf" else import_checkpoint)(src, dst, allow_pickle=allow_pickle)
    print(f"wrote {path}", file=sys.stderr)
    return path


def _export_for_runtime(src: str, dst: str, to: Literal["gguf", "onnx"], outtype: str) -> Path:
    if to == "onnx" and outtype != "f32":
        raise UserError(f"--outtype {outtype} is for gguf; the ONNX export is f32 (onnxruntime's tools quantize it)")
    from longboi.inference import load_for_inference

    model, tok = load_for_inference(src, "fp32", device="cpu")  # exporters read CPU fp32 weights
    if to == "gguf":
        from longboi.export.gguf import export_gguf

        path = export_gguf(model, tok, dst, outtype)  # type: ignore[arg-type]
    else:
        from longboi.export.onnx import export_onnx

        path = export_onnx(model, tok, dst)
    print(f"wrote {path} ({outtype})", file=sys.stderr)
    return path


def prepare(
    inputs: list[str],
    *,
    out: str,
    tokenizer: str,
    seq_len: int = 2048,
    layout: Literal["chunks", "documents"] = "chunks",
    text_field: str = "text",
    split_on: str | None = None,
    val_fraction: float = 0.0,
    shard_mb: float = 64.0,
    workers: int = 0,
    on_bad_input: Literal["error", "skip"] = "error",
    part: str | None = None,
    group_mb: float = 64.0,
) -> dict:
    """Tokenize text/jsonl files (also .gz/.zst) into shards for training.

    Args:
        inputs: files, directories (searched recursively) or globs of .txt/.md/.jsonl files.
        out: output directory or fsspec URL (s3://..., gs://...); gets train/ (and val/).
        tokenizer: path to a HF tokenizer.json.
        seq_len: tokens per sample (chunks layout).
        layout: chunks (concatenate with EOS, cut into seq_len samples) or documents (one sample per document).
        text_field: jsonl field holding the text.
        split_on: split text files into documents at this string (e.g. "<|endoftext|>"); default: one per file.
        val_fraction: hold out this fraction of each file's tokens (its tail; of each group_mb piece of a
            larger jsonl) as the validation split.
        shard_mb: target shard size in MiB.
        workers: 0: tokenize in-process with the tokenizer's threads (all cores); N: use N processes.
        on_bad_input: error (stop at the first bad line) or skip (count, report and go on).
        part: I/N: tokenize only part I (from 0) of N, e.g. on N machines or as a Slurm array
            (--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); then `longboi merge-index OUT`. The
            merged dataset is byte for byte the one a run without --part writes.
        group_mb: input MiB per group: the unit of work a part takes, and where concat-and-chunk restarts
            (each group's partial last sample joins the others' in one last shard). Every part must use the
            same value.
    """
    from longboi.data.parts import part_spec
    from longboi.data.prepare import prepare as run

    r = run(
        inputs,
        out,
        tokenizer,
        seq_len=seq_len,
        layout=layout,
        text_field=text_field,
        split_on=split_on,
        val_fraction=val_fraction,
        shard_mb=shard_mb,
        workers=workers,
        on_bad_input=on_bad_input,
        part=part_spec(part) if part is not None else None,
        group_mb=group_mb,
    )
    _print_report(r, out, "prepared" if part is None else f"part {part}:")
    if part is not None:
        print(f"  when every part has run: longboi merge-index {out}")
    return {"tokens": r.tokens, "samples": r.samples, "skipped": r.skipped, "seconds": r.seconds}


def merge_index(out: str) -> dict:
    """Finish a `prepare --part I/N` run: check every part is present and complete, write index.json.

    Args:
        out: the --out of the parts (a directory or fsspec URL such as s3://bucket/data).
    """
    from longboi.data.prepare import merge as run

    r = run(out)
    _print_report(r, out, "merged: the parts read")
    return {"tokens": r.tokens, "samples": r.samples, "skipped": r.skipped, "documents": r.documents}


def _print_report(r, out: str, what: str) -> None:
    mb, seconds = r.bytes_read / 2**20, max(r.seconds, 1e-9)
    print(
        f"{what} {r.files} files, {r.documents} documents, {mb:.1f} MiB in {r.seconds:.1f}s "
        f"({mb / seconds:.1f} MiB/s, {r.tokens_read / seconds:,.0f} tokens/s)"
    )
    for split in r.tokens:
        print(f"  {split}: {r.samples[split]:,} samples, {r.tokens[split]:,} tokens -> {out}/{split}")
    if r.dropped_tail_tokens:
        print(f"  dropped {r.dropped_tail_tokens} trailing tokens that did not fill a sample")
    if r.skipped:
        print(f"  skipped {r.skipped} bad inputs, e.g.:", *r.skip_examples[:5], sep="\n    ")


def train(config: str, *overrides: str) -> dict:
    """Pretrain (or resume) a model from a YAML run config; add --section.key value to override keys.

    Args:
        config: the run config YAML (see configs/pretrain/).
        overrides: after the config, any key as --section.key value, e.g. --optimizer.lr 3e-4
            --max_duration 6min --model.n_layers 2 (from Python: train("run.yaml", "--optimizer.lr", "3e-4")).
    """
    from longboi.train.config import load_train_config
    from longboi.train.loop import train as run

    cfg = load_train_config(config, list(overrides))
    result = run(cfg)
    if result.final is not None and _is_main_process():
        e = result.eval
        val = (
            (
                f"; validation loss {e['val_loss']:.3f} nats/token = {e['val_bpb']:.3f} bits/byte (unigram baseline "
                f"{e['unigram_val_loss']:.3f} nats/token = {e['unigram_val_bpb']:.3f} bits/byte)"
            )
            if e
            else ""
        )
        print(f"trained {result.steps} steps{val}\nweights: {result.final}", file=sys.stderr)
    return {"steps": result.steps, "val_loss": result.val_loss, "final": str(result.final)}


def finetune(config: str, *overrides: str) -> dict:
    """Finetune a checkpoint on instruction or chat jsonl (the run config's `finetune:` section + `init_from`).

    Args:
        config: the run config YAML (see configs/finetune/). The same loop, checkpointing, autoresume,
            monitoring and torchrun support as `train`.
        overrides: after the config, any key as --section.key value.
    """
    return train(config, *overrides)


def chat(
    ckpt: str,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int | None = None,
    dtype: Precision = "auto",
    quantize: Quantize = "none",
    device: str = "auto",
    compile: bool = False,
) -> None:
    """Chat with a checkpoint: a REPL on a terminal, or one user message per stdin line for scripting.

    Args:
        ckpt: a checkpoint, run or LoRA adapter directory (a chat-finetuned model answers best).
        system: a system prompt for the conversation.
        max_new_tokens: longest reply.
        temperature: sampling temperature; 0 means greedy.
        top_k: sample only from the k most likely tokens.
        top_p: nucleus sampling threshold.
        seed: random seed, for reproducible replies.
        dtype: compute dtype: auto (bf16 where native, else fp32), fp32, bf16.
        quantize: int8: int8 weights for the linear layers and LM head (faster CPU decoding).
        device: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N.
        compile: compile the decode step (see generate --compile).
    """
    from longboi.chat import ChatSession
    from longboi.generate import SamplingParams
    from longboi.inference import load_for_inference

    model, tok = load_for_inference(ckpt, dtype, quantize, device, compiled=compile)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    session = ChatSession(model, tok, params, system, _decoder(model, compile))
    interactive = sys.stdin.isatty()
    if interactive:
        print("longboi chat: /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        print("assistant> ", end="", flush=True)
        for piece in session.send(text):
            print(piece, end="", flush=True)
        print()


def _decoder(model, compile: bool):
    """A compiled decode step for `model`, or None (eager)."""
    if not compile:
        return None
    from longboi.compiled import CompiledDecoder

    print("compiling the decode step on first use (tens of seconds; cached on disk for later runs)", file=sys.stderr)
    return CompiledDecoder(model)


def merge(base: str, adapter: str, out: str, scale: float = 1.0, add: list[str] | None = None) -> Path:
    """Fold LoRA adapters into their base checkpoint: a plain checkpoint with the same outputs.

    Args:
        base: the base checkpoint directory the adapter was trained on.
        adapter: the adapter directory (RUN/adapter: adapter_model.safetensors + adapter_config.json).
        out: the merged checkpoint directory to write.
        scale: the adapter's weight (W + scale x alpha/r x B A).
        add: another adapter to stack, DIR or DIR:SCALE (repeatable): as the server's model "base+a+b".
    """
    from longboi.checkpoint import load_model, load_tokenizer, save_checkpoint
    from longboi.lora import load_adapter
    from longboi.lora import merge as fold
    from longboi.multilora import merge_adapters

    check_output_location(out)
    stack = [(adapter, scale)] + [_scaled(a) for a in add or []]
    if len(stack) == 1 and scale == 1.0:  # peft's own merge: the reference the stacked merge is tested against
        model = fold(load_adapter(load_model(base), adapter))
    else:
        model = merge_adapters(load_model(base), stack)
    path = save_checkpoint(model, out, load_tokenizer(base))
    print(f"wrote {path}", file=sys.stderr)
    return path


def _scaled(flag: str) -> tuple[str, float]:
    """DIR or DIR:SCALE."""
    path, sep, scale = flag.rpartition(":")
    try:
        return (path, float(scale)) if sep else (flag, 1.0)
    except ValueError:
        return flag, 1.0  # a ':' inside the path


def plot(run_dir: str, out: str | None = None) -> Path:
    """Write loss / learning-rate / throughput curves of a training run to a PNG.

    Args:
        run_dir: the run directory (holds metrics.jsonl).
        out: the PNG to write (default: RUN_DIR/curves.png).
    """
    from longboi.train.monitor import plot as run

    path = run(run_dir, out)
    print(f"wrote {path}", file=sys.stderr)
    return path


def export(train_checkpoint: str, out: str, tokenizer: str | None = None) -> Path:
    """Export a training checkpoint (RUN/checkpoints/step-N) to a weights-only checkpoint directory.

    Args:
        train_checkpoint: a training checkpoint directory, or a run directory (its newest checkpoint).
        out: the checkpoint directory to write (config.json + model.safetensors + tokenizer.json).
        tokenizer: tokenizer.json to include (default: the one the run used).
    """
    from longboi.train import checkpoint

    src = Path(train_checkpoint)
    if not (src / "train_state.json").is_file():
        found = checkpoint.checkpoints(src)
        if not found:
            raise UserError(f"{src}: neither a training checkpoint nor a run directory with checkpoints")
        src = found[-1]
    path = checkpoint.export_weights(src, out, tokenizer)
    print(f"wrote {path} (from {src})", file=sys.stderr)
    return path


def train_tokenizer(files: list[str], *, vocab_size: int, out: str, holdout_fraction: float = 0.0) -> Path:
    """Train a small byte-level BPE tokenizer on text files (for small models on one domain).

    Args:
        files: text files to learn merges from.
        vocab_size: number of ids (the model's vocab_size is this rounded up to a multiple of 128).
        out: the tokenizer.json to write.
        holdout_fraction: ignore this tail fraction of each file (match prepare's --val-fraction).
    """
    from longboi.tokenizer import padded_vocab_size, train_bpe

    check_output_location(out)
    tok = train_bpe(files, vocab_size, out, holdout_fraction)
    print(f"wrote {out}: {tok.vocab_size} ids (model vocab_size {padded_vocab_size(tok.vocab_size)})", file=sys.stderr)
    return Path(out)


def eval(  # noqa: A001 - the command is `longboi eval`
    ckpt: str,
    *,
    tasks: str,
    data_root: str = ".",
    out: str | None = None,
    gauntlet: str | None = None,
    max_seq_len: int | None = None,
    limit: int | None = None,
    dtype: Precision = "auto",
    device: str = "auto",
) -> dict:
    """Run in-context-learning tasks (LLM Foundry's task YAML and jsonl format) on a checkpoint.

    Args:
        ckpt: checkpoint directory.
        tasks: YAML with an `icl_tasks:` list (e.g. ../shared/data/eval/yamls/tasks_light.yaml).
        data_root: directory that the tasks' dataset_uri paths are relative to (e.g. ../shared/data).
        out: where to write results.json and results.md (default: CKPT/eval).
        gauntlet: a YAML with `eval_gauntlet:` to aggregate category scores.
        max_seq_len: context length for the tasks (default: the model's max_seq_len).
        limit: evaluate only the first N examples of each task (quick checks).
        dtype: compute dtype: auto (bf16 where native, else fp32), fp32, bf16.
        device: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N; under torchrun
            each rank takes its own GPU (cuda:LOCAL_RANK) or the CPU.
    """
    from longboi.eval.harness import evaluate, gauntlet_scores, load_gauntlet, load_tasks, write_results
    from longboi.inference import load_for_inference
    from longboi.train.parallelize import anyone

    task_list = load_tasks(tasks)
    g = load_gauntlet(gauntlet) if gauntlet else None
    with _processes(device) as (d, share):
        model, tok = load_for_inference(ckpt, dtype, device=d.device)
        together = lambda flag: anyone(flag, d)  # noqa: E731  # a file missing on one rank skips the task on all
        results, skipped = evaluate(model, tok, task_list, data_root, max_seq_len, limit, anyone=together, share=share)
    scores = gauntlet_scores(g, results) if g else None
    precision = _precision_of(model)
    if d.is_main:
        path = write_results(results, skipped, out or Path(ckpt) / "eval", scores, precision, d.world_size)
        print((path / "results.md").read_text())
    return {
        "results": [r.__dict__ for r in results],
        "skipped": skipped,
        "gauntlet": scores,
        "precision": precision,
        "world_size": d.world_size,
    }


@contextlib.contextmanager
def _processes(device: str):
    """(Dist, Share) of this process: under `torchrun --nproc-per-node N` the N ranks (gloo on CPU, NCCL
    on GPUs, cuda:LOCAL_RANK each) split the work and gather the results; otherwise one process on
    `device`."""
    import os

    from longboi.eval.scoring import Share
    from longboi.inference import resolve_device
    from longboi.train.parallelize import Dist, all_gather_objects, init_distributed

    where, torchrun = resolve_device(device), int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun and where.index is not None:
        raise UserError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda")
    d = init_distributed(where.type) if torchrun else Dist(device=where)
    try:
        yield d, Share(d.rank, d.world_size, lambda value: all_gather_objects(value, d))
    finally:
        if d.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def perplexity(
    ckpt: str,
    source: str,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    dtype: Precision = "auto",
    quantize: Quantize = "none",
    device: str = "auto",
) -> dict:
    """Perplexity and bits per byte of a checkpoint on a text file or prepared dataset split.

    Args:
        ckpt: checkpoint directory.
        source: a text file, or a prepared split directory (with index.json).
        seq_len: window length in tokens (default: the model's max_seq_len; longer works for ALiBi).
        stride: step between windows (default: seq_len - 1; smaller gives every token more context).
        max_tokens: score at most this many tokens.
        batch_size: windows per forward pass.
        dtype: compute dtype: auto (bf16 where native, else fp32), fp32, bf16.
        quantize: int8: score the int8-weight model (to check what quantization costs).
        device: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N; under torchrun
            each rank takes its own GPU (cuda:LOCAL_RANK) or the CPU.
    """
    from longboi.eval.perplexity import load_tokens
    from longboi.eval.perplexity import perplexity as run
    from longboi.inference import load_for_inference

    with _processes(device) as (d, share):
        model, tok = load_for_inference(ckpt, dtype, quantize, d.device)
        tokens = load_tokens(source, tok)
        r = run(model, tok, tokens, seq_len or model.config.max_seq_len, stride, batch_size, max_tokens, share=share)
    precision = _precision_of(model)
    if d.is_main:
        print(
            f"{source}: loss {r.loss:.4f} nats/token, perplexity {r.perplexity:.2f}, {r.bits_per_byte:.4f} bits/byte "
            f"over {r.tokens:,} tokens ({r.tokens_per_s:,.0f} tokens/s, {precision}"
            f"{f', {d.world_size} processes' if d.enabled else ''})"
        )
    return r.__dict__ | {"tokens_per_s": r.tokens_per_s, "precision": precision, "world_size": d.world_size}


def serve(
    ckpt: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 64,
    max_queue: int = 256,
    max_model_len: int | None = None,
    dtype: Precision = "auto",
    served_model_name: str | None = None,
    prefill_chunk: int = 256,
    quantize: Quantize = "none",
    kv_cache_memory: str = "auto",
    allowed_hosts: list[str] | None = None,
    device: str = "auto",
    prefix_cache: bool = True,
    lora: list[str] | None = None,
    enable_lora: bool = False,
    lora_root: str | None = None,
    max_loras: int = 8,
    max_lora_rank: int = 64,
    grammar_timeout: float = 10.0,
) -> None:
    """Serve a checkpoint over the OpenAI API (completions, chat, streaming) with continuous batching,
    plus a chat page at /. Needs the serve extra: pip install 'longboi[serve]'. Ctrl-C drains and exits.

    Args:
        ckpt: a checkpoint (longboi or HF MPT), run (serves RUN/final) or LoRA adapter directory (merged at load).
        host: address to bind; 127.0.0.1 keeps the server on this machine (0.0.0.0: every interface).
        port: TCP port.
        api_key: require 'Authorization: Bearer KEY' on every route but /health (default: env LONGBOI_API_KEY).
        max_batch: most sequences decoded together (each choice of each request is one).
        max_queue: most requests waiting for a slot; past it, 429 with Retry-After.
        max_model_len: longest prompt + completion (default: the model's max_seq_len; ALiBi may go past).
        dtype: compute dtype: auto (bf16 where native, else fp32), fp32, bf16.
        served_model_name: the model name clients send (default: the checkpoint directory's name).
        prefill_chunk: prompt tokens per prefill piece (a step runs pieces and decodes in one forward).
        quantize: int8: int8 weights for the linear layers and LM head (more tokens/s on a CPU).
        kv_cache_memory: KV-cache limit (4GiB, 512MiB; auto: a third of the free memory; none): requests wait.
        allowed_hosts: Host header names answered (repeatable; * any; default: loopback names on loopback, else any).
        device: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N.
        prefix_cache: reuse the KV cache of prompt prefixes already computed (--no-prefix-cache: never).
        lora: NAME=ADAPTER_DIR (repeatable): a LoRA adapter requests name as their model ("a+b" stacks).
        enable_lora: allow loading adapters at run time (POST /v1/load_lora_adapter); needs --lora-root.
        lora_root: the directory a run-time lora_path is relative to and must resolve inside (symlinks followed).
        max_loras: most LoRA adapters held at once.
        max_lora_rank: the largest adapter rank accepted.
        grammar_timeout: seconds a response_format schema may take to compile, waiting included (else a 400).
    """
    uvicorn = _serve_extra()
    from longboi.inference import load_for_inference, model_source, resolve_device
    from longboi.serve.api import create_app

    source, where = model_source(ckpt), resolve_device(device)
    key, name = api_key or os.environ.get("LONGBOI_API_KEY") or None, served_model_name or Path(ckpt).resolve().name
    settings = _serve_settings(name, key, source, max_model_len, max_batch, max_queue, prefill_chunk, prefix_cache)
    _limit_settings(settings, host, allowed_hosts, kv_cache_memory, grammar_timeout)
    _lora_settings(settings, lora or [], enable_lora, lora_root, max_loras, max_lora_rank)
    app = create_app(settings, functools.partial(load_for_inference, source, dtype, quantize, where))
    _run_server(uvicorn, app, settings, host, port, source)


def _serve_settings(name, key, source, max_model_len, max_batch, max_queue, prefill_chunk, prefix_cache):
    from longboi.inference import serving_length
    from longboi.serve.api import Settings

    _at_least_one(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    limit = serving_length(source, max_model_len)
    return Settings(name, key, max_batch, max_queue, limit, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)


def _limit_settings(settings, host: str, allowed_hosts: list[str] | None, kv_cache_memory: str, grammar_timeout: float):
    """The Host names answered, the KV-cache limit and the grammar compile limit, checked."""
    from longboi.serve.api import parse_kv_cache_memory

    settings.allowed_hosts = _allowed_hosts(host, allowed_hosts)
    settings.kv_cache_bytes = parse_kv_cache_memory(kv_cache_memory)
    if not grammar_timeout > 0:
        raise UserError(f"--grammar-timeout must be a positive number of seconds, got {grammar_timeout}")
    settings.grammar_timeout = grammar_timeout


def _run_server(uvicorn, app, settings, host: str, port: int, source: Path) -> None:
    _serve_banner(settings, f"http://{host}:{port}", source)  # then serve until Ctrl-C
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    print("longboi serve: stopped", flush=True)


def _at_least_one(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _lora_settings(settings, flags: list[str], enable: bool, root: str | None, max_loras: int, max_rank: int) -> None:
    """The LoRA flags, checked before anything loads."""
    _at_least_one(max_loras=max_loras, max_lora_rank=max_rank)
    settings.loras = _lora_flags(flags, settings.model_name, max_loras)
    settings.max_loras, settings.max_lora_rank = max_loras, max_rank
    settings.enable_lora, settings.lora_root = enable, _lora_root(enable, root)


def _lora_root(enable: bool, root: str | None) -> str | None:
    """The resolved directory run-time adapter loads are confined to (required with --enable-lora)."""
    if root is None:
        if enable:
            raise UserError(
                "--enable-lora reads adapters from paths clients send: give --lora-root DIR, the "
                "directory every run-time lora_path must lie in"
            )
        return None
    if not enable:
        raise UserError("--lora-root is where run-time adapter loads read from: it needs --enable-lora")
    if not Path(root).is_dir():
        raise UserError(f"--lora-root {root}: not a directory")
    return str(Path(root).resolve())


def _lora_flags(flags: list[str], base: str, max_loras: int) -> dict[str, str]:
    """--lora NAME=DIR values -> {name: dir}."""
    loras: dict[str, str] = {}
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora {flag!r}: expected NAME=ADAPTER_DIR")
        if name == base or "+" in name or name in loras:
            raise UserError(f"--lora {flag!r}: {name!r} repeats a name, is the base model's name or holds '+'")
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"--lora {flag!r}: {path} is not an adapter directory (no adapter_config.json)")
        loras[name] = path
    if len(loras) > max_loras:
        raise UserError(f"{len(loras)} --lora adapters, over --max-loras {max_loras}")
    return loras


def _serve_extra():
    """uvicorn, once the serve extra is known to be installed (a clear error otherwise)."""
    try:
        import uvicorn

        import longboi.serve.api  # noqa: F401  # fastapi, pydantic
    except ImportError as e:
        raise UserError(
            f"longboi serve needs the serve extra ({e.name} is missing): pip install 'longboi[serve]'"
        ) from e
    return uvicorn


def _serve_banner(s, url: str, source: Path) -> None:
    """What the server is about to serve, with its limits; a warning when anyone could use it."""
    kv = {None: "no limit", "auto": "auto"}.get(s.kv_cache_bytes) or f"{s.kv_cache_bytes / 2**30:.2f} GiB"
    print(
        f"longboi serve: {url} (chat page at /, OpenAI API at /v1) model {s.model_name!r} from {source}; "
        f"max_batch {s.max_batch}, max_queue {s.max_queue}, max_model_len {s.max_model_len}, KV cache {kv}, "
        f"api key {'required' if s.api_key else 'not set'}, hosts {', '.join(s.allowed_hosts)}",
        flush=True,
    )
    if not s.api_key and "*" in s.allowed_hosts:
        print("warning: no API key and any Host header: anyone who can reach this port can use it", flush=True)


def _allowed_hosts(bind: str, given: list[str] | None) -> tuple[str, ...]:
    """Host names to answer: as given, else the loopback names for a loopback bind, else any."""
    from longboi.serve.api import LOOPBACK_NAMES, host_name

    if given:  # as the Host header is compared: no port, IPv6 in brackets
        bracketed = [f"[{h.strip()}]" if h.count(":") > 1 and "[" not in h else h for h in given]
        return tuple(h if h == "*" else host_name(h) for h in bracketed)
    if bind in ("localhost", "::1") or bind.startswith("127."):
        name = "[::1]" if bind == "::1" else bind
        return LOOPBACK_NAMES + (() if name in LOOPBACK_NAMES else (name,))
    return ("*",)


COMMANDS: list[Callable] = [
    info,
    plan,
    scaling,
    init,
    generate,
    convert,
    prepare,
    merge_index,
    train_tokenizer,
    train,
    finetune,
    chat,
    merge,
    export,
    plot,
    eval,
    perplexity,
    serve,
]


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _config_of(target: str):
    from longboi.checkpoint import load_config
    from longboi.config import PRESETS, preset

    if target in PRESETS or not Path(target).exists():
        return preset(target)
    return load_config(target)


def _precision_of(model) -> str:
    from longboi.quantize import precision_of

    return precision_of(model)


def _note_long_prompt(cfg, n_prompt: int) -> None:
    """A prompt past max_seq_len: fine with ALiBi (noted once), an error with learned positions."""
    if n_prompt <= cfg.max_seq_len:
        return
    if not cfg.alibi:
        raise UserError(
            f"prompt has {n_prompt} tokens, over max_seq_len {cfg.max_seq_len}, and this "
            "model uses learned position embeddings, which cannot extrapolate"
        )
    print(
        f"note: prompt has {n_prompt} tokens, past the trained max_seq_len {cfg.max_seq_len}; "
        "ALiBi extrapolates, quality may degrade far beyond it",
        file=sys.stderr,
    )


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise UserError("give exactly one of --prompt or --prompt-file")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file not found: {path}")
        return path.read_text()
    assert prompt is not None
    return prompt


# ---------------------------------------------------------------------------------------------
# Signature -> argparse. Positional: parameters without defaults; keyword-only ones without defaults are
# required options; the rest are --kebab-case options.


def _arg_docs(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary, _, rest = doc.partition("\n\nArgs:\n")
    docs = {}
    for m in re.finditer(r"^\s+(\w+): (.+(?:\n\s{8,}.+)*)", rest, re.M):
        docs[m.group(1)] = " ".join(m.group(2).split())
    return summary.strip(), docs


def _unwrap_optional(tp) -> type:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _none_or(tp: type) -> Callable[[str], object]:
    """An optional option's parser: `none` gives None (e.g. --top-k none), anything else the type."""

    def parse(text: str) -> object:
        return None if text.lower() == "none" else tp(text)

    parse.__name__ = tp.__name__  # argparse names the type in its error messages
    return parse


def _add_command(sub: argparse._SubParsersAction, fn: Callable) -> None:
    summary, docs = _arg_docs(fn)
    name = fn.__name__.replace("_", "-")
    parser = sub.add_parser(name, help=summary.splitlines()[0], description=summary)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints[name])
        kwargs: dict = {"help": docs.get(name, "").replace("%", "%%")}  # argparse %-formats help
        if param.default not in (inspect.Parameter.empty, None, False):
            kwargs["help"] += f" (default: {param.default})"
        if typing.get_origin(tp) is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif typing.get_origin(tp) is list and param.default is inspect.Parameter.empty:
            kwargs.update(type=typing.get_args(tp)[0], nargs="+")  # positional list: one or more
        elif typing.get_origin(tp) is list:
            kwargs.update(type=typing.get_args(tp)[0], action="append")  # option list: repeat the flag
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _none_or(tp) if tp is not hints[name] else tp
        flag = "--" + name.replace("_", "-")
        if param.kind is inspect.Parameter.VAR_POSITIONAL:  # everything after the positionals, as given
            parser.add_argument(name, nargs=argparse.REMAINDER, help=kwargs["help"])
            continue
        if param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is inspect.Parameter.empty:
            parser.add_argument(flag, dest=name, required=True, **kwargs)  # keyword-only: a required option
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(name, **kwargs)
        else:
            parser.add_argument(flag, dest=name, default=param.default, **kwargs)
    parser.set_defaults(_fn=fn)


def _call(fn: Callable, args: dict) -> object:
    """Call a command with parsed arguments; a *varargs parameter takes the positionals before it in order."""
    params = list(inspect.signature(fn).parameters.values())
    star = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if star is None:
        return fn(**args)
    positional = [args.pop(p.name) for p in params[:star]] + list(args.pop(params[star].name) or [])
    return fn(*positional, **args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longboi", description="An LLM foundry for MPT-style models.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    for fn in COMMANDS:
        _add_command(sub, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    fn = args.pop("_fn")
    try:
        _call(fn, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
