"""Continuous batching: one engine thread owns the model and serves many requests at once.

The decisions are the scheduler's (longboi.serve.scheduler: which sequences compute how many tokens,
which wait, which give way when the paged KV cache runs out, which prompt blocks come from the prefix
cache); this module runs them. Each step is one forward over one row of tokens: every running
sequence's next token and pieces of several prompts, each sequence attending to its own blocks
(PagedCache). Then the positions that need logits go through the LM head together, prompts that are
in sample their first token (a request's n choices fork from one prompt), and the others sample.

A sequence's numbers do not depend on the batch: its prompt is cut in the same chunk-aligned pieces
whatever else runs, it attends only to its own keys with its own ALiBi offsets, and a seeded sequence
draws from its own generator. What batching can change is the last bits of a matmul (the BLAS picks
kernels by the number of rows), never which keys a row sees. A prefix-cache hit gives keys/values
computed in another request's pieces: equal to recomputing them up to that rounding.

No request can hurt another. A batched forward or sampling step that raises is rerun piece by piece,
so only the jobs whose own pieces fail are failed and every other sequence goes on. Every job is in
`jobs` from `submit` to its last event, so none can be lost between queues. Memory follows the work:
the cache holds the blocks of the tokens in use (and prefix blocks kept for reuse while nothing needs
the room), and an engine idle for `idle_release` seconds gives all of it back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from longboi.generate import SamplingParams, _RowText, token_counts
from longboi.model import MPTForCausalLM
from longboi.serve.kv_cache import PagedCache
from longboi.serve.metrics import Metrics
from longboi.serve.outputs import TokenInfo, sample, scored
from longboi.serve.scheduler import Piece, Scheduler, Seq
from longboi.serve.structured import Grammar, Grammars
from longboi.tokenizer import Tokenizer

if TYPE_CHECKING:
    from longboi.multilora import AdapterBank, Stack

log = logging.getLogger("longboi.serve")

BLOCK_SIZE = 16  # positions per KV-cache block (vLLM's default): small enough that little is wasted
STEP_TOKENS = 2048  # prompt tokens one step may compute (decodes come on top): vLLM's chunked-prefill default
MAX_ROOTS = 4096  # (adapter stack, cache salt) roots remembered; past that, the oldest is forgotten
IDLE_RELEASE_S = 0.5  # an engine idle this long frees its cache, prefix blocks included


class QueueFull(Exception):
    """More requests are waiting than the queue holds (the server answers 429)."""


@dataclass
class Event:
    """What a request's sink receives. `text` is final (a stop string cannot take it back);
    `tokens` are the tokens sampled since the last event; `finish_reason` ends choice `index`.
    The last event of a request has `done` set, after every choice finished; `error` fails it."""

    index: int = 0
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    prompt: list[TokenInfo] | None = None  # prompt tokens with log-probabilities (echo), sent first
    done: bool = False
    error: str | None = None
    usage: tuple[int, int] | None = None  # (prompt tokens, generated tokens), with done


@dataclass(eq=False)  # compared and hashed by identity: the engine keeps its jobs in a set
class Job:
    """One request: a tokenized prompt, n choices sampled with `params`."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    n: int = 1
    logprobs: int | None = None  # alternatives per generated token (0: only the chosen one's); None: off
    prompt_logprobs: int | None = None  # score the prompt too (its first token has none)
    ignore_eos: bool = False
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    ended: bool = False  # its last event was sent (done, failed or cancelled)
    first_token_at: float | None = None
    open_choices: int = 0
    generated: int = 0
    started: bool = False  # its prompt is in and its choices have forked
    prompt_info: list[TokenInfo] = field(default_factory=list)  # scored prompt tokens so far
    stack: Stack = ()  # LoRA adapters (and scales) applied to this request; () is the base model
    grammar: Grammar | None = None  # structured output: the compiled grammar each choice must follow
    cache_salt: str | None = None  # prefix-cache hits only between jobs of the same salt (and weights)


