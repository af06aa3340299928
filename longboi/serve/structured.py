"""Structured output: `response_format` json_object / json_schema, enforced token by token by llguidance.

Why llguidance (not xgrammar): both compile JSON schemas to a token mask per step; llguidance is one wheel
with no dependencies, where xgrammar pulls in triton and apache-tvm-ffi. xgrammar's masks measured faster
(2.4 vs 27 us a token, `bench/grammar_engines.py`), but both are far below a model step here.

A grammar is compiled once per request (a bad schema is a 400 naming what it cannot compile); each
choice gets its own matcher, which masks the logits before sampling (so temperature, top-k/p, seeds
and n work as usual) and consumes the sampled token. The matcher allows EOS
only where the JSON is complete and stops the choice when nothing more can follow.
"""

from __future__ import annotations

import functools
import json
import threading
from functools import cached_property

import torch

from longboi.errors import UserError
from longboi.tokenizer import Tokenizer

MAX_SCHEMA_BYTES = 64 * 1024  # a schema is compiled per request: bound the work a client can ask for


class Grammars:
    """llguidance's view of one tokenizer (built once, on first use) and schema -> grammar compilation."""

    def __init__(self, tok: Tokenizer, vocab: int):
        self.tok, self.vocab = tok, vocab
        self.lock = threading.Lock()

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

    def compile(self, response_format: dict) -> str | None:
        """A checked llguidance grammar for an OpenAI `response_format`, or None for plain text."""
        import llguidance

        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema: dict = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise UserError("response_format.json_schema.schema: expected a JSON schema object")
        else:
            raise UserError(f"response_format.type: {kind!r}; expected text, json_object or json_schema")
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise UserError(f"response_format: a schema of at most {MAX_SCHEMA_BYTES} bytes")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except Exception as e:  # llguidance raises ValueError with the part it cannot compile
            raise UserError(f"response_format: the schema cannot be enforced: {e}") from e
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if failed:
            raise UserError(f"response_format: the schema cannot be enforced: {'; '.join(messages)}")
        return grammar

    def matcher(self, grammar: str):
        import llguidance

        return llguidance.LLMatcher(self.ll_tokenizer, grammar)


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
