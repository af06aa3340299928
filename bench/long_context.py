"""Long context, StoryWriter style: finetune the demo model at 4x its trained length, measure past it.

    make demo                       # the base model, trained at 256 tokens: runs/demo/train/final
    python bench/long_context.py    # [--out bench/results/long_context.json]

1. `longboi prepare` the demo's training text again in 1,025-token samples (the demo tokenizer, the
   same 90% / 10% split, so the held-out text is the demo's held-out text);
2. `longboi finetune configs/finetune/long-context.yaml` (4x the base length; ALiBi needs no
   position changes, only max_seq_len);
3. `longboi perplexity` of the base and the finetuned model on the held-out 10% at 1x, 4x and 16x the
   base length (256, 1,024, 4,096 tokens per window).
Prints the table and writes JSON. The finetuned model also trained longer overall, so the 1x row is
the control: the gain that remains at 4x and 16x beyond it is what the longer context brought.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
RECIPE = ROOT / "configs" / "finetune" / "long-context.yaml"
BASE, TOKENIZER, HELD_OUT = (
    ROOT / "runs/demo/train/final",
    ROOT / "runs/demo/tokenizer.json",
    ROOT / "runs/demo/data/val",
)
LONG_DATA, LONG_RUN = ROOT / "runs/long/data", ROOT / "runs/long/train"


def main() -> None:
    from longboi import cli
    from longboi.hardware import cpu_capability

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "long_context.json"))
    args = parser.parse_args()
    if not (BASE / "model.safetensors").is_file():
        raise SystemExit(f"{BASE} is missing: run `make demo` first")
    if not (LONG_DATA / "val" / "index.json").is_file():
        cli.prepare([str(SHAKESPEARE)], out=str(LONG_DATA), tokenizer=str(TOKENIZER), seq_len=1025, val_fraction=0.1)
    start = time.monotonic()
    cli.finetune(str(RECIPE))
    minutes = (time.monotonic() - start) / 60
    rows = []
    for seq_len in (256, 1024, 4096):
        base = cli.perplexity(str(BASE), str(HELD_OUT), seq_len=seq_len, batch_size=1)
        tuned = cli.perplexity(str(LONG_RUN / "final"), str(HELD_OUT), seq_len=seq_len, batch_size=1)
        rows.append({"seq_len": seq_len, "base_ppl": base["perplexity"], "finetuned_ppl": tuned["perplexity"],
                     "base_bpb": base["bits_per_byte"], "finetuned_bpb": tuned["bits_per_byte"]})  # fmt: skip
    threads = torch.get_num_threads()
    print(f"\n# held-out Tiny Shakespeare, CPU {cpu_capability()}, {threads} threads; finetune {minutes:.1f} min")
    print(f"{'window':>8}{'x base':>8}{'base ppl':>10}{'tuned ppl':>11}{'base bpb':>10}{'tuned bpb':>11}")
    for r in rows:
        print(
            f"{r['seq_len']:>8}{r['seq_len'] // 256:>7}x{r['base_ppl']:>10.2f}{r['finetuned_ppl']:>11.2f}"
            f"{r['base_bpb']:>10.3f}{r['finetuned_bpb']:>11.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_capability(), "finetune_minutes": minutes, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
