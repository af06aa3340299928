"""`longboi eval`: run an LLM Foundry-style task list on a model, write results.json and a table.

Also the eval gauntlet: per-category averages of baseline-subtracted (and rescaled) accuracies, as
LLM Foundry's eval_gauntlet_callback computes them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm import tqdm

from longboi.config import from_dict
from longboi.errors import UserError
from longboi.eval.scoring import ALONE, Share, balanced, greedy_generate, loglikelihoods
from longboi.eval.tasks import Example, TaskBuilder, TaskConfig, generation_correct, read_rows
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer


@dataclass(frozen=True)
class TaskResult:
    label: str
    num_fewshot: int
    task_type: str
    accuracy: float  # LLM Foundry's metric for the type (multiple choice: mean-token-loss choice)
    examples: int
    seconds: float
    accuracy_sum_logprob: float | None = None  # multiple choice / schema: summed log-likelihood choice
    categories: dict[str, float] = field(default_factory=dict)


def load_tasks(path: str | Path) -> list[TaskConfig]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    tasks = data.get("icl_tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list):
        raise UserError(f"{path}: expected a top-level `icl_tasks:` list")
    return [from_dict(TaskConfig, t, f"{path}: icl_tasks[{i}]") for i, t in enumerate(tasks)]


def run_task(
    model: MPTForCausalLM,
    tok: Tokenizer,
    cfg: TaskConfig,
    rows: list[dict],
    k: int,
    max_seq_len: int,
    batch_tokens: int = 8192,
    share: Share = ALONE,
) -> tuple[float, float | None, int]:
    """(accuracy, summed-logprob accuracy or None, examples) of one task partition at k shots."""
    builder = TaskBuilder(cfg, tok, rows, k)
    examples = builder.examples()
    seq_len = cfg.max_seq_len or max_seq_len
    generating = cfg.kind == "generation_task_with_answers"
    answer_tokens = builder.max_answer_tokens() if generating else 0
    costs = [
        len(e.prompt) + answer_tokens + sum(len(r.context) + len(r.continuation) for r in e.requests) for e in examples
    ]
    mine = balanced(costs, share.world_size)[share.rank]
    outcomes = _outcomes(model, tok, cfg, [examples[i] for i in mine], seq_len, batch_tokens, answer_tokens)
    everyone: dict[int, Any] = {}
    for part in share.gather(dict(zip(mine, outcomes))):
        everyone.update(part)
    ordered = [everyone[i] for i in range(len(examples))]
    if generating:
        return sum(ordered) / len(ordered), None, len(examples)
    if cfg.kind == "language_modeling":
        flags = [f for o in ordered for f in o]
        return sum(flags) / len(flags), None, len(examples)
    return sum(o[0] for o in ordered) / len(ordered), sum(o[1] for o in ordered) / len(ordered), len(examples)


def _outcomes(
    model: MPTForCausalLM,
    tok: Tokenizer,
    cfg: TaskConfig,
    examples: list[Example],
    seq_len: int,
    batch_tokens: int,
    answer_tokens: int,
) -> list:
    """Per example: generation: correct; language modeling: the greedy flag of each request; multiple
    choice and schema: (right by mean token loss, right by summed log-likelihood)."""
    requests = sum(len(e.requests) for e in examples) or len(examples)
    bar = tqdm(total=requests, desc=f"{cfg.label}", unit="req", leave=False)
    if cfg.kind == "generation_task_with_answers":
        stops = list(cfg.early_stopping_criteria or [])
        prompts = [e.prompt for e in examples]
        texts = greedy_generate(model, tok, prompts, stops, answer_tokens, seq_len, batch_size=cfg.batch_size or 8)
        bar.close()
        return [
            generation_correct(t, e.answers, stops, cfg.cot_delimiter, cfg.do_normalization)
            for t, e in zip(texts, examples)
        ]
    flat = [r for e in examples for r in e.requests]
    results = loglikelihoods(model, flat, seq_len, batch_tokens, progress=bar.update)
    bar.close()
    out, at = [], 0
    for e in examples:
        scored = results[at : at + len(e.requests)]
        at += len(e.requests)
        if cfg.kind == "language_modeling":
            out.append(tuple(r.greedy for r in scored))
        else:
            mean = _argmax([r.logprob / r.n_tokens for r in scored]) == e.gold  # LLM Foundry's rule
            out.append((mean, _argmax([r.logprob for r in scored]) == e.gold))
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index wins ties


def evaluate(
    model: MPTForCausalLM,
    tok: Tokenizer,
    tasks: list[TaskConfig],
    data_root: str | Path,
    max_seq_len: int | None = None,
    limit: int | None = None,
    time_budget_s: float | None = None,
    anyone: Callable[[bool], bool] = bool,
    clock: Callable[[], float] = time.perf_counter,
    share: Share = ALONE,
) -> tuple[list[TaskResult], list[str]]:
    """Run every (task, num_fewshot); returns results and what was skipped (missing file, time budget).

    Several processes (torchrun, or the ranks of a training run) each score their `share` of every
    task and gather the outcomes, so every rank returns the same results; under FSDP the caller holds
    the full weights meanwhile (`parallelize.full_weights`), so a rank's forwards wait for no peer. A
    task must be run or skipped on all ranks together: `anyone(flag)` is True on every rank when it is
    True on any (a collective), whatever each rank's clock or filesystem says.
    """
    model.eval()
    seq_len = max_seq_len or model.config.max_seq_len
    results, skipped = [], []
    begin = clock()
    for cfg in tasks:
        if anyone(time_budget_s is not None and clock() - begin > time_budget_s):
            skipped.append(f"{cfg.label} (time budget {time_budget_s:.0f}s spent)")
            continue
        path = Path(data_root) / cfg.dataset_uri
        if anyone(not path.is_file()):
            skipped.append(f"{cfg.label} ({path} not found{' on some rank' if path.is_file() else ''})")
            continue
        rows = read_rows(path, cfg.kind)[:limit]
        partitions = _partitions(rows, cfg, path)
        for k in cfg.num_fewshot:
            start = time.perf_counter()
            scores = {
                name: run_task(model, tok, cfg, part, k, seq_len, share=share) for name, part in partitions.items()
            }
            acc = sum(s[0] for s in scores.values()) / len(scores)  # macro-mean over categories
            sums = [s[1] for s in scores.values() if s[1] is not None]
            results.append(
                TaskResult(
                    cfg.label,
                    k,
                    cfg.kind,
                    acc,
                    sum(s[2] for s in scores.values()),
                    time.perf_counter() - start,
                    sum(sums) / len(sums) if sums else None,
                    {name: s[0] for name, s in scores.items()} if cfg.has_categories else {},
                )
            )
    return results, skipped


def _partitions(rows: list[dict], cfg: TaskConfig, path: Path) -> dict[str, list[dict]]:
    if not cfg.has_categories:
        return {"all": rows}
    if any("category" not in r for r in rows):
        raise UserError(f"{path}: has_categories is set but some rows have no `category`")
    return {c: [r for r in rows if r["category"] == c] for c in sorted({r["category"] for r in rows})}


def write_results(
    results: list[TaskResult],
    skipped: list[str],
    out: str | Path,
    gauntlet: dict[str, float] | None = None,
    precision: str | None = None,
    world_size: int = 1,
) -> Path:
    """results.json and results.md; `precision` (fp32, bf16, ...) is recorded because scores depend on it,
    `world_size` because the seconds do (the scores do not)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"tasks": [r.__dict__ for r in results], "skipped": skipped, "gauntlet": gauntlet or {}}
    payload["precision"] = precision
    payload["world_size"] = world_size
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "| task | shots | type | accuracy | acc (sum logprob) | examples | ex/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        alt = f"{r.accuracy_sum_logprob:.4f}" if r.accuracy_sum_logprob is not None else ""
        lines.append(
            f"| {r.label} | {r.num_fewshot} | {r.task_type} | {r.accuracy:.4f} | {alt} | {r.examples} | "
            f"{r.examples / max(r.seconds, 1e-9):.1f} |"
        )
    if precision:
        lines += ["", f"Precision: {precision} (scores depend on it; `--dtype fp32` reproduces across machines)"]
    if world_size > 1:
        lines += ["", f"Evaluated by {world_size} processes, each scoring its share of every task."]
    if gauntlet:
        lines += ["", "| gauntlet | score |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in gauntlet.items()]
    if skipped:
        lines += ["", "Skipped (dataset file missing): " + ", ".join(skipped)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# The eval gauntlet.


@dataclass(frozen=True)
class GauntletBenchmark:
    name: str
    num_fewshot: int
    random_baseline: float


@dataclass(frozen=True)
class GauntletCategory:
    name: str
    benchmarks: list[GauntletBenchmark]


@dataclass(frozen=True)
class Gauntlet:
    categories: list[GauntletCategory]
    weighting: Literal["EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ"] = "EQUAL"
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True
    averages: dict[str, list[str]] | None = None


def load_gauntlet(path: str | Path) -> Gauntlet:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"gauntlet file not found: {path}")
    data = (yaml.safe_load(path.read_text()) or {}).get("eval_gauntlet")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a top-level `eval_gauntlet:` mapping")
    g = from_dict(Gauntlet, data, f"{path}: eval_gauntlet")
    if g.rescale_accuracy and not g.subtract_random_baseline:
        raise UserError(f"{path}: rescale_accuracy needs subtract_random_baseline")
    return g


def gauntlet_scores(g: Gauntlet, results: list[TaskResult]) -> dict[str, float]:
    """Category scores (weighted mean of baseline-adjusted accuracies) and the named averages.

    A category with any benchmark missing from `results` is left out, as LLM Foundry does.
    """
    by_key = {(r.label, r.num_fewshot): r for r in results}
    scores: dict[str, float] = {}
    for cat in g.categories:
        parts = []
        for b in cat.benchmarks:
            r = by_key.get((b.name, b.num_fewshot))
            if r is None:
                break
            score = r.accuracy
            if g.subtract_random_baseline:
                score -= b.random_baseline
                if g.rescale_accuracy:
                    score /= 1 - b.random_baseline
            weight = {
                "EQUAL": 1.0,
                "SAMPLE_SZ": float(max(r.examples, 1)),
                "LOG_SAMPLE_SZ": max(math.log2(max(r.examples, 1)), 1.0),
            }[g.weighting]
            parts.append((score, weight))
        else:
            scores[cat.name] = sum(s * w for s, w in parts) / sum(w for _, w in parts)
    averages = g.averages or {"default_average": [c.name for c in g.categories]}
    for name, cats in averages.items():
        present = [scores[c] for c in cats if c in scores]
        scores[name] = sum(present) / len(present) if present else 0.0
    return scores
