"""In-context-learning tasks in LLM Foundry's local jsonl format, built and scored as LLM Foundry does.

Four task types: language_modeling (`context`, `continuation`: correct when the continuation is the
greedy one), multiple_choice (`query`, `choices`, `gold`: the choice with the lowest mean token
loss; the summed log-likelihood variant is reported too), schema (`context_options`,
`continuation`, `gold`: the context that makes the shared continuation most likely) and
generation_task_with_answers (`context`, `answer`, `aliases`, optional `chain_of_thought`: greedy
generation, normalized, starting with an alias). Prompt rules follow LLM Foundry's
in_context_learning_evaluation.py: defaults, stripping, few-shot sampling with Python's `random`
(seeded per dataset, the target example never among its shots), delimiters, and the leading
space moved from the delimiter onto the continuation.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longboi.errors import UserError
from longboi.eval.scoring import LLRequest
from longboi.tokenizer import Tokenizer

TaskType = Literal[
    "language_modeling", "multiple_choice", "schema", "generation_task_with_answers", "question_answering"
]
REQUIRED_FIELDS = {
    "language_modeling": ("context", "continuation"),
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "generation_task_with_answers": ("context", "answer"),
}


@dataclass(frozen=True)
class TaskConfig:
    """One entry of an LLM Foundry `icl_tasks` list (same keys and defaults)."""

    label: str
    dataset_uri: str
    icl_task_type: TaskType
    num_fewshot: list[int] = field(default_factory=lambda: [0])
    prompt_string: str = ""
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    question_prelimiter: str = ""
    cot_delimiter: str = ""
    max_seq_len: int | None = None
    fewshot_random_seed: int = 1234
    has_categories: bool = False
    early_stopping_criteria: list[str] | None = None
    do_normalization: bool = True
    batch_size: int | None = None
    metric_names: list[str] | None = None  # accepted for compatibility; the metric follows the type
    generation_kwargs: dict[str, Any] | None = None  # accepted; decoding here is greedy

    @property
    def kind(self) -> str:
        return "generation_task_with_answers" if self.icl_task_type == "question_answering" else self.icl_task_type


def read_rows(path: Path, kind: str) -> list[dict]:
    """jsonl rows with top-level strings stripped (LLM Foundry strips them); clear errors by line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: invalid JSON ({e.msg})") from e
        missing = [k for k in REQUIRED_FIELDS[kind] if k not in row]
        if missing:
            raise UserError(f"{path}:{number}: a {kind} row needs {list(REQUIRED_FIELDS[kind])}; missing {missing}")
        if kind in ("multiple_choice", "schema"):
            options = row["choices" if kind == "multiple_choice" else "context_options"]
            if not isinstance(options, list) or not isinstance(row["gold"], int) or not 0 <= row["gold"] < len(options):
                raise UserError(f"{path}:{number}: gold must index the {len(options)} options")
        rows.append({k: v.strip() if isinstance(v, str) else v for k, v in row.items()})
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def fewshot_indices(n: int, k: int, rng: random.Random, target: int) -> list[int]:
    """LLM Foundry's draw: k of n indices, never the target; rendered in Python set order."""
    k = min(n - 1, k)
    chosen = set(rng.sample(range(n), k))
    if target in chosen:
        chosen.remove(target)
        replacement = rng.choice(range(n))
        while replacement in chosen or replacement == target:
            replacement = rng.choice(range(n))
        chosen.add(replacement)
    return list(chosen)


@dataclass
class Example:
    """One test example as model requests: log-likelihood requests or a generation prompt."""

    requests: list[LLRequest] = field(default_factory=list)
    gold: int = 0
    prompt: list[int] = field(default_factory=list)  # generation
    answers: list[str] = field(default_factory=list)  # generation


