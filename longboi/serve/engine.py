"""Continuous batching: one scheduler thread owns the model and serves many requests at once.

Between decode steps the scheduler admits waiting requests and prefills them (a long prompt in
chunks of `prefill_chunk` tokens, so running sequences keep decoding meanwhile), then decodes every
running sequence as one batch on a SlotCache (each row at its own length) and retires the finished
ones. A sequence's numbers do not depend on the batch: its prompt is prefilled alone, its decode
row attends only to its own keys with its own ALiBi offsets, and a seeded sequence draws from its
own generator. The HTTP layer talks to the engine through `submit`, `cancel` and the events each
request's `sink` receives (called on the engine thread; it must not block).

No request can hurt another. Work for one job (prefill, start) that raises fails that job alone;
a batched step (decode forward, sampling) that raises is rerun row by row, so only the jobs whose
own rows fail are failed and every other row goes on. Every job is in `jobs` from `submit` to its
last event, so none can be lost between queues. Memory follows the work: the KV cache holds the
rows running at their current lengths, admission keeps the worst case (every admitted choice at
prompt + max_tokens) within `kv_cache_bytes`, and the idle engine gives its memory back.
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

import torch

from longboi.generate import SamplingParams, _RowText, pick, process_logits, token_counts
from longboi.model import KVCache, MPTForCausalLM, SlotCache
from longboi.serve.metrics import Metrics
from longboi.tokenizer import Tokenizer

log = logging.getLogger("longboi.serve")


class QueueFull(Exception):
    """More requests are waiting than the queue holds (the server answers 429)."""


@dataclass(frozen=True)
class TokenInfo:
    """One token and, when asked for, its log-probability and the most likely alternatives."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


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


class Sequence:
    """One choice of a job while it runs: its tokens, text, generator and KV-cache row."""

    def __init__(self, job: Job, index: int, tok: Tokenizer, vocab: int, device: torch.device):
        self.job, self.index, self.params = job, index, job.params
        self.tokens: list[int] = []
        self.pending: list[TokenInfo] = []  # sampled, not yet sent (their text is held back)
        self.text = _RowText(tok, job.params.stop)
        seed = job.params.seed
        self.generator = None if seed is None else torch.Generator(device).manual_seed((seed + index) % 2**64)
        self.finished = False
        self.counts = self.prompt_seen = None
        if job.params.penalized:  # generated-token counts; the prompt's tokens for the repetition penalty
            prompt = torch.tensor([job.prompt], device=device)
            self.counts = torch.zeros(vocab, device=device)
            self.prompt_seen = token_counts(prompt, torch.ones_like(prompt), vocab)[0] > 0

    @property
    def length(self) -> int:
        return len(self.job.prompt) + len(self.tokens)


@dataclass
class _Prefill:
    """A job whose prompt is going through the model, chunk by chunk."""

    job: Job
    cache: KVCache
    done: int = 0
    prompt_info: list[TokenInfo] = field(default_factory=list)


def kv_bytes_per_token(model: MPTForCausalLM) -> int:
    """KV-cache bytes one position of one sequence takes: keys and values of every layer."""
    cfg = model.config
    element = model.transformer.wte.weight.element_size()  # int8 models keep fp32 embeddings and caches
    return 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * element


