"""Finetuning data: prompt/response and chat jsonl -> token ids with loss labels, and packing.

Formats: `{"prompt", "response"}` (or `completion`) and `{"messages": [{"role", "content"}, ...]}`
with roles system/user/assistant. Chat turns are rendered with ChatML by default (the same function
renders prompts at inference). Loss masking follows LLM Foundry: `target_responses` last|all
(which assistant turns are trained on) and `target_prompts` none|all|length>=N (whether prompt
tokens are too). Masked tokens get label -100 and never reach the loss.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from longboi.errors import UserError
from longboi.tokenizer import ROLES, Tokenizer, render_chat

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """Token ids and labels (label[t] is the target of input t; IGNORE where masked)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class FinetuneReport:
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0
    skip_examples: list[str] | None = None


def _chat_segments(messages: list, where: str, template: str | None) -> list[tuple[str, bool]]:
    """Render prefixes of the conversation; each assistant reply is the text its turn adds after the
    generation prompt, so masking follows any template whose renders extend each other."""
    out, prev = [], ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs role in {ROLES} and string content, got {m!r}")
        full = render_chat(messages[: i + 1], template, add_generation_prompt=False)
        head = render_chat(messages[:i], template, add_generation_prompt=True) if m["role"] == "assistant" else full
        if not (head.startswith(prev) and full.startswith(head)):
            raise ValueError(f"{where}: the chat template does not render conversations as growing prefixes")
        out.append((head[len(prev) :], False))
        if m["role"] == "assistant":
            out.append((full[len(head) :], True))
        prev = full
    return [(text, is_response) for text, is_response in out if text or is_response]


def _segments(row: dict, where: str, template: str | None = None) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of one row, in order."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: `messages` must be a non-empty list")
        out = _chat_segments(messages, where, template)
        if not any(is_response for _, is_response in out):
            raise ValueError(f"{where}: a chat example needs at least one assistant message")
        return out
    response = row.get("response", row.get("completion"))
    if not isinstance(row.get("prompt"), str) or not isinstance(response, str):
        raise ValueError(
            f"{where}: expected {{prompt, response}} (or completion) strings, or messages; got keys {sorted(row)}"
        )
    return [(row["prompt"], False), (response, True)]


def tokenize_row(
    row: dict,
    tok: Tokenizer,
    where: str,
    target_prompts: str = "none",
    target_responses: Literal["last", "all"] = "last",
) -> Example:
    """Token ids with labels per the masking rules; EOS ends the example (and is a target)."""
    segments = _segments(row, where, tok.chat_template)
    last_response = max(i for i, (_, r) in enumerate(segments) if r)
    ids, labels = [], []
    for i, (text, is_response) in enumerate(segments):
        piece = tok.encode(text)
        if is_response:
            trained = target_responses == "all" or i == last_response
        else:
            trained = _prompt_is_target(target_prompts, len(piece))
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    if tok.eos_id is not None:
        ids.append(tok.eos_id)
        labels.append(tok.eos_id)
    # Shift: the label of input t is token t + 1.
    return Example(ids[:-1], labels[1:])


def _prompt_is_target(rule: str, length: int) -> bool:
    if rule == "none":
        return False
    if rule == "all":
        return True
    m = re.fullmatch(r"length>=(\d+)", rule)
    if not m:
        raise UserError(f"target_prompts must be none, all or length>=N, got {rule!r}")
    return length >= int(m.group(1))


def load_examples(
    path: str | Path,
    tok: Tokenizer,
    max_seq_len: int,
    target_prompts: str = "none",
    target_responses: Literal["last", "all"] = "last",
    overflow: Literal["truncate", "drop"] = "truncate",
    on_bad_input: Literal["error", "skip"] = "error",
) -> tuple[list[Example], FinetuneReport]:
    """All examples of a jsonl file; too-long ones truncated (from the right) or dropped, and counted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"finetuning data not found: {path}")
    report, examples = FinetuneReport(skip_examples=[]), []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            ex = tokenize_row(row, tok, where, target_prompts, target_responses)
        except (json.JSONDecodeError, ValueError) as e:
            reason = f"{where}: invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            if on_bad_input == "error":
                raise UserError(reason) from e
            report.skipped += 1
            report.skip_examples.append(reason)  # type: ignore[union-attr]
            continue
        if len(ex.input_ids) > max_seq_len:
            if overflow == "drop":
                report.dropped += 1
                continue
            report.truncated += 1
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
        if all(label == IGNORE for label in ex.labels):
            report.dropped += 1  # nothing left to learn from (the response was truncated away)
            continue
        examples.append(ex)
    report.examples = len(examples)
    if not examples:
        raise UserError(f"{path}: no usable examples ({report.skipped} skipped, {report.dropped} dropped)")
    return examples, report


def pack(examples: list[Example], max_seq_len: int, pad_id: int) -> tuple[dict[str, torch.Tensor], float]:
    """Greedy first-fit packing into rows of max_seq_len, with sequence_id so nothing crosses examples.

    Returns tensors input_ids / labels / sequence_id of shape (rows, max_seq_len) (sequence_id -1 and
    label IGNORE on padding) and the packing efficiency: real tokens / all positions.
    """
    rows: list[list[Example]] = []
    space: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):  # longest first packs tighter
        for i, free in enumerate(space):
            if len(ex.input_ids) <= free:
                rows[i].append(ex)
                space[i] -= len(ex.input_ids)
                break
        else:
            rows.append([ex])
            space.append(max_seq_len - len(ex.input_ids))
    ids = torch.full((len(rows), max_seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), max_seq_len), IGNORE, dtype=torch.long)
    seq = torch.full((len(rows), max_seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row):
            n = len(ex.input_ids)
            ids[r, at : at + n] = torch.tensor(ex.input_ids)
            labels[r, at : at + n] = torch.tensor(ex.labels)
            seq[r, at : at + n] = s
            at += n
    used = sum(len(e.input_ids) for e in examples)
    return {"input_ids": ids, "labels": labels, "sequence_id": seq}, used / max(1, len(rows) * max_seq_len)


class PackedDataset(torch.utils.data.Dataset):
    """Packed finetuning rows as an endless, seeded stream: `ds[g]` is global row g (reshuffled per epoch).

    Same interface as StreamingDataset (seed, epoch_samples, seq_len), so StreamLoader serves both
    and finetuning resumes exactly like pretraining.
    """

    def __init__(self, rows: dict[str, torch.Tensor], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch_samples = len(rows["input_ids"])
        self.seq_len = rows["input_ids"].shape[1]
        self._perm: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.epoch_samples

    def fingerprint(self) -> str:
        """Identity of the rows (tokens, labels, documents) and the seed: resuming on other data is refused."""
        h = hashlib.sha256(str(self.seed).encode())
        for key in sorted(self.rows):
            h.update(self.rows[key].numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.epoch_samples} packed rows of {self.seq_len} tokens"

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(int(g), self.epoch_samples)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (
                epoch,
                torch.randperm(
                    self.epoch_samples, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                ),
            )
        row = int(self._perm[1][i])
        return {k: v[row] for k, v in self.rows.items()}