class TaskBuilder:
    """Turns rows into Examples for one (task, num_fewshot), following LLM Foundry's rules."""

    def __init__(self, cfg: TaskConfig, tok: Tokenizer, rows: list[dict], num_fewshot: int):
        self.cfg, self.tok, self.rows, self.k = cfg, tok, rows, num_fewshot
        self.rng = random.Random(cfg.fewshot_random_seed)
        self.prefix_space = len(tok.encode(" a")) == 1  # GPT-2/NeoX-style BPE

    def examples(self) -> list[Example]:
        return [self.example(i) for i in range(len(self.rows))]

    def _space(self, text: str) -> str:
        return " " + text if self.prefix_space and not text.startswith(" ") else text

    def _render(self, row: dict, preceding: str, answer: bool) -> str:
        c, kind = self.cfg, self.cfg.kind
        if kind == "schema":
            return (
                c.question_prelimiter
                + (c.example_delimiter if preceding else "")
                + row["context_options"][row["gold"]]
                + c.continuation_delimiter
                + row["continuation"]
            )
        text = (c.example_delimiter if preceding else "") + c.question_prelimiter
        text += row["query" if kind == "multiple_choice" else "context"] + c.continuation_delimiter
        if answer:
            text += self._answer(row)
        return text

    def _answer(self, row: dict) -> str:
        kind = self.cfg.kind
        if kind == "multiple_choice":
            return row["choices"][row["gold"]]
        if kind == "generation_task_with_answers":
            cot = row.get("chain_of_thought")
            return f"{cot}{self.cfg.cot_delimiter}{row['answer']}" if cot is not None else row["answer"]
        return row["continuation"]

    def _preamble(self, target: int) -> str:
        text = self.cfg.prompt_string
        if self.k > 0:
            for i in fewshot_indices(len(self.rows), self.k, self.rng, target):
                text += self._render(self.rows[i], text, answer=True)
        return text

    def example(self, i: int) -> Example:
        row, c = self.rows[i], self.cfg
        preamble = self._preamble(i)
        pre_ids = self.tok.encode(preamble)
        if len(pre_ids) > 1 and pre_ids[-1] == self.tok.eos_id:
            pre_ids = pre_ids[:-1]
        if c.kind == "schema":
            continuation = tuple(self.tok.encode(self._space(row["continuation"])))
            options = [
                (c.question_prelimiter + c.example_delimiter + o + c.continuation_delimiter.rstrip())
                if preamble
                else c.question_prelimiter + o
                for o in row["context_options"]
            ]
            return Example([LLRequest(tuple(pre_ids + self.tok.encode(o)), continuation) for o in options], row["gold"])
        context = tuple(pre_ids + self.tok.encode(self._render(row, preamble, answer=False).rstrip()))
        if c.kind == "language_modeling":
            return Example([LLRequest(context, tuple(self.tok.encode(self._space(row["continuation"]))))])
        if c.kind == "multiple_choice":
            return Example(
                [LLRequest(context, tuple(self.tok.encode(self._space(ch)))) for ch in row["choices"]], row["gold"]
            )
        answers = list(dict.fromkeys([row["answer"]] + list(row.get("aliases") or [])))
        return Example(prompt=list(context), answers=answers)

    def max_answer_tokens(self) -> int:
        """Generation budget: the longest answer or alias (with its chain of thought), +10 with a cot delimiter."""
        longest = 0
        for row in self.rows:
            cot = row.get("chain_of_thought")
            prefix = f"{cot}{self.cfg.cot_delimiter}" if cot is not None else ""
            for a in [row["answer"]] + list(row.get("aliases") or []):
                longest = max(longest, len(self.tok.encode(prefix + a)))
        return max(1, longest + (10 if self.cfg.cot_delimiter else 0))


def normalize_answer(text: str) -> str:
    """LLM Foundry's normalization: underscores, case, punctuation, articles and spacing."""
    text = text.replace("_", " ").lower()
    punctuation = set(string.punctuation + "‘’´`")
    text = "".join(" " if ch in punctuation else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def generation_correct(output: str, answers: list[str], stops: list[str], cot_delimiter: str, normalize: bool) -> bool:
    """Cut at a stop string, keep the part after the last cot delimiter, then a prefix match."""
    if stops:
        output = re.split("|".join(map(re.escape, stops)), output)[0]
    if cot_delimiter:
        output = output.split(cot_delimiter)[-1]
    clean = normalize_answer if normalize else str.strip
    got = clean(output)
    return any(got.startswith(clean(a)) for a in answers)
