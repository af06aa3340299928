"""Scoring requests against a model: log-likelihoods (with greedy flags) and greedy generation.

Speed without changing the numbers: requests are sorted by length and batched; continuations that
share a context (multiple choice) reuse one forward pass of the context through the KV cache;
contexts are truncated from the left so context + continuation fits `max_seq_len`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from longboi.generate import SamplingParams, generate_from_ids
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer


def _alone(value: Any) -> list:
    return [value]


@dataclass(frozen=True)
class Share:
    """Which examples this process scores, and how every process's outcomes meet. One process by
    default; under torchrun each rank takes its share of every task (balanced by tokens) and `gather`
    (an all-gather of picklable objects) hands everyone's outcomes to all, so all ranks report the same
    scores, computed in example order as one process computes them. A rank batches only its share, so
    logits may differ from one process's in the last bits: equal scores in fp32 (tested), while an
    argmax near-tie in bf16 can flip."""

    rank: int = 0
    world_size: int = 1
    gather: Callable[[Any], list] = _alone


ALONE = Share()


def balanced(costs: list[int], ranks: int) -> list[list[int]]:
    """Indices per rank: the costliest first, each to the least-loaded rank (ties: the lower rank), so
    loads differ by at most one example's cost; each rank's list in index order. The same on every rank."""
    loads, out = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += costs[i]
    return [sorted(x) for x in out]


@dataclass(frozen=True)
class LLRequest:
    """Log-likelihood of `continuation` token ids following `context` token ids."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class LLResult:
    logprob: float  # sum over continuation tokens (natural log)
    greedy: bool  # every continuation token is the argmax at its position
    n_tokens: int


def truncate(req: LLRequest, max_len: int) -> LLRequest:
    """Drop context tokens from the left so the sequence fits (the continuation is kept whole)."""
    keep = max(0, max_len - len(req.continuation))
    context = req.context[-keep:] if keep else ()
    if not context:  # the model needs at least one token to predict the first continuation token
        raise ValueError(f"continuation of {len(req.continuation)} tokens does not fit max_seq_len {max_len}")
    return LLRequest(context, req.continuation[-(max_len - len(context)) :])


@torch.no_grad()
def loglikelihoods(
    model: MPTForCausalLM,
    requests: list[LLRequest],
    max_seq_len: int,
    batch_tokens: int = 8192,
    progress: Callable[[int], None] | None = None,
) -> list[LLResult]:
    """Results in request order. Groups sharing a context are scored with one context forward."""
    requests = [truncate(r, max_seq_len) for r in requests]
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.context].append(i)
    results: list[LLResult | None] = [None] * len(requests)
    singles = [idx[0] for ctx, idx in groups.items() if len(idx) == 1]
    for ctx, idx in groups.items():
        if len(idx) > 1:
            for i, res in zip(idx, _shared_context(model, ctx, [requests[i].continuation for i in idx])):
                results[i] = res
            if progress:
                progress(len(idx))
    singles.sort(key=lambda i: -(len(requests[i].context) + len(requests[i].continuation)))
    start = 0
    while start < len(singles):
        width = len(requests[singles[start]].context) + len(requests[singles[start]].continuation)
        n = max(1, batch_tokens // width)
        batch = singles[start : start + n]
        for i, res in zip(batch, _full_sequences(model, [requests[i] for i in batch])):
            results[i] = res
        if progress:
            progress(len(batch))
        start += n
    return results  # type: ignore[return-value]


def _score(logits: torch.Tensor, targets: torch.Tensor) -> LLResult:
    """logits (n, V) predicting targets (n,)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    total = logprobs.gather(1, targets[:, None]).sum()
    greedy = bool((logits.argmax(dim=-1) == targets).all())
    return LLResult(float(total), greedy, len(targets))


def _full_sequences(model: MPTForCausalLM, requests: list[LLRequest]) -> list[LLResult]:
    """Right-padded batch of context+continuation; causal attention never sees the padding on the right."""
    seqs = [list(r.context) + list(r.continuation) for r in requests]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
    spans = [(len(r.context) - 1, len(r.context) + len(r.continuation) - 1) for r in requests]
    wanted = torch.zeros_like(ids, dtype=torch.bool)
    for row, (start, end) in enumerate(spans):
        wanted[row, start:end] = True
    logits = model(ids, logits_mask=wanted)  # (N, V): the LM head only where a continuation is scored
    out, at = [], 0
    for row, (start, end) in enumerate(spans):
        out.append(_score(logits[at : at + end - start], ids[row, start + 1 : end + 1]))
        at += end - start
    return out


def _shared_context(model: MPTForCausalLM, context: tuple[int, ...], continuations: list[tuple[int, ...]]):
    """One forward of the context; its KV cache, repeated per continuation, scores all continuations."""
    device = next(model.parameters()).device
    n, width = len(continuations), max(len(c) for c in continuations)
    cache = model.new_cache(len(context) + width)
    ctx_logits = model(torch.tensor([context], device=device), cache=cache, logits_to_keep=1)[0, -1]  # (V,)
    cache.repeat_rows(n)  # (L, n, Hkv, capacity, D): the context's keys/values for every continuation
    ids = torch.zeros(n, width, dtype=torch.long, device=device)
    for row, c in enumerate(continuations):
        ids[row, : len(c)] = torch.tensor(c)
    wanted = torch.zeros_like(ids, dtype=torch.bool)  # position t predicts continuation token t + 1
    for row, c in enumerate(continuations):
        wanted[row, : len(c) - 1] = True
    logits = model(ids, cache=cache, logits_mask=wanted)  # (N, V)
    out, at = [], 0
    for row, c in enumerate(continuations):
        steps = torch.cat([ctx_logits[None], logits[at : at + len(c) - 1]])  # predictions of each token of c
        out.append(_score(steps, ids[row, : len(c)]))
        at += len(c) - 1
    return out


def greedy_generate(
    model: MPTForCausalLM,
    tok: Tokenizer,
    prompts: list[list[int]],
    until: list[str],
    max_new_tokens: int,
    max_seq_len: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of tokenized prompts, cut at the first stop string; prompts are truncated
    from the left so prompt + generation fits max_seq_len. Similar lengths are batched together."""
    limit = max(1, max_seq_len - max_new_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=tuple(until))
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        outs = generate_from_ids(model, tok, [prompts[i][-limit:] for i in batch], params)
        texts.update(zip(batch, outs))
    return [texts[i] for i in range(len(prompts))]
