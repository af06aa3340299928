"""Evaluation during training: held-out loss and bits per byte (against a unigram floor), ICL tasks, and
samples from fixed prompts. Every rank takes part (FSDP needs all of them for each forward); rank 0 logs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from longboi.data.stream import StreamingDataset, StreamLoader
from longboi.generate import SamplingParams, generate
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer
from longboi.train.config import TrainConfig
from longboi.train.monitor import Metrics
from longboi.train.parallelize import Dist, all_gather_objects, all_reduce_mean, anyone, full_weights


@torch.no_grad()
def evaluate(
    wrapped, model: MPTForCausalLM, tok: Tokenizer, cfg: TrainConfig, d: Dist, metrics: Metrics, step: int, autocast
) -> dict:
    """Validation loss/perplexity/bits per byte on the held-out split, and samples from the fixed prompts."""
    wrapped.eval()
    results: dict = {}
    if cfg.data is not None and cfg.data.val:
        val_loss, bpb = validation_loss(wrapped, tok, cfg, d, autocast)
        baseline = unigram_baseline(cfg, tok)
        results = {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50)),
            "val_bpb": bpb,
            "unigram_val_loss": baseline[0],
            "unigram_val_bpb": baseline[1],
        }
        metrics.log("eval", step, **results)
    if cfg.eval.icl_tasks:  # in-context-learning tasks: each rank scores its share, rank 0 logs
        from longboi.eval.harness import evaluate as run_icl
        from longboi.eval.harness import load_tasks
        from longboi.eval.scoring import Share

        share = Share(d.rank, d.world_size, lambda value: all_gather_objects(value, d))
        with autocast, full_weights(model):  # FSDP: whole weights on each rank, so ranks need not run in step
            icl, skipped = run_icl(
                model,
                tok,
                load_tasks(cfg.eval.icl_tasks),
                cfg.eval.icl_data_root,
                limit=cfg.eval.icl_limit,
                time_budget_s=cfg.eval.icl_time_budget_s,
                anyone=lambda flag: anyone(flag, d),  # ranks' clocks differ: they skip or run a task together
                share=share,
            )
        scores = {f"{r.label}/{r.num_fewshot}-shot": r.accuracy for r in icl}
        metrics.log("icl", step, **scores, seconds=sum(r.seconds for r in icl), skipped=skipped)
        results.update({f"icl/{k}": v for k, v in scores.items()})
    if cfg.eval.prompts:  # every rank generates (FSDP needs all of them for each forward); rank 0 logs
        params = SamplingParams(
            max_new_tokens=cfg.eval.max_new_tokens,
            temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k,
            seed=cfg.seed,
        )
        together = lambda flag: anyone(flag, d)  # noqa: E731  # every rank stops generating at the same step
        with autocast:
            texts = generate(model, tok, list(cfg.eval.prompts), params, together)  # FSDP2 shards `model` in place
        metrics.log("samples", step, samples=dict(zip(cfg.eval.prompts, texts)))
    wrapped.train()
    return results


def validation_loss(wrapped, tok: Tokenizer, cfg: TrainConfig, d: Dist, autocast) -> tuple[float, float]:
    """Mean loss per token (nats) and bits per byte (comparable across tokenizers) on the held-out split."""
    val, batch, n = validation_set(cfg, d)
    sums = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    for b in StreamLoader(val, batch, batch // d.world_size, d.rank, d.world_size, stop=n * batch):
        targets = b[:, 1:]
        with autocast:
            logits = wrapped(b[:, :-1].to(d.device))
        nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().to(d.device), reduction="sum")
        text_bytes = sum(len(tok.decode(row.tolist(), skip_special_tokens=False).encode()) for row in targets)
        sums += torch.tensor([float(nats), targets.numel(), text_bytes], dtype=torch.float64)
    sums = all_reduce_mean(sums, d)  # equal shares per rank: the mean of sums keeps the ratios
    return float(sums[0] / sums[1]), float(sums[0] / math.log(2) / sums[2])


VAL_ROWS = 8  # validation rows per batch and rank


def validation_set(cfg: TrainConfig, d: Dist) -> tuple[StreamingDataset, int, int]:
    """The held-out split, the global batch it is read in, and how many batches are scored."""
    assert cfg.data is not None and cfg.data.val
    val = StreamingDataset(cfg.data.val, seed=0, shuffle=False, cache=cfg.data.cache)
    # A fixed number of rows per batch, not the training micro-batch: which samples are scored (and so
    # the figure) must not change with the batch size chosen for training.
    batch = VAL_ROWS * d.world_size
    return val, batch, min(cfg.eval.val_batches, max(1, len(val) // batch))


_UNIGRAM: dict[tuple, tuple[float, float]] = {}


def unigram_baseline(cfg: TrainConfig, tok: Tokenizer, max_tokens: int = 50_000_000) -> tuple[float, float]:
    """Validation loss and bits per byte of a unigram model fit on the training split (add-one smoothed):
    the floor a language model must clearly beat."""
    key = (tuple(s.path for s in cfg.data.sources), cfg.data.val)
    if key not in _UNIGRAM:
        counts = np.zeros(cfg.model.vocab_size, dtype=np.float64)
        for source in StreamingDataset(cfg.data.sources, shuffle=False, cache=cfg.data.cache).data:
            seen = 0
            for shard in range(len(source.index.shards)):
                tokens = np.asarray(source.reader(shard).tokens)
                counts += np.bincount(tokens, minlength=len(counts))[: len(counts)]
                seen += len(tokens)
                if seen > max_tokens:
                    break
        logp = np.log((counts + 1) / (counts.sum() + tok.vocab_size))
        val = StreamingDataset(cfg.data.val, shuffle=False, cache=cfg.data.cache).data[0]
        nats, n_tokens, n_bytes = 0.0, 0, 0
        for shard in range(len(val.index.shards)):
            tokens = np.asarray(val.reader(shard).tokens)
            nats -= float(logp[tokens].sum())
            n_tokens += len(tokens)
            n_bytes += len(tok.decode(tokens.tolist(), skip_special_tokens=False).encode())
        _UNIGRAM[key] = (nats / n_tokens, nats / math.log(2) / n_bytes)
    return _UNIGRAM[key]
