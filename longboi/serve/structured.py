"""Structured output: `response_format` json_object / json_schema, enforced token by token by llguidance.

Why llguidance (not xgrammar): both compile JSON schemas to a token mask per step; llguidance is one wheel
with no dependencies, where xgrammar pulls in triton and apache-tvm-ffi. xgrammar's masks measured faster
(2.4 vs 27 us a token, `bench/grammar_engines.py`), but both are far below a model step here.

A grammar is compiled once per request (a bad schema is a 400 naming what it cannot compile), in the
grammars' own lane: a small thread pool at a lower CPU priority, apart from the pool that tokenizes every
request, so slow schemas wait for each other and never for (or in front of) anyone else's work. Compiling
includes building a template matcher (up to ~1 s for a 64 KB schema of numeric ranges); each choice gets a
deep copy of it (microseconds) on the engine thread, which masks the logits before sampling (so temperature,
top-k/p, seeds and n work as usual) and consumes the sampled token. The matcher allows EOS only where the JSON
is complete and stops the choice when nothing more can follow. llguidance's own limits (LIMITS) bound the work
of one compile and of one token's mask.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from longboi.errors import UserError
from longboi.tokenizer import Tokenizer

MAX_SCHEMA_BYTES = 64 * 1024  # a schema is compiled per request: bound the work a client can ask for
GRAMMAR_WORKERS = 2  # schemas compiled at once; more wait their turn (and time out in the queue)
GRAMMAR_NICE = 19  # the lane yields the CPU to the engine and the event loop (nice 10 still slowed a step 1.3x)


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: its llguidance text and a template matcher that is never advanced."""

    text: str
    template: Any

    def new_matcher(self):
        """A fresh matcher for one choice (a deep copy: no compile on the engine thread)."""
        return self.template.deep_copy()


class Grammars:
    """llguidance's view of one tokenizer (built once, on first use), schema -> grammar compilation, and the
    lane compiles run in."""

    def __init__(self, tok: Tokenizer, vocab: int):
        self.tok, self.vocab = tok, vocab
        self.lock = threading.Lock()
        self.lane = ThreadPoolExecutor(GRAMMAR_WORKERS, "longboi-grammar", initializer=_lower_priority)

    @cached_property
    def ll_tokenizer(self):
        """The vocabulary's byte strings for llguidance (one pass over the vocabulary)."""
        import copy

        import llguidance

        with self.lock:
            backend = copy.copy(self.tok.backend)  # serialized without padding/truncation (as llguidance.hf does)
            backend.no_padding()
            backend.no_truncation()
            return llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab, eos_token=self.tok.eos_id)

    def warm(self) -> None:
        """Pay llguidance's one-time costs (the vocabulary's view, its first matcher: ~2 s for GPT-NeoX on a
        2-core EPYC) before any request does: the server submits this to the lane at start."""
        self.compile({"type": "json_object"})

    def compile(self, response_format: dict) -> Grammar | None:
        """A checked grammar for an OpenAI `response_format`, or None for plain text (run it in `lane`)."""
        import llguidance

        schema = _schema(response_format)
        if schema is None:
            return None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as e:  # llguidance raises ValueError with the part it cannot compile
            raise UserError(f"response_format: the schema cannot be enforced: {e}") from e
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_limits())
        # the first mask too, here: a parser too complex for LIMITS from the start is a 400, not a failed answer
        probe = template.deep_copy()
        if not probe.is_error():
            mask_logits(torch.zeros(1, self.vocab), [probe])
        template = probe if probe.is_error() else template
        if template.is_error():  # a grammar error or one of LIMITS exceeded
            error = template.get_error()
            error = error if len(error) <= 500 else error[:500] + "..."
            raise UserError(f"response_format: the schema cannot be enforced: {error}")
        return Grammar(grammar, template)


def _schema(response_format: dict) -> dict | None:
    """The JSON schema a response_format asks for (None: plain text), size-checked."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise UserError(f"response_format.type: {kind!r}; expected text, json_object or json_schema")
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise UserError("response_format.json_schema.schema: expected a JSON schema object")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise UserError(f"response_format: a schema of at most {MAX_SCHEMA_BYTES} bytes")
    return schema


@functools.cache
def _limits():
    """llguidance's work bounds, stated here rather than inherited: its defaults, which keep one token's mask
    to about 15 ms (lexer fuel ~14k/ms, Earley items ~20k/ms) and a compile's regex work to about 20 ms;
    a schema whose first mask passes them is a 400 at compile; one that passes them later in an answer
    fails that request alone, with a short error (the verbose one quoted the whole grammar)."""
    import llguidance

    return llguidance.LLParserLimits(
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_items_in_row=2000,
        max_grammar_size=500_000,
        verbose_errors=False,  # its verbose errors quote the whole grammar: megabytes, and the schema, in a 400
    )


def _lower_priority() -> None:
    """A lane thread runs at nice +GRAMMAR_NICE (Linux nices threads one by one), so compiling competes
    little with the engine's forward on a 2-core machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), GRAMMAR_NICE)
    except (OSError, AttributeError):  # not Linux: the lane is still its own pool
        pass


def mask_logits(logits: torch.Tensor, matchers: list) -> None:
    """Set to -inf, in place, every token the row's matcher forbids (rows whose matcher is None are free)."""
    import llguidance.torch as llt

    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return
    bitmask = llt.allocate_token_bitmask(len(rows), logits.shape[-1])
    if len(rows) == 1:
        llt.fill_next_token_bitmask(matchers[rows[0]], bitmask, 0)
    else:  # the rows' masks in parallel, in llguidance's threads (outside the GIL)
        llt.fill_next_token_bitmask_par(_executor(), [(matchers[i], j) for j, i in enumerate(rows)], bitmask)
    picked = logits[rows]
    llt.apply_token_bitmask_inplace(picked, bitmask.to(logits.device))
    logits[rows] = picked


@functools.cache
def _executor():
    import llguidance

    return llguidance.LLExecutor(num_threads=max(torch.get_num_threads(), 1))
