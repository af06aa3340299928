"""Perplexity and bits per byte of a model on a text file or a prepared dataset split.

Windows of `seq_len` tokens (any length: ALiBi models may go past their trained max_seq_len, which is
how long-context claims are checked), optionally overlapping with `stride` so every scored token
has at least seq_len - stride tokens of context.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longboi.errors import UserError
from longboi.eval.scoring import ALONE, Share
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer


@dataclass(frozen=True)
class PerplexityResult:
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def load_tokens(source: str, tok: Tokenizer) -> np.ndarray:
    """Token ids of a text file, or of every sample of a prepared split (a directory with index.json)."""
    path = Path(source)
    if (path / "index.json").is_file():
        from longboi.data.stream import StreamingDataset

        data = StreamingDataset(source, shuffle=False).data[0]
        if data.index.tokenizer_sha256 != tok.sha256():
            raise UserError(f"{source} was prepared with a different tokenizer than the model's")
        return np.concatenate([np.asarray(data.reader(s).tokens) for s in range(len(data.index.shards))])
    if not path.is_file():
        raise UserError(f"not a text file or prepared dataset: {source}")
    return np.asarray(tok.encode(path.read_text()), dtype=np.int64)


@torch.no_grad()
def perplexity(
    model: MPTForCausalLM,
    tok: Tokenizer,
    tokens: np.ndarray,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
    progress: bool = True,
    share: Share = ALONE,
) -> PerplexityResult:
    """Score every token after the first with up to seq_len - 1 tokens of context. Several processes
    (`share`) each score every world_size-th batch and gather the sums: the same result, sooner."""
    stride = stride or seq_len - 1  # windows overlap by one token, so each window's first target has context
    if not 0 < stride < seq_len:
        raise UserError(f"stride must be in (0, seq_len={seq_len}), got {stride}")
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < 2:
        raise UserError("need at least 2 tokens to measure perplexity")
    device = next(model.parameters()).device
    # Window w covers tokens [start, start + seq_len); it scores the targets not scored before.
    windows = []
    scored_to = 0
    for start in range(0, len(tokens) - 1, stride):
        end = min(start + seq_len, len(tokens))
        windows.append((start, end, max(scored_to, start + 1) - start))
        scored_to = end
        if end == len(tokens):
            break
    begin = time.perf_counter()
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    mine = range(share.rank, len(batches), share.world_size)  # round robin: the batches one process forms
    scored = {}
    for j in tqdm(mine, desc="perplexity", disable=not progress):
        scored[j] = _score_batch(model, tokens, batches[j], device)
    everyone: dict[int, list[tuple[float, int]]] = {}
    for part in share.gather(scored):
        everyone.update(part)
    nats, count = 0.0, 0
    for j in range(len(batches)):  # summed in window order, as one process sums: the same float
        for window_nats, n in everyone[j]:
            nats += window_nats
            count += n
    seconds = time.perf_counter() - begin
    text_bytes = len(tok.decode(tokens[1:].tolist(), skip_special_tokens=False).encode())
    loss = nats / count
    return PerplexityResult(loss, math.exp(min(loss, 50)), nats / math.log(2) / max(text_bytes, 1), count, seconds)


def _score_batch(model: MPTForCausalLM, tokens: np.ndarray, group: list, device) -> list[tuple[float, int]]:
    """(nats, scored tokens) of each window of one batch."""
    width = max(e - s for s, e, _ in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    for row, (s, e, _) in enumerate(group):
        ids[row, : e - s] = torch.from_numpy(tokens[s:e].astype(np.int64))
    ids = ids.to(device)
    logits = model(ids[:, :-1])
    out = []
    for row, (s, e, first) in enumerate(group):
        targets = ids[row, first : e - s]
        nats = F.cross_entropy(logits[row, first - 1 : e - s - 1].float(), targets, reduction="sum")
        out.append((float(nats), len(targets)))
    return out
