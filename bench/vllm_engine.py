"""vLLM's offline engine as a bench/infer.py engine: runs inside vLLM's own virtualenv (tests/vllm_env.py).

    python bench/vllm_engine.py MODEL_DIR MAX_MODEL_LEN DTYPE

Loads `vllm.LLM` once (vLLM's default compiled CPU path, longboi's plugin), prints "ready", then answers
one JSON line per request on stdin, {"ids": [[...], ...], "new": N}, with {"prefill_s", "decode_s"}: the
rows prefilled and one token sampled (max_tokens 1), then the same rows with N more tokens; decode_s is
the difference (N steps of the whole batch). Greedy, ignore_eos, no detokenization (our engines produce
ids only too), no prefix caching (every repeat prefills for real).
"""

import json
import os
import sys
import time


def timed(llm, prompts: list, tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    # Answers go to the real stdout; vLLM's logs (its engine processes inherit fd 1 too) go to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from vllm import LLM, TokensPrompt

    model, max_len, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=max_len,
        seed=0,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=2 << 30,
    )
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=row) for row in request["ids"]]

        prefill = timed(llm, prompts, 1)
        full = timed(llm, prompts, 1 + request["new"])
        print(json.dumps({"prefill_s": prefill, "decode_s": max(full - prefill, 1e-9)}), file=answers, flush=True)


if __name__ == "__main__":  # vLLM's engine core starts by spawn: the guard is required
    main()
