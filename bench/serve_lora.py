"""Serving many adapters and structured output: what they cost.

    python bench/serve_lora.py [--model mpt-125m] [--clients 64] [--max-tokens 32] [--out bench/results/serve_lora.json]

Mixed adapters: 3 LoRA adapters (rank 8 on every block linear, random A and B) on a random-weight base.
`clients` closed-loop streaming clients spread evenly over the base and the 3 adapters send 1 request
each (48-token TinyStories prompts, `max-tokens` greedy tokens, ignore_eos). Against: the same load on
4 servers (the base and each merged adapter, `longboi merge`), each taking its quarter of the clients at
the same time. Reported: aggregate tokens/s, p95 time to first token, and resident memory (VmRSS of the
server processes after the run, summed).
Structured output: 1 and 16 clients, the same prompts with and without `response_format` (a JSON schema
with a free string, so answers run long), tokens/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serve import TOKENIZER, Server, prompts, stream_request, summarize  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "year": {"type": "integer"}, "tags": {"type": "array"}},
    "required": ["title", "year"],
}


async def run(jobs: list[tuple[str, dict]], timeout: float = 900) -> dict:
    """Each (url, body) is one client's one request, all at once."""
    import httpx

    limits = httpx.Limits(max_connections=len(jobs) + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        results = await asyncio.gather(*(stream_request(client, url, body) for url, body in jobs))
    return summarize(list(results), time.perf_counter() - start)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_adapters(base: Path, work: Path) -> dict[str, Path]:
    from longboi import cli
    from longboi.checkpoint import load_model
    from longboi.lora import LoraSettings, add_lora, save_adapter

    out = {}
    for i in range(3):
        model = add_lora(load_model(base), LoraSettings(r=8, alpha=16))
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        out[f"a{i}"] = save_adapter(model, work / f"a{i}", str(base))
        cli.merge(str(base), str(out[f"a{i}"]), str(work / f"merged{i}"))
    return out


def mixed(base: Path, adapters: dict[str, Path], work: Path, args) -> list[dict]:
    names = ["base", *adapters]
    texts = prompts(args.clients, 48)
    body = lambda i, model: {  # noqa: E731
        "model": model,
        "prompt": texts[i],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    flags = ["--max-batch", str(args.clients), "--dtype", args.dtype, "--served-model-name", "base"]
    lora = [f for name, path in adapters.items() for f in ("--lora", f"{name}={path}")]
    one = Server(base, *flags, *lora)
    try:
        asyncio.run(run([(one.url, body(0, "a0"))]))  # warm-up
        r = asyncio.run(run([(one.url, body(i, names[i % 4])) for i in range(args.clients)]))
        rows = [{"run": "one server, base + 3 adapters", **r, "rss_mib": rss_mib(one.proc.pid)}]
    finally:
        one.stop()
    dirs = [base] + [work / f"merged{i}" for i in range(3)]
    servers = [Server(d, *flags) for d in dirs]
    try:
        for s in servers:
            asyncio.run(run([(s.url, body(0, "base"))]))
        r = asyncio.run(run([(servers[i % 4].url, body(i, "base")) for i in range(args.clients)]))
        rows.append(
            {"run": "4 servers at once, base + 3 merged", **r, "rss_mib": sum(rss_mib(s.proc.pid) for s in servers)}
        )
        # Each merged server alone with its quarter (no CPU shared between servers: their best case here)
        parts = [
            asyncio.run(run([(s.url, body(i, "base")) for i in range(k, args.clients, 4)]))
            for k, s in enumerate(servers)
        ]
        tokens, wall = sum(p["tokens"] for p in parts), sum(p["wall_s"] for p in parts)
        ttft = max(p["ttft_p95"] for p in parts)
        rows.append(
            {
                "run": "4 servers one after another",
                "tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": tokens / wall,
                "ttft_p95": ttft,
                "errors": sum(p["errors"] for p in parts),
            }
        )
    finally:
        for s in servers:
            s.stop()
    return rows


def structured(base: Path, args) -> list[dict]:
    texts = prompts(16, 48)
    server = Server(base, "--max-batch", "16", "--dtype", args.dtype)
    rows = []
    try:
        for clients in (1, 16):
            for label, extra in (("plain", {}), ("json_schema", {"response_format": _format()})):
                jobs = [
                    (
                        server.url,
                        {"prompt": texts[i], "max_tokens": args.max_tokens, "temperature": 1.0, "seed": i} | extra,
                    )
                    for i in range(clients)
                ]
                asyncio.run(run(jobs[:1]))  # warm-up (the first structured request builds the vocabulary index)
                rows.append({"run": f"{label} x{clients}", "clients": clients, **asyncio.run(run(jobs))})
    finally:
        server.stop()
    return rows


def _format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}}


def main() -> None:
    from longboi import cli
    from longboi.hardware import cpu_capability

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mpt-125m")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_lora.json"))
    args = p.parse_args()
    print(f"CPU: {cpu_capability()}, torch {torch.__version__}, {args.model}, {args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "base"
        cli.init(args.model, str(base), tokenizer=str(TOKENIZER))
        rows = mixed(base, make_adapters(base, work), work, args) + structured(base, args)
    for r in rows:
        mem = f", {r['rss_mib']:.0f} MiB" if "rss_mib" in r else ""
        print(
            f"{r['run']:<34} {r['tokens_per_s']:8.1f} tok/s, TTFT p95 {r['ttft_p95']:.2f} s, errors {r['errors']}{mem}"
        )
    meta = {"cpu": cpu_capability(), "torch": torch.__version__, "model": args.model, "dtype": args.dtype}
    Path(args.out).write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
