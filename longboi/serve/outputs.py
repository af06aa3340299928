"""What a step's logits become: each choice's sampled token (its grammar's mask, penalties and sampling
filters applied per row) and, where asked, log-probabilities with the most likely alternatives; and the
scores of prompt tokens (echo). Pure functions of the logits and the choices' own state: the engine calls
them; nothing here knows about queues, threads or the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longboi.generate import pick, process_logits
from longboi.serve.structured import mask_logits


@dataclass(frozen=True)
class TokenInfo:
    """One token and, when asked for, its log-probability and the most likely alternatives."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


def sample(seqs: list, logits: torch.Tensor, vocab: int) -> list[tuple[int, TokenInfo]]:
    """(rows, V) logits -> each row's token and its log-probability information."""
    logits = logits.float()
    wants_logprobs = any(s.job.logprobs is not None for s in seqs)
    allowed = logits.clone() if wants_logprobs else logits  # log-probabilities are over the raw logits
    allowed[:, vocab:] = float("-inf")  # the padded vocab is never sampled
    if any(s.matcher is not None for s in seqs):
        mask_logits(allowed, [s.matcher for s in seqs])
    params = [s.params for s in seqs]
    counts = seen = None
    if any(s.counts is not None for s in seqs):
        zeros = torch.zeros(logits.shape[-1], device=logits.device)
        counts = torch.stack([s.counts if s.counts is not None else zeros for s in seqs])
        seen = torch.stack([s.prompt_seen if s.prompt_seen is not None else zeros.bool() for s in seqs])
    processed = process_logits(allowed, params, counts, seen)
    tokens = pick(processed, params, [s.generator for s in seqs]).tolist()
    return list(zip(tokens, token_infos(seqs, logits, tokens, vocab)))


def token_infos(seqs: list, logits: torch.Tensor, tokens: list[int], vocab: int) -> list[TokenInfo]:
    """Log-probabilities of the sampled tokens under the model (before any sampling filter), for
    the rows that asked for them."""
    wanted = [i for i, s in enumerate(seqs) if s.job.logprobs is not None]
    infos = [TokenInfo(t) for t in tokens]
    if wanted:
        top = max(seqs[i].job.logprobs for i in wanted)
        infos_wanted = scored(logits[wanted], [tokens[i] for i in wanted], top, vocab)
        for i, info in zip(wanted, infos_wanted):
            infos[i] = TokenInfo(info.id, info.logprob, info.top[: seqs[i].job.logprobs])
    return infos


def scored(logits: torch.Tensor, targets: list[int], top: int, vocab: int) -> list[TokenInfo]:
    """(N, V) logits -> each target's log-probability and the `top` most likely alternatives.

    Over the whole (padded) vocabulary, as `longboi eval` and transformers score; alternatives come
    from the tokenizer's ids only."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None]).squeeze(1).tolist()
    alternatives = [[]] * len(targets)
    if top > 0:
        values, ids = logprobs[:, :vocab].topk(top, dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [TokenInfo(t, lp, tuple(a)) for t, lp, a in zip(targets, chosen, alternatives)]