class Choice:
    """One choice of a job: its generated tokens, text, generator, and its scheduler sequence `seq`
    (prompt + generated tokens, KV blocks)."""

    def __init__(self, job: Job, index: int, tok: Tokenizer, vocab: int, device: torch.device, seq: Seq):
        self.job, self.index, self.params, self.seq = job, index, job.params, seq
        seq.owner = self
        self.tokens: list[int] = []
        self.pending: list[TokenInfo] = []  # sampled, not yet sent (their text is held back)
        self.text = _RowText(tok, job.params.stop)
        seed = job.params.seed
        self.generator = None if seed is None else torch.Generator(device).manual_seed((seed + index) % 2**64)
        self.finished = False
        self.matcher = None  # structured output: the choice's llguidance matcher (set by the engine)
        self.counts = self.prompt_seen = None
        if job.params.penalized:  # generated-token counts; the prompt's tokens for the repetition penalty
            prompt = torch.tensor([job.prompt], device=device)
            self.counts = torch.zeros(vocab, device=device)
            self.prompt_seen = token_counts(prompt, torch.ones_like(prompt), vocab)[0] > 0

    @property
    def length(self) -> int:
        return len(self.job.prompt) + len(self.tokens)


def kv_bytes_per_token(model: MPTForCausalLM) -> int:
    """KV-cache bytes one position of one sequence takes: keys and values of every layer."""
    cfg = model.config
    element = model.transformer.wte.weight.element_size()  # int8 models keep fp32 embeddings and caches
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * element


