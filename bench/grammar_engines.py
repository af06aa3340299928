"""Per-token mask cost and vocabulary setup: llguidance (our structured-output engine) against xgrammar, on
the GPT-NeoX tokenizer, one JSON schema, the tokens of a valid answer (CPU, 2 threads).

    pip install --no-deps --target /tmp/xg xgrammar apache-tvm-ffi   # xgrammar is no dependency of ours
    PYTHONPATH=/tmp/xg python bench/grammar_engines.py [--out bench/results/grammar_engines.json]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from longboi.hardware import cpu_capability

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT.parent / "shared" / "data" / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
V = 50432
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
    },
    "required": ["title", "year", "tags"],
}
ANSWER = json.dumps(
    {"title": "The quick brown fox jumps over", "year": 1999, "tags": ["a", "c", "b"]}, separators=(",", ":")
)


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def llguidance_costs(ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch as llt
    from tokenizers import Tokenizer

    lt, setup = timed(lambda: llguidance.LLTokenizer(Tokenizer.from_file(str(TOK)).to_str(), n_vocab=V, eos_token=0))
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matcher, compile_s = timed(lambda: llguidance.LLMatcher(lt, grammar))
    mask, times = llt.allocate_token_bitmask(1, V), []
    for tid in ids:
        times.append(timed(lambda: llt.fill_next_token_bitmask(matcher, mask, 0))[1])
        assert matcher.consume_token(tid), matcher.get_error()
    return _summary("llguidance", setup, compile_s, times)


def xgrammar_costs(ids: list[int]) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(TOK))
    compiler, setup = timed(lambda: xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)))
    schema = json.dumps(SCHEMA)
    compiled, compile_s = timed(
        lambda: compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    )
    matcher, mask, times = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, V), []
    for tid in ids:
        times.append(timed(lambda: matcher.fill_next_token_bitmask(mask, 0))[1])
        assert matcher.accept_token(tid)
    return _summary("xgrammar", setup, compile_s, times)


def _summary(engine: str, setup: float, compile_s: float, times: list[float]) -> dict:
    times = sorted(times)
    return {
        "engine": engine,
        "vocabulary_setup_s": setup,
        "schema_compile_s": compile_s,
        "mask_us_median": times[len(times) // 2] * 1e6,
        "mask_us_max": times[-1] * 1e6,
    }


def main() -> None:
    from tokenizers import Tokenizer

    torch.set_num_threads(2)
    ids = Tokenizer.from_file(str(TOK)).encode(ANSWER).ids
    rows = [llguidance_costs(ids)]
    try:
        rows.append(xgrammar_costs(ids))
    except ImportError:
        print("xgrammar is not installed (see the docstring): llguidance alone")
    for r in rows:
        print(
            f"{r['engine']:<10} setup {r['vocabulary_setup_s']:.3f} s, compile {r['schema_compile_s'] * 1e3:.1f} ms, "
            f"mask median {r['mask_us_median']:.1f} us, max {r['mask_us_max']:.0f} us"
        )
    out = (
        sys.argv[sys.argv.index("--out") + 1]
        if "--out" in sys.argv
        else str(ROOT / "bench/results/grammar_engines.json")
    )
    Path(out).write_text(json.dumps({"cpu": cpu_capability(), "tokens": len(ids), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
