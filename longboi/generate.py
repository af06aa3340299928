"""Text generation: sampling, stop strings, streaming, and batches of different-length prompts.

Prompts are left-padded into one batch, prefilled through the KV cache in chunks (so a prompt far
past `max_seq_len` never needs a (T x T) tensor), then decoded one token per step. Sampling applies,
in Hugging Face's order: repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from longboi.errors import UserError
from longboi.model import MPTForCausalLM
from longboi.tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK = 2048  # prompt tokens per forward when prompts are padded: bounds the bias memory


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k None (or 0) and top_p None (or 1) do not
    filter; stop strings end a row's text (not included). Checked on construction: a bad value is a
    one-line UserError naming the field, wherever it came from (CLI, API, server request)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        self._check("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "an integer >= 0")
        self._check("temperature", _is_real(self.temperature) and 0 <= self.temperature < math.inf, "a number >= 0")
        self._check("top_k", self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0), "an integer >= 0 or none")
        top_p_ok = self.top_p is None or (_is_real(self.top_p) and 0 < self.top_p <= 1)
        self._check("top_p", top_p_ok, "a number in (0, 1] or none")
        penalty_ok = _is_real(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf
        self._check("repetition_penalty", penalty_ok, "a number > 0 (1 is off)")
        stops_ok = isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop)
        self._check("stop", stops_ok, "a list of non-empty strings")
        self._check("seed", self.seed is None or _is_int(self.seed), "an integer or none")
        if self.top_k == 0:  # 0 means no limit (as in transformers and llama.cpp)
            object.__setattr__(self, "top_k", None)
        object.__setattr__(self, "stop", tuple(self.stop))

    def _check(self, field: str, ok: bool, expected: str) -> None:
        if not ok:
            raise UserError(f"sampling parameter {field}: expected {expected}, got {getattr(self, field)!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def process_logits(logits: torch.Tensor, context: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) fp32 logits after penalty, temperature and top-k/top-p filtering."""
    logits = logits.float()
    if p.repetition_penalty != 1.0:  # CTRL-style: push down every token already in the context
        seen = logits.gather(1, context)
        logits = logits.scatter(
            1, context, torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        )
    if p.temperature == 0:
        return logits
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - p.top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def pick(logits: torch.Tensor, p: SamplingParams, generators: list[torch.Generator] | None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids. With a seed, each row draws from its own generator,
    so a row samples the same tokens alone or in any batch."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids and (B, T) attention mask, padded on the left so all rows end together."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(
    model: MPTForCausalLM,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_id: int | None,
    valid_vocab: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token ids, one step at a time, until every row hit EOS or max_new_tokens.

    valid_vocab: ids at or above it (the padded part of the vocab) are never sampled. A row that
    has finished keeps receiving `eos_id`; callers ignore it. use_cache=False recomputes the whole
    sequence each step (the reference the cached path is tested against).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    _check_length(model, prompts, params)
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    first = ids.gather(1, mask.argmax(dim=1, keepdim=True))  # (B, 1) each row's first real token
    generators = None if params.seed is None else [torch.Generator(device).manual_seed(params.seed) for _ in prompts]
    cache = model.new_cache(ids.shape[1] + params.max_new_tokens) if use_cache else None
    logits = _prefill(model, ids, mask, cache)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(params.max_new_tokens):
        if valid_vocab is not None:
            logits[:, valid_vocab:] = float("-inf")
        context = torch.where(mask.bool(), ids, first)  # pads stand in as a real token: never penalized
        token = pick(process_logits(logits, context, params), params, generators)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        yield token
        if bool(done.all()) or step == params.max_new_tokens - 1:  # no forward for a token never sampled
            return
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        step_input = token[:, None] if cache is not None else ids
        logits = model(step_input, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]


def _check_length(model: MPTForCausalLM, prompts: list[list[int]], params: SamplingParams) -> None:
    """Learned position embeddings stop at max_seq_len (ALiBi models run past it)."""
    cfg = model.config
    longest = max(len(p) for p in prompts)
    if cfg.learned_pos_emb and longest + params.max_new_tokens > cfg.max_seq_len:
        raise UserError(
            f"a prompt of {longest} tokens plus max_new_tokens {params.max_new_tokens} exceeds this model's "
            f"max_seq_len {cfg.max_seq_len} (learned position embeddings cannot extrapolate): use at most "
            f"{max(cfg.max_seq_len - longest, 0)} new tokens or a shorter prompt"
        )


def _prefill(model: MPTForCausalLM, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt and return (B, V) logits of its last position.

    Unpadded prompts go in one forward: the causal fast path builds no (T x T) tensor at any
    length. Padded batches need an explicit bias per query row, so they go in chunks.
    """
    if cache is None or bool(mask.all()):
        return model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    for start in range(0, ids.shape[1], PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, ids.shape[1])
        logits = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, logits_to_keep=1)
    return logits[:, -1]


class _RowText:
    """One row's generated text: incremental decoding, stop strings, and the safe-to-print part."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1  # a stop string may be half-written
        self.text, self.printed, self.done = "", 0, False

    def push(self, token_id: int) -> None:
        self._add(self.decoder.push(token_id))

    def finish(self) -> None:
        """Add what the decoder held back (an incomplete character at the very end)."""
        if not self.done:
            self._add(self.decoder.flush())

    def _add(self, piece: str) -> None:
        self.text += piece
        for s in self.stop:
            at = self.text.find(s, max(0, self.printed - len(s)))
            if at >= 0:
                self.text, self.done = self.text[:at], True

    def take_printable(self, final: bool) -> str:
        if final:
            self.finish()
        end = len(self.text) if (final or self.done) else max(self.printed, len(self.text) - self.holdback)
        piece, self.printed = self.text[self.printed : end], end
        return piece


def stream(model: MPTForCausalLM, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the completion of `prompt` as text pieces, as soon as they are final."""
    row = _RowText(tokenizer, params.stop)
    for token in generate_ids(
        model, [tokenizer.encode(prompt)], params, tokenizer.eos_id, tokenizer.vocab_size, tokenizer.pad_id
    ):
        if token.item() == tokenizer.eos_id:
            break
        row.push(int(token.item()))
        piece = row.take_printable(final=False)
        if piece:
            yield piece
        if row.done:
            return
    tail = row.take_printable(final=True)
    if tail:
        yield tail


def generate(model: MPTForCausalLM, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams) -> list[str]:
    """Completions for a batch of prompts (any lengths), in order."""
    return generate_from_ids(model, tokenizer, tokenizer.encode_batch(prompts), params)


def generate_from_ids(
    model: MPTForCausalLM, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams
) -> list[str]:
    """Completions (text) of already-tokenized prompts, e.g. left-truncated ones, in order."""
    rows = [_RowText(tokenizer, params.stop) for _ in prompts]
    ended = [False] * len(prompts)
    for tokens in generate_ids(model, prompts, params, tokenizer.eos_id, tokenizer.vocab_size, tokenizer.pad_id):
        for i, token in enumerate(tokens.tolist()):
            if ended[i] or token == tokenizer.eos_id:
                ended[i] = True
                continue
            rows[i].push(token)
            ended[i] = rows[i].done
        if all(ended):
            break
    for row in rows:
        row.finish()
    return [row.text for row in rows]
