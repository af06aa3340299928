"""Text generation: sampling, stop strings, streaming, and batches of different-length prompts.

Prompts are left-padded into one batch, prefilled through the KV cache in chunks (so a prompt far
past `max_seq_len` never needs a (T x T) tensor), then decoded one token per step. Sampling applies,
in Hugging Face's order: repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from longboi.errors import UserError
from longboi.model import MPTForCausalLM
from longboi.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from longboi.compiled import CompiledDecoder

PREFILL_CHUNK = 2048  # prompt tokens per forward when prompts are padded: bounds the bias memory
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer (as vLLM takes); a choice draws from seed + its index
# Temperatures in (0, MIN_TEMPERATURE) sample at MIN_TEMPERATURE: dividing logits by 1e-45 overflows
# to inf and the softmax to NaN; at 1e-5 sampling is already the argmax but for exact ties.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k None (or 0) and top_p None (or 1) do not
    filter; stop strings end a row's text (not included). Penalties: repetition (CTRL-style, divides
    the logit of a token seen in the prompt or the output), presence and frequency (OpenAI's, counted
    over the generated tokens only, as vLLM does: subtract per token generated / per occurrence);
    logit_bias adds to given token ids. Checked on construction: a bad value is a one-line UserError
    naming the field, wherever it came from (CLI, API, server request)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        self._check("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "an integer >= 0")
        self._check("temperature", _is_real(self.temperature) and 0 <= self.temperature < math.inf, "a number >= 0")
        self._check("top_k", self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0), "an integer >= 0 or none")
        top_p_ok = self.top_p is None or (_is_real(self.top_p) and 0 < self.top_p <= 1)
        self._check("top_p", top_p_ok, "a number in (0, 1] or none")
        # bounded: a penalty of 1e-300 is 0 in fp32, and a logit divided by it is inf (NaN after softmax)
        penalty_ok = _is_real(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 100
        self._check("repetition_penalty", penalty_ok, "a number in [0.01, 100] (1 is off)")
        for name in ("presence_penalty", "frequency_penalty"):
            self._check(name, _is_real(getattr(self, name)) and abs(getattr(self, name)) <= 2, "a number in [-2, 2]")
        stops_ok = isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop)
        self._check("stop", stops_ok, "a list of non-empty strings")
        seed_ok = self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1])
        self._check("seed", seed_ok, "a signed 64-bit integer or none")
        bias_ok = all(_is_int(i) and i >= 0 and _is_real(b) and abs(b) <= 100 for i, b in self.logit_bias)
        self._check("logit_bias", bias_ok, "token ids >= 0 mapped to numbers in [-100, 100]")
        if self.top_k == 0:  # 0 means no limit (as in transformers and llama.cpp)
            object.__setattr__(self, "top_k", None)
        object.__setattr__(self, "stop", tuple(self.stop))

    def _check(self, field: str, ok: bool, expected: str) -> None:
        if not ok:
            raise UserError(f"sampling parameter {field}: expected {expected}, got {getattr(self, field)!r}")

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the counts of tokens generated so far."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (ids, values) tensors, built once per request, not once per step."""
        ids = torch.tensor([i for i, _ in self.logit_bias], dtype=torch.long)
        return ids, torch.tensor([b for _, b in self.logit_bias], dtype=torch.float32)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generated: torch.Tensor | None,
    prompt_seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) fp32 logits after penalties, logit bias, temperature, top-k and top-p,
    each row by its own params (so requests with different settings share one batch).

    generated: (B, V) occurrences of each token among the row's generated tokens, needed when any row is
    penalized; prompt_seen: (B, V) bool, the tokens of the row's prompt (the repetition penalty counts
    them too, as transformers and vLLM do; presence and frequency penalties do not, as in vLLM).
    Order as in Hugging Face: penalty, temperature, top-k, top-p.
    """
    logits, col = logits.float(), _column(logits.device)
    if generated is not None:
        produced = generated > 0
        seen = produced if prompt_seen is None else produced | prompt_seen
        rep = col([p.repetition_penalty for p in params])  # CTRL-style: push down every token already seen
        logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
        logits = logits - col([p.frequency_penalty for p in params]) * generated
        logits = logits - col([p.presence_penalty for p in params]) * produced
    logits = _add_logit_bias(logits, params)
    if all(p.temperature == 0 for p in params):
        return logits  # greedy rows take the argmax; filtering would keep it anyway
    logits = logits / col([max(p.temperature, MIN_TEMPERATURE) if p.temperature else 1.0 for p in params])
    ks = [p.top_k if p.top_k is not None and p.top_k < logits.shape[-1] else 0 for p in params]
    if any(ks):
        top = torch.topk(logits, max(ks), dim=-1).values  # (B, k_max), descending
        kth = top.gather(1, torch.tensor([[max(k, 1) - 1] for k in ks], device=logits.device))
        kth = kth.masked_fill(col(ks) == 0, float("-inf"))  # rows without top-k keep everything
        logits = logits.masked_fill(logits < kth, float("-inf"))
    ps = [p.top_p if p.top_p is not None else 1.0 for p in params]
    if any(x < 1 for x in ps):
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cumulative <= 1 - col(ps)) & (col(ps) < 1)
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def _add_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Every row's logit_bias in one indexed add (a request may bias hundreds of ids)."""
    rows = [r for r, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    ids = torch.cat([params[r].bias_tensors[0] for r in rows]).to(logits.device)
    values = torch.cat([params[r].bias_tensors[1] for r in rows]).to(logits.device)
    row_of = torch.repeat_interleave(torch.tensor(rows), torch.tensor([len(params[r].logit_bias) for r in rows]))
    return logits.index_put((row_of.to(logits.device), ids), values, accumulate=True)


def _column(device: torch.device) -> Callable[[list], torch.Tensor]:
    """Per-row values -> a (B, 1) fp32 column that broadcasts over the vocabulary."""
    return lambda values: torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def pick(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None] | None
) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax for greedy rows, a draw for the others. A row
    with a generator draws from it alone, so it samples the same tokens alone or in any batch."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    probs = logits[rows].softmax(dim=-1)
    if generators is None:
        tokens[rows] = torch.multinomial(probs, 1).squeeze(1)
        return tokens
    for j, i in enumerate(rows):
        tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i]).squeeze()
    return tokens


