"""Benchmark the ICL harness against EleutherAI's lm-evaluation-harness on the same model and requests.

    python bench/eval.py [--ckpt DIR] [--examples 300] [--out bench/results/eval.json]

PIQA (multiple choice, 10-shot as in LLM Foundry's task list) and LAMBADA (language modeling, 0-shot)
from ../shared/data/eval/local_data. Our task builder makes the requests; ours scores them with
longboi's engine, the peer with lm-eval's HFLM `loglikelihood` on the same (context, continuation)
text pairs. Prints examples/s, the speed ratio, and both accuracies (which must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TASKS = [
    ("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", "\nAnswer: ", 10),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", " ", 0),
]


def accuracy(kind: str, examples, results) -> float:
    at, hits = 0, 0
    for ex in examples:
        scored = results[at : at + len(ex.requests)]
        at += len(ex.requests)
        if kind == "language_modeling":
            hits += scored[0][1]
        else:
            means = [lp / n for lp, _, n in scored]
            hits += max(range(len(means)), key=lambda i: (means[i], -i)) == ex.gold
    return hits / len(examples)


def main() -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from longboi.checkpoint import load_model, load_tokenizer, save_checkpoint
    from longboi.config import preset
    from longboi.eval.scoring import loglikelihoods
    from longboi.eval.tasks import TaskBuilder, TaskConfig, read_rows
    from longboi.model import MPTForCausalLM
    from longboi.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="an HF-representable checkpoint (default: a random `tiny` model)")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    ckpt = args.ckpt
    if ckpt is None:
        torch.manual_seed(0)
        ckpt = str(Path(tempfile.mkdtemp()) / "tiny")
        save_checkpoint(
            MPTForCausalLM(preset("tiny").replace(max_seq_len=2048)),
            ckpt,
            Tokenizer(SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
        )
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    peer = HFLM(pretrained=ckpt, device="cpu", batch_size=args.batch_size, max_length=model.config.max_seq_len)
    print(
        f"# ICL harness: longboi vs lm-eval {__import__('lm_eval').__version__} ({torch.get_num_threads()} threads, "
        f"fp32, {ckpt})"
    )
    print(
        f"{'task':<16}{'shots':>6}{'examples':>9}{'ours ex/s':>11}{'peer ex/s':>11}{'ours/peer':>11}"
        f"{'ours acc':>10}{'peer acc':>10}"
    )
    rows_out = []
    for label, uri, kind, delim, shots in TASKS:
        cfg = TaskConfig(label=label, dataset_uri=uri, icl_task_type=kind, continuation_delimiter=delim)
        rows = read_rows(SHARED / "eval" / "local_data" / uri, kind)[: args.examples]
        examples = TaskBuilder(cfg, tok, rows, shots).examples()
        reqs = [r for e in examples for r in e.requests]
        start = time.perf_counter()
        ours = loglikelihoods(model, reqs, model.config.max_seq_len)
        t_ours = time.perf_counter() - start
        texts = [
            (tok.decode(r.context, skip_special_tokens=False), tok.decode(r.continuation, skip_special_tokens=False))
            for r in reqs
        ]
        start = time.perf_counter()
        theirs = peer.loglikelihood(
            [Instance(request_type="loglikelihood", doc={}, arguments=t, idx=i) for i, t in enumerate(texts)]
        )
        t_peer = time.perf_counter() - start
        acc_ours = accuracy(kind, examples, [(r.logprob, r.greedy, r.n_tokens) for r in ours])
        acc_peer = accuracy(kind, examples, [(lp, g, len(r.continuation)) for (lp, g), r in zip(theirs, reqs)])
        max_diff = max(abs(a.logprob - b[0]) for a, b in zip(ours, theirs))
        row = {
            "task": label,
            "shots": shots,
            "examples": len(examples),
            "ours_ex_s": len(examples) / t_ours,
            "peer_ex_s": len(examples) / t_peer,
            "ratio": t_peer / t_ours,
            "ours_acc": acc_ours,
            "peer_acc": acc_peer,
            "max_logprob_diff": max_diff,
        }
        rows_out.append(row)
        print(
            f"{label:<16}{shots:>6}{len(examples):>9}{row['ours_ex_s']:>11.1f}{row['peer_ex_s']:>11.1f}"
            f"{row['ratio']:>10.2f}x{acc_ours:>10.4f}{acc_peer:>10.4f}   (max |logprob diff| {max_diff:.2e})"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows_out}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