class Engine:
    """The request lifecycle and the step loop. `max_batch` sequences run together; `max_queue` jobs may
    wait; `kv_cache_bytes` (None: room for max_batch sequences of max_model_len) bounds the paged KV cache;
    `prefix_cache` False computes every prompt in full (for comparison)."""

    def __init__(
        self,
        model: MPTForCausalLM,
        tok: Tokenizer,
        max_batch: int = 64,
        max_queue: int = 256,
        max_model_len: int | None = None,
        prefill_chunk: int = 256,
        metrics: Metrics | None = None,
        kv_cache_bytes: int | None = None,
        prefix_cache: bool = True,
        step_tokens: int = STEP_TOKENS,
        idle_release: float = IDLE_RELEASE_S,
        bank: AdapterBank | None = None,
    ):
        self.model, self.tok = model.eval(), tok
        self.device = next(model.parameters()).device  # token ids, generators and counts live there too
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_model_len = max_model_len or model.config.max_seq_len
        self.metrics = metrics or Metrics()
        self.vocab = tok.vocab_size  # ids past it (the padded vocab) are never sampled
        self.kv_token_bytes, self.kv_cache_bytes = kv_bytes_per_token(model), kv_cache_bytes
        self.block_bytes = BLOCK_SIZE * self.kv_token_bytes
        per_row = -(-self.max_model_len // BLOCK_SIZE)
        blocks = kv_cache_bytes // self.block_bytes if kv_cache_bytes is not None else max_batch * per_row
        self.scheduler = Scheduler(blocks + 1, BLOCK_SIZE, max_batch, prefill_chunk, step_tokens)
        self.cache = PagedCache(model.config.n_layers, blocks + 1, BLOCK_SIZE)
        self.prefix_cache, self.idle_release = prefix_cache, idle_release
        self.bank = bank  # LoRA adapters requests may name (longboi.multilora); None: the base only
        self.grammars = Grammars(tok, model.config.vocab_size)  # structured output (response_format)
        self.roots: dict[tuple, int] = {}  # (adapter stack, cache salt) -> its prefix-cache root key
        self.waiting: deque[Job] = deque()  # submitted, not yet handed to the scheduler
        self.sequences: list[Choice] = []  # every choice the scheduler holds (running or waiting)
        self.jobs: set[Job] = set()  # every job from submit to its last event
        self.idle = True
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="longboi-engine", daemon=True)

    # -- the HTTP side ---------------------------------------------------------------------------

    def start(self) -> Engine:
        self.thread.start()
        return self

    def kv_bytes(self, n: int, prompt_tokens: int, max_tokens: int) -> int:
        """The most KV-cache memory a job of n choices can need (all of them at their longest): the
        prompt's full blocks once, each choice's other blocks."""
        final = self._final_length(prompt_tokens, max_tokens)
        shared = prompt_tokens // BLOCK_SIZE
        return (shared + n * (-(-final // BLOCK_SIZE) - shared)) * self.block_bytes

    def _final_length(self, prompt_tokens: int, max_tokens: int) -> int:
        return min(prompt_tokens + max_tokens, max(self.max_model_len, prompt_tokens + 1))

    def fitting_tokens(self, n: int, prompt_tokens: int, wanted: int) -> int:
        """The largest max_tokens up to `wanted` whose worst case fits the KV-cache limit (0: none)."""
        fits = lambda m: self.kv_cache_bytes is None or self.kv_bytes(n, prompt_tokens, m) <= self.kv_cache_bytes
        low, high = 0, wanted
        while low < high:  # kv_bytes grows with max_tokens
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low if fits(low) else 0

    @property
    def kv_held_bytes(self) -> int:
        """Bytes of KV-cache blocks in use or kept for prefix hits (0 once the idle engine released them)."""
        return self.scheduler.pool.held * self.block_bytes if self.cache.keys is not None else 0

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when `max_queue` jobs already wait."""
        if not job.prompt or job.n < 1 or job.n > self.max_batch:
            raise ValueError(f"a job needs at least one prompt token and 1 to {self.max_batch} choices")
        # a prompt may fill the window when nothing is generated (scoring needs no new position)
        room = 0 if job.params.max_new_tokens == 0 else 1
        if len(job.prompt) + room > self.max_model_len:
            raise ValueError(f"a prompt of {len(job.prompt)} tokens leaves no room under max_model_len")
        with self.wake:
            if len(self.waiting) + len(self.scheduler.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self.jobs.add(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """Forget a job (its client went away): its blocks are freed before the next step."""
        with self.wake:
            job.cancelled = True
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=30)

    @property
    def load(self) -> tuple[int, int]:
        """(running sequences, waiting jobs), for metrics and health."""
        return len(self.scheduler.running), len(self.waiting) + len(self.scheduler.waiting)

    # -- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.sequences):
                    if self.idle:
                        self.wake.wait()
                    elif not self.wake.wait(timeout=self.idle_release):
                        self._rest()  # idle long enough: give the memory back
                if self.stopping:
                    break
            try:
                self._step()
            except Exception as e:  # not one request's fault (those are failed alone): reset, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error: {type(e).__name__}: {e}")
        self._fail_all("server shutting down")

    def _step(self) -> None:
        self._drop_cancelled()
        self._take_new()
        hits = self.scheduler.pool.hits
        plan = self.scheduler.schedule()
        self.metrics.count("preemptions", len(plan.preempted))
        self.metrics.count("prefix_cache_hit_tokens", self.scheduler.pool.hits - hits)
        if plan.pieces:
            self.idle = False
            self._run(plan.pieces)
        elif self.scheduler.waiting and not self.scheduler.running:  # the head cannot fit even alone
            self._refuse(self.scheduler.waiting[0].owner.job)
        self._sweep()

    def _rest(self) -> None:
        """Nothing in flight for a while: give the KV cache and the allocator's free pages back."""
        self.idle = True
        self.cache.release()
        self.scheduler.reset_cache()
        self.roots.clear()  # nothing is cached under them any more
        _trim_heap()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the caching allocator's blocks go back to the GPU too

    def _take_new(self) -> None:
        """Hand submitted jobs to the scheduler: choice 0 computes the prompt; the others fork from it."""
        with self.wake:
            jobs, self.waiting = list(self.waiting), deque()
        for job in jobs:
            try:  # a grammar matcher or an adapter stack's root can fail: that job alone
                seq = Seq(list(job.prompt), forks=job.n - 1, shared=self.prefix_cache, root=self._root(job))
                sequence = self._sequence(job, 0, seq)
            except Exception as e:
                log.exception("taking in a request failed")
                self._fail(job, e)
                continue
            self.sequences.append(sequence)
            self.scheduler.add(seq)

    def _sequence(self, job: Job, index: int, seq: Seq) -> Choice:
        s = Choice(job, index, self.tok, self.model.config.vocab_size, self.device, seq)
        if job.grammar is not None:
            s.matcher = job.grammar.new_matcher()  # a copy of the template compiled in the grammar lane
        return s

    def _root(self, job: Job) -> int:
        """The prefix-cache root of a job (0: the base model, unsalted): prefixes are shared only between
        requests whose keys/values come from the same weights (adapter stack) and whose cache salts match."""
        if not job.stack and job.cache_salt is None:
            return 0
        signature = (tuple((adapter.serial, scale) for adapter, scale in job.stack), job.cache_salt)
        if signature not in self.roots:
            if len(self.roots) >= MAX_ROOTS:  # one salt per request must not grow this forever
                self.roots.pop(next(iter(self.roots)))  # the oldest: its later jobs only miss the cache
            self.roots[signature] = self.scheduler.pool.new_root()
        return self.roots[signature]

    def _refuse(self, job: Job) -> None:
        need = self.kv_bytes(job.n, len(job.prompt), job.params.max_new_tokens)
        limit = (self.kv_cache_bytes or 0) / 2**20
        self._fail(job, f"the request needs {need / 2**20:.1f} MiB of KV cache; the limit is {limit:.1f} MiB")

    def _drop_cancelled(self) -> None:
        with self.wake:
            cancelled = [j for j in self.jobs if j.cancelled]  # under the lock: submit adds to jobs
        for job in cancelled:
            self._end(job)  # out of the waiting line; its sequences go at the sweep
        self._sweep()

    # -- one step --------------------------------------------------------------------------------

    def _run(self, pieces: list[Piece]) -> None:
        """One forward for the plan (piece by piece if that fails), then logits, scores and samples."""
        done, hidden = self._isolated_forward(pieces)
        for p in done:
            self.scheduler.computed(p.seq, p.count)
            if not p.decode:
                self.metrics.count("prompt_tokens", p.count)
        decodes = [p for p in done if p.decode]
        if decodes:
            self.metrics.observe("batch_size", len(decodes))
        rows, wants = self._logit_rows(done)
        logits = self.model.head(hidden[rows]) if rows else None
        advance: list[tuple[Choice, torch.Tensor]] = []
        for p, (score, last) in zip(done, wants):
            s: Choice = p.seq.owner
            if s.job.ended:
                continue
            if s.job.prompt_logprobs is not None and not s.job.started:
                self._score_cached(s.job, p)
            if score:
                self._score_prompt(s.job, p, logits[score[0] : score[1]])
            if last is None:
                continue
            if s.job.started:
                advance.append((s, logits[last]))
            else:
                try:
                    self._start(s, logits[last])
                except Exception as e:  # this job's fault alone
                    log.exception("starting a request failed")
                    self._fail(s.job, e)
        if advance:
            self._advance([s for s, _ in advance], torch.stack([row for _, row in advance]))

    def _isolated_forward(self, pieces: list[Piece]) -> tuple[list[Piece], torch.Tensor]:
        """(pieces computed, (N, d) hidden states of their tokens): all in one forward; if that raises,
        each piece alone, failing only the jobs whose own piece raises."""
        try:
            return pieces, self._forward(pieces)
        except Exception as e:
            if len(pieces) == 1:
                log.exception("a step failed for one request")
                self._fail(pieces[0].seq.owner.job, e)
                return [], torch.empty(0)
            log.exception("a batched step failed: running its %d pieces one at a time", len(pieces))
        done, hidden = [], []
        for p in pieces:
            if p.seq.owner.job.ended:
                continue
            try:
                hidden.append(self._forward([p]))
                done.append(p)
            except Exception as e:
                self._fail(p.seq.owner.job, e)
        return done, torch.cat(hidden) if hidden else torch.empty(0)

    def _forward(self, pieces: list[Piece]) -> torch.Tensor:
        """Run the pieces (decodes first) as one (1, N) row; return the (N, d) final hidden states."""
        segments = [(p.start, p.count, p.seq.blocks) for p in pieces]
        decodes = sum(1 for p in pieces if p.decode)
        slopes = self.model.transformer.alibi_slopes(self.device)
        self.cache.plan(segments, decodes, slopes, self.device)
        ids = [t for p in pieces for t in p.seq.tokens[p.start : p.start + p.count]]
        if self.bank is not None:
            self.bank.route = self._route(pieces)
        try:
            hidden = self.model.transformer(torch.tensor([ids], device=self.device), cache=self.cache)[0]
        finally:
            if self.bank is not None:
                self.bank.route = []
        self.cache.store_hidden(hidden)  # for prompts that will score these positions from the prefix cache
        return hidden

    def _route(self, pieces: list[Piece]) -> list[tuple[torch.Tensor, Stack]]:
        """(token rows, adapter stack) of this step's (1, N) row, one entry per stack in use."""
        rows: dict[int, tuple[list[int], Stack]] = {}
        at = 0
        for p in pieces:
            if p.seq.root:  # one root per stack in use (`_root`); 0 is the base model
                rows.setdefault(p.seq.root, ([], p.seq.owner.job.stack))[0].extend(range(at, at + p.count))
            at += p.count
        return [(torch.tensor(r, device=self.device), stack) for r, stack in rows.values()]

    def _logit_rows(self, pieces: list[Piece]) -> tuple[list[int], list[tuple[tuple[int, int] | None, int | None]]]:
        """Hidden-state rows that go through the LM head: a prompt's positions still to be scored
        (prompt_logprobs), and each piece's last position when it ends its sequence's tokens. Returns the
        rows and, per piece, its (first, end) scoring range and its last row's index among them."""
        rows, wants, offset = [], [], 0
        for p in pieces:
            job = p.seq.owner.job
            score = None
            if job.prompt_logprobs is not None and not job.started:
                first = max(p.start, len(job.prompt_info) - 1, 0)  # position j scores prompt token j + 1
                end = min(p.start + p.count, len(job.prompt) - 1)
                if end > first:
                    score = (len(rows), len(rows) + end - first)
                    rows += range(offset + first - p.start, offset + end - p.start)
            last = None
            if p.last:
                last = len(rows)
                rows.append(offset + p.count - 1)
            wants.append((score, last))
            offset += p.count
        return rows, wants

    def _score_cached(self, job: Job, p: Piece) -> None:
        """Score the prompt positions before this piece, which came from the prefix cache: from the scores
        kept with their blocks when an earlier request scored the same content with as many alternatives,
        else from the hidden states kept with them (the LM head for those positions only)."""
        first = max(len(job.prompt_info) - 1, 0)  # position j scores prompt token j + 1
        if p.start <= first:
            return
        if not job.prompt_info:
            job.prompt_info.append(TokenInfo(job.prompt[0]))  # nothing predicts the first token
        infos: list[TokenInfo | None] = [self._kept_score(job, p.seq, j) for j in range(first, p.start)]
        missing = [j for j, info in zip(range(first, p.start), infos) if info is None]
        if missing:
            logits = self.model.head(self.cache.stored_hidden(p.seq.blocks, missing))
            found = scored(logits, [job.prompt[j + 1] for j in missing], job.prompt_logprobs, self.vocab)
            for j, info in zip(missing, found):
                infos[j - first] = info
        job.prompt_info += infos

    def _kept_score(self, job: Job, seq: Seq, j: int) -> TokenInfo | None:
        """The score kept for position j of a cached block, if its target lies in the same block."""
        block, offset = divmod(j, BLOCK_SIZE)
        kept = self.scheduler.pool.attached.get(seq.keys[block]) if offset < BLOCK_SIZE - 1 else None
        if kept is None or kept[0] < job.prompt_logprobs:
            return None
        info = kept[1][offset]
        return TokenInfo(info.id, info.logprob, info.top[: job.prompt_logprobs])

    def _keep_scores(self, job: Job, seq: Seq) -> None:
        """Keep a scored prompt's scores with its full blocks, for later requests with the same prefix
        (each block's positions but its last: that one's target is in the next block)."""
        attached = self.scheduler.pool.attached
        for i, key in enumerate(seq.keys):
            kept = attached.get(key)
            if kept is None or kept[0] < job.prompt_logprobs:
                attached[key] = (job.prompt_logprobs, job.prompt_info[i * BLOCK_SIZE + 1 : (i + 1) * BLOCK_SIZE])

    def _score_prompt(self, job: Job, p: Piece, logits: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens these positions predict (echo)."""
        if not job.prompt_info:
            job.prompt_info.append(TokenInfo(job.prompt[0]))  # nothing predicts the first token
        first = len(job.prompt_info)
        job.prompt_info += scored(logits, job.prompt[first : first + len(logits)], job.prompt_logprobs, self.vocab)

    def _start(self, s: Choice, logits: torch.Tensor) -> None:
        """A prompt is in: the job's other choices fork from it, and each samples its first token. When the
        cache has no blocks for the choices now, the job waits for room (its prompt blocks stay cached)."""
        job = s.job
        seqs = [s]
        if job.n > 1:
            forked = self._forked(s)
            if forked is None:
                self.scheduler.requeue(s.seq)
                return
            seqs += forked
        job.started, job.open_choices = True, job.n
        if job.prompt_info:
            self._emit(job, Event(prompt=job.prompt_info))
            self._keep_scores(job, s.seq)
        if job.params.max_new_tokens == 0:  # echo-only scoring: nothing to generate
            for choice in seqs:
                self._finish_choice(choice, "length")
            return
        self._advance(seqs, logits.repeat(len(seqs), 1))

    def _forked(self, s: Choice) -> list[Choice] | None:
        """Choices 1..n-1 of s's job, sharing s's prompt blocks (a partial last block is copied); None
        when the blocks for the copies cannot be had now."""
        forked = self.scheduler.fork(s.seq, s.job.n - 1)
        if forked is None:
            return None
        seqs, copies = forked
        for src, dst in copies:
            self.cache.copy_block(src, dst)
        choices = [self._sequence(s.job, i, seq) for i, seq in enumerate(seqs, start=1)]
        self.sequences += choices
        return choices

    def _isolated(self, seqs: list[Choice], run: Callable[[list[int]], list]) -> tuple[list[Choice], list]:
        """run(indices of seqs) for all of them at once; if that raises, for each sequence alone, failing
        only the jobs whose own sequence raises. Returns the sequences that succeeded and their results."""
        try:
            return seqs, run(list(range(len(seqs))))
        except Exception as e:
            if len(seqs) == 1:
                log.exception("a step failed for one request")
                self._fail(seqs[0].job, e)
                return [], []
            log.exception("a batched step failed: running its %d rows one at a time", len(seqs))
        ok, results = [], []
        for i, s in enumerate(seqs):
            if s.job.ended:
                continue
            try:
                results += run([i])
                ok.append(s)
            except Exception as e:
                self._fail(s.job, e)
        return ok, results

    def _advance(self, seqs: list[Choice], logits: torch.Tensor) -> None:
        """Sample one token per sequence from its (V,) logits row, record it, emit text, retire."""
        states = [None if s.generator is None else s.generator.get_state() for s in seqs]

        def sample(idx: list[int]) -> list[tuple[int, TokenInfo]]:
            if len(idx) == 1 and states[idx[0]] is not None:  # a rerun draws as the batch would have
                seqs[idx[0]].generator.set_state(states[idx[0]])
            return self._sample([seqs[i] for i in idx], logits[idx])

        ok, picked = self._isolated(seqs, sample)
        now = time.monotonic()
        for s, (token, info) in zip(ok, picked):
            try:
                self._record(s, token, info, now)
            except Exception as e:  # detokenizing or a stop string: this job's fault alone
                log.exception("recording a token failed")
                self._fail(s.job, e)
        self._sweep()

    def _sample(self, seqs: list[Choice], logits: torch.Tensor) -> list[tuple[int, TokenInfo]]:
        return sample(seqs, logits, self.vocab)  # a method: the seam fault-injection tests patch

    def _record(self, s: Choice, token: int, info: TokenInfo, now: float) -> None:
        job = s.job
        if job.ended or s.finished:
            return
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.observe("time_to_first_token_seconds", now - job.submitted)
        s.tokens.append(token)
        s.seq.tokens.append(token)
        job.generated += 1
        self.metrics.count("generation_tokens", 1)
        if s.counts is not None:
            s.counts[token] += 1
        if s.matcher is not None and not s.matcher.consume_token(token):
            raise RuntimeError(f"structured output: {s.matcher.get_error()}")
        reason = None
        if token == self.tok.eos_id and not job.ignore_eos:
            reason = "stop"
        else:
            s.text.push(token)
            if s.text.done or (s.matcher is not None and s.matcher.is_stopped()):
                reason = "stop"  # a stop string, or the structured output is complete
            elif len(s.tokens) >= s.params.max_new_tokens or s.length >= self.max_model_len:
                reason = "length"
        s.pending.append(info)
        text = s.text.take_printable(final=reason is not None)
        if text or reason is not None or info.logprob is not None:  # else the tokens wait for their text
            self._emit(job, Event(s.index, text, s.pending))
            s.pending = []
        if reason is not None:
            self._finish_choice(s, reason)

    def _finish_choice(self, s: Choice, reason: str) -> None:
        s.finished = True
        job = s.job
        self._emit(job, Event(s.index, finish_reason=reason))
        job.open_choices -= 1
        if job.open_choices == 0:
            self.metrics.observe("e2e_request_latency_seconds", time.monotonic() - job.submitted)
            self._emit(job, Event(done=True, usage=(len(job.prompt), job.generated)))
            self._end(job)

    def _sweep(self) -> None:
        """Hand back the blocks of every sequence that finished or whose job ended."""
        keep = []
        for s in self.sequences:
            if s.finished or s.job.ended:
                self.scheduler.finish(s.seq)
            else:
                keep.append(s)
        self.sequences = keep

    def _emit(self, job: Job, event: Event) -> None:
        if job.cancelled or job.ended:
            return
        try:
            job.sink(event)
        except Exception:  # a broken sink must not stop the other requests
            log.exception("request sink failed")
            job.cancelled = True

    def _end(self, job: Job) -> None:
        """The job is over (its last event sent, or nobody listens): forget it; its blocks go at the sweep."""
        job.ended = True
        with self.wake:
            self.jobs.discard(job)
            if job in self.waiting:
                self.waiting.remove(job)

    def _fail(self, job: Job, error: Exception | str) -> None:
        """Fail one job: its error event now, its blocks freed at the next sweep; the others go on."""
        if job.ended:
            return
        if isinstance(error, Exception):
            error = f"internal error while serving this request: {type(error).__name__}: {error}"
        self._emit(job, Event(done=True, error=error))
        self._end(job)

    def _fail_all(self, message: str) -> None:
        with self.wake:
            jobs = list(self.jobs)
            self.waiting.clear()
        for s in self.sequences:
            self.scheduler.finish(s.seq)
        self.sequences = []
        self.cache.release()
        self.scheduler.reset_cache()
        self.roots.clear()  # nothing is cached under them any more
        for job in jobs:
            self._emit(job, Event(done=True, error=message))
            self._end(job)


def _trim_heap() -> None:
    """Hand the C allocator's free pages back to the system (glibc keeps freed small blocks, such as a
    long prefill's activations, in its heap: the server's resident memory would stay at its peak)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