class Engine:
    """The scheduler. `max_batch` sequences decode together; `max_queue` jobs may wait for a slot;
    `kv_cache_bytes` (None: no limit but max_batch x max_model_len) bounds the KV cache."""

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
    ):
        self.model, self.tok = model.eval(), tok
        self.device = next(model.parameters()).device  # token ids, generators and counts live there too
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_model_len = max_model_len or model.config.max_seq_len
        self.metrics = metrics or Metrics()
        self.vocab = tok.vocab_size  # ids past it (the padded vocab) are never sampled
        self.cache = SlotCache(model.config.n_layers, max_batch, self.max_model_len)
        self.kv_token_bytes, self.kv_cache_bytes = kv_bytes_per_token(model), kv_cache_bytes
        self.waiting: deque[Job] = deque()
        self.prefilling: deque[_Prefill] = deque()
        self.running: list[Sequence] = []  # running[i] decodes in cache row i
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
        """The most KV-cache memory a job of n choices can need (all of them at their longest)."""
        return self._kv_cost(n, self._final_length(prompt_tokens, max_tokens), prompt_tokens)

    def _kv_cost(self, rows: int, longest: int, prefill_tokens: int) -> int:
        """Bytes of `rows` cache rows sized for a longest sequence of `longest` positions, as `fit` would
        allocate them, plus the prefill caches of `prefill_tokens` prompt tokens."""
        cache_rows, positions = self.cache.target(rows, longest)
        return (cache_rows * positions + prefill_tokens) * self.kv_token_bytes

    def fitting_tokens(self, n: int, prompt_tokens: int, wanted: int) -> int:
        """The largest max_tokens up to `wanted` whose worst case fits the KV-cache limit (0: none)."""
        fits = lambda m: self.kv_cache_bytes is None or self.kv_bytes(n, prompt_tokens, m) <= self.kv_cache_bytes
        low, high = 0, wanted
        while low < high:  # kv_bytes grows with max_tokens
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low if fits(low) else 0

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when `max_queue` jobs already wait."""
        if not job.prompt or job.n < 1 or job.n > self.max_batch:
            raise ValueError(f"a job needs at least one prompt token and 1 to {self.max_batch} choices")
        if len(job.prompt) >= self.max_model_len:
            raise ValueError(f"a prompt of {len(job.prompt)} tokens leaves no room under max_model_len")
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self.jobs.add(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """Forget a job (its client went away): its rows are freed before the next decode step."""
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
        """(running sequences incl. prefilling jobs, waiting jobs), for metrics and health."""
        return len(self.running) + len(self.prefilling), len(self.waiting)

    # -- the scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not (self.stopping or self.waiting or self.prefilling or self.running):
                    self.wake.wait()
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
        self._admit()
        self._prefill()
        if self.running:
            self._decode()
        if not (self.running or self.prefilling):
            self._rest()

    def _rest(self) -> None:
        """Nothing in flight: give the KV cache and the allocator's free pages back, once per busy spell."""
        if not self.idle:
            self.idle = True
            self.cache.release()
            _trim_heap()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the caching allocator's blocks go back to the GPU too

    def _drop_cancelled(self) -> None:
        with self.wake:
            cancelled = [j for j in self.jobs if j.cancelled]  # under the lock: submit adds to jobs
        for job in cancelled:
            self._end(job)  # out of the waiting and prefill lines; its rows go at the sweep
        self._sweep()

    def _admit(self) -> None:
        """Move waiting jobs to prefill while their choices fit in free rows and, at their longest, in
        the KV-cache budget (first come, first served: a big job is not overtaken forever)."""
        with self.wake:
            while self.waiting and self._fits(self.waiting[0]):
                job = self.waiting.popleft()
                self.prefilling.append(_Prefill(job, self.model.new_cache(len(job.prompt))))
                self.idle = False
            if self.waiting and not (self.running or self.prefilling):  # cannot fit even alone
                job = self.waiting.popleft()
                need = self.kv_bytes(job.n, len(job.prompt), job.params.max_new_tokens)
                limit = (self.kv_cache_bytes or 0) / 2**20  # (only reached with a limit: submit checks n)
                self._fail(job, f"the request needs {need / 2**20:.1f} MiB of KV cache; the limit is {limit:.1f} MiB")

    def _fits(self, job: Job) -> bool:
        rows = len(self.running) + sum(p.job.n for p in self.prefilling) + job.n
        if rows > self.max_batch:
            return False
        if self.kv_cache_bytes is None:
            return True
        jobs = [s.job for s in self.running] + [p.job for p in self.prefilling] + [job]
        longest = max(self._final_length(len(j.prompt), j.params.max_new_tokens) for j in jobs)
        prefill_tokens = sum(len(p.job.prompt) for p in self.prefilling) + len(job.prompt)
        return self._kv_cost(rows, longest, prefill_tokens) <= self.kv_cache_bytes

    def _final_length(self, prompt_tokens: int, max_tokens: int) -> int:
        return min(prompt_tokens + max_tokens, max(self.max_model_len, prompt_tokens + 1))

    def _prefill(self) -> None:
        """Spend up to `prefill_chunk` prompt tokens on the jobs at the head of the prefill line."""
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            p = self.prefilling[0]
            end = min(len(p.job.prompt), p.done + budget)
            budget -= end - p.done
            try:
                logits = self._prefill_chunk(p, end)
                p.done = end
                if end == len(p.job.prompt):
                    self.prefilling.popleft()
                    self._start(p, logits)
            except Exception as e:  # this job's fault alone
                log.exception("prefill failed")
                self._fail(p.job, e)
                self._sweep()  # choices it had already put in rows

    def _prefill_chunk(self, p: _Prefill, end: int) -> torch.Tensor:
        """Run prompt tokens [done, end) through the model; return the last position's (V,) logits."""
        ids = torch.tensor([p.job.prompt[p.done : end]], device=self.device)
        keep = 0 if p.job.prompt_logprobs is not None else 1
        logits = self.model(ids, cache=p.cache, logits_to_keep=keep)[0]  # (T or 1, V)
        if p.job.prompt_logprobs is not None:
            if p.done == 0:
                p.prompt_info.append(TokenInfo(p.job.prompt[0]))  # nothing predicts the first token
            targets = p.job.prompt[p.done + 1 : end + 1]  # the next chunk's first token is scored here
            p.prompt_info += self._scored(logits[: len(targets)], targets, p.job.prompt_logprobs)
        self.metrics.count("prompt_tokens", end - p.done)
        return logits[-1]

    def _start(self, p: _Prefill, logits: torch.Tensor) -> None:
        """A prompt is in: sample each choice's first token and give each choice a cache row."""
        job = p.job
        job.open_choices = job.n
        if p.prompt_info:
            self._emit(job, Event(prompt=p.prompt_info))
        seqs = [Sequence(job, i, self.tok, logits.shape[-1], self.device) for i in range(job.n)]
        if job.params.max_new_tokens == 0:  # echo-only scoring: nothing to generate
            for s in seqs:
                self._finish_choice(s, "length")
            return
        self.cache.fit(len(self.running) + len(seqs), max(self._longest(), len(job.prompt)) + 1, like=p.cache.keys)
        for s in seqs:
            self.cache.insert(len(self.running), p.cache)
            self.running.append(s)
            self.cache.rows = len(self.running)
        self._advance(seqs, logits.repeat(len(seqs), 1))

    def _longest(self) -> int:
        """The longest running sequence's cached positions."""
        return int(self.cache.lengths[: len(self.running)].max()) if self.running else 0

    def _decode(self) -> None:
        """One token for every running sequence, in one forward (row by row if that forward fails)."""
        self.cache.rows = len(self.running)
        self.cache.fit(len(self.running), self._longest() + 1)  # grows, or shrinks after retirements
        seqs, logits = self._isolated(list(self.running), self._decode_rows)
        if seqs:
            self.metrics.observe("batch_size", len(seqs))
            self._advance(seqs, torch.stack(logits))
        self._sweep()

    def _decode_rows(self, rows: list[int]) -> list[torch.Tensor]:
        """(V,) next-token logits of the running sequences in cache rows `rows`, one forward."""
        every = len(rows) == len(self.running)
        before = self.cache.lengths.clone()  # a forward that fails after the cache advanced is undone
        self.cache.select = None if every else torch.tensor(rows)
        try:
            ids = torch.tensor([[self.running[r].tokens[-1]] for r in rows], device=self.device)
            return list(self.model(ids, cache=self.cache, logits_to_keep=1)[:, -1])  # rows x (V,)
        except Exception:
            self.cache.lengths.copy_(before)
            raise
        finally:
            self.cache.select = None

    def _isolated(self, seqs: list[Sequence], run: Callable[[list[int]], list]) -> tuple[list[Sequence], list]:
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

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
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

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int, TokenInfo]]:
        """(rows, V) logits -> each row's token and its log-probability information."""
        logits = logits.float()
        wants_logprobs = any(s.job.logprobs is not None for s in seqs)
        allowed = logits.clone() if wants_logprobs else logits  # log-probabilities are over the raw logits
        allowed[:, self.vocab :] = float("-inf")  # the padded vocab is never sampled
        params = [s.params for s in seqs]
        counts = seen = None
        if any(s.counts is not None for s in seqs):
            zeros = torch.zeros(logits.shape[-1], device=logits.device)
            counts = torch.stack([s.counts if s.counts is not None else zeros for s in seqs])
            seen = torch.stack([s.prompt_seen if s.prompt_seen is not None else zeros.bool() for s in seqs])
        processed = process_logits(allowed, params, counts, seen)
        tokens = pick(processed, params, [s.generator for s in seqs]).tolist()
        return list(zip(tokens, self._token_infos(seqs, logits, tokens)))

    def _token_infos(self, seqs: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> list[TokenInfo]:
        """Log-probabilities of the sampled tokens under the model (before any sampling filter), for
        the rows that asked for them."""
        wanted = [i for i, s in enumerate(seqs) if s.job.logprobs is not None]
        infos = [TokenInfo(t) for t in tokens]
        if wanted:
            scored = self._scored(
                logits[wanted], [tokens[i] for i in wanted], max(seqs[i].job.logprobs for i in wanted)
            )
            for i, info in zip(wanted, scored):
                infos[i] = TokenInfo(info.id, info.logprob, info.top[: seqs[i].job.logprobs])
        return infos

    def _scored(self, logits: torch.Tensor, targets: list[int], top: int) -> list[TokenInfo]:
        """(N, V) logits -> each target's log-probability and the `top` most likely alternatives.

        Over the whole (padded) vocabulary, as `longboi eval` and transformers score; alternatives come
        from the tokenizer's ids only."""
        logprobs = logits.float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None]).squeeze(1).tolist()
        alternatives = [[]] * len(targets)
        if top > 0:
            values, ids = logprobs[:, : self.vocab].topk(top, dim=-1)
            alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return [TokenInfo(t, lp, tuple(a)) for t, lp, a in zip(targets, chosen, alternatives)]

    def _record(self, s: Sequence, token: int, info: TokenInfo, now: float) -> None:
        job = s.job
        if job.ended or s.finished:
            return
        if job.first_token_at is None:
            job.first_token_at = now
            self.metrics.observe("time_to_first_token_seconds", now - job.submitted)
        s.tokens.append(token)
        job.generated += 1
        self.metrics.count("generation_tokens", 1)
        if s.counts is not None:
            s.counts[token] += 1
        reason = None
        if token == self.tok.eos_id and not job.ignore_eos:
            reason = "stop"
        else:
            s.text.push(token)
            if s.text.done:
                reason = "stop"  # a stop string
            elif len(s.tokens) >= s.params.max_new_tokens or s.length >= self.max_model_len:
                reason = "length"
        s.pending.append(info)
        text = s.text.take_printable(final=reason is not None)
        if text or reason is not None or info.logprob is not None:  # else the tokens wait for their text
            self._emit(job, Event(s.index, text, s.pending))
            s.pending = []
        if reason is not None:
            self._finish_choice(s, reason)

    def _finish_choice(self, s: Sequence, reason: str) -> None:
        s.finished = True
        job = s.job
        self._emit(job, Event(s.index, finish_reason=reason))
        job.open_choices -= 1
        if job.open_choices == 0:
            self.metrics.observe("e2e_request_latency_seconds", time.monotonic() - job.submitted)
            self._emit(job, Event(done=True, usage=(len(job.prompt), job.generated)))
            self._end(job)

    def _sweep(self) -> None:
        """Retire every row whose sequence finished or whose job ended."""
        for row in reversed(range(len(self.running))):
            s = self.running[row]
            if s.finished or s.job.ended:
                self._retire(row)

    def _retire(self, row: int) -> None:
        """Free a cache row: the last running sequence moves into it, so rows stay contiguous."""
        last = len(self.running) - 1
        if row != last:
            self.cache.move(last, row)
            self.running[row] = self.running[last]
        self.running.pop()
        self.cache.rows = len(self.running)

    def _emit(self, job: Job, event: Event) -> None:
        if job.cancelled or job.ended:
            return
        try:
            job.sink(event)
        except Exception:  # a broken sink must not stop the other requests
            log.exception("request sink failed")
            job.cancelled = True

    def _end(self, job: Job) -> None:
        """The job is over (its last event sent, or nobody listens): forget it everywhere."""
        job.ended = True
        with self.wake:
            self.jobs.discard(job)
            if job in self.waiting:
                self.waiting.remove(job)
        if any(p.job is job for p in self.prefilling):
            self.prefilling = deque(p for p in self.prefilling if p.job is not job)

    def _fail(self, job: Job, error: Exception | str) -> None:
        """Fail one job: its error event now, its rows freed at the next sweep; the others go on."""
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
        self.prefilling.clear()
        self.running.clear()
        self.cache.release()
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