def token_counts(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T) ids and (B, T) weights (0 for padding) -> (B, vocab) fp32 occurrence counts."""
    counts = torch.zeros(ids.shape[0], vocab, device=ids.device)
    return counts.scatter_add_(1, ids, weights.float())


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
    together: Callable[[bool], bool] = bool,
    decoder: CompiledDecoder | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B,) next-token ids, one step at a time, until every row hit EOS or max_new_tokens.

    valid_vocab: ids at or above it (the padded part of the vocab) are never sampled. A row that
    has finished keeps receiving `eos_id`; callers ignore it. use_cache=False recomputes the whole
    sequence each step (the reference the cached path is tested against). together: makes the
    early-stop decision the same on every rank when the model is sharded (each forward is a collective).
    decoder: runs the decode steps compiled (`longboi.compiled`); the prefill stays eager.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    _check_length(model, prompts, params)
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    seed = None if params.seed is None else params.seed % 2**64  # torch takes [-2^63, 2^64): one form for both
    generators = None if seed is None else [torch.Generator(device).manual_seed(seed) for _ in prompts]
    cache = model.new_cache(ids.shape[1] + params.max_new_tokens) if use_cache else None
    logits = _prefill(model, ids, mask, cache)
    key_valid = F.pad(mask.bool(), (0, params.max_new_tokens), value=True) if decoder is not None else None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    rows = [params] * len(prompts)
    counts = torch.zeros(len(prompts), logits.shape[-1], device=device) if params.penalized else None
    prompt_seen = token_counts(ids, mask, logits.shape[-1]) > 0 if params.penalized else None  # pads never seen
    for step in range(params.max_new_tokens):
        if valid_vocab is not None:
            logits[:, valid_vocab:] = float("-inf")
        token = pick(process_logits(logits, rows, counts, prompt_seen), rows, generators)
        if counts is not None:
            counts[torch.arange(len(prompts)), token] += 1
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        yield token
        if together(bool(done.all())) or step == params.max_new_tokens - 1:  # no forward for a token never sampled
            return
        if decoder is not None and cache is not None:  # its static cache needs no growing ids or mask
            logits = decoder(token[:, None], cache, key_valid)
            continue
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


def stream(
    model: MPTForCausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    params: SamplingParams,
    decoder: CompiledDecoder | None = None,
) -> Iterator[str]:
    """Yield the completion of `prompt` as text pieces, as soon as they are final."""
    row = _RowText(tokenizer, params.stop)
    eos, vocab, pad = tokenizer.eos_id, tokenizer.vocab_size, tokenizer.pad_id
    for token in generate_ids(model, [tokenizer.encode(prompt)], params, eos, vocab, pad, decoder=decoder):
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


def generate(
    model: MPTForCausalLM,
    tokenizer: Tokenizer,
    prompts: list[str],
    params: SamplingParams,
    together: Callable[[bool], bool] = bool,
) -> list[str]:
    """Completions for a batch of prompts (any lengths), in order. together: see generate_ids."""
    return generate_from_ids(model, tokenizer, tokenizer.encode_batch(prompts), params, together)


def generate_from_ids(
    model: MPTForCausalLM,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    params: SamplingParams,
    together: Callable[[bool], bool] = bool,
) -> list[str]:
    """Completions (text) of already-tokenized prompts, e.g. left-truncated ones, in order."""
    rows = [_RowText(tokenizer, params.stop) for _ in prompts]
    ended = [False] * len(prompts)
    eos, vocab, pad = tokenizer.eos_id, tokenizer.vocab_size, tokenizer.pad_id
    for tokens in generate_ids(model, prompts, params, eos, vocab, pad, together=together):
        for i, token in enumerate(tokens.tolist()):
            if ended[i] or token == tokenizer.eos_id:
                ended[i] = True
                continue
            rows[i].push(token)
            ended[i] = rows[i].done
        if together(all(ended)):
            break
    for row in rows:
        row.finish()
    return [row.text for row in rows]
