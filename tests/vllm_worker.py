"""Runs inside vLLM's own virtualenv (tests/vllm_env.py): vLLM's offline `LLM` on each model of a job file.

    python vllm_worker.py JOBS.json OUT.json

JOBS.json: a list of {"model", "prompts" (token id lists), "max_tokens", "max_model_len", "lora" (optional:
{"name", "path", "rank"}: every prompt runs on the base and again through that adapter), "tensor_parallel"
(optional: ranks, one core each)}. OUT.json: per job,
per prompt, the greedy token ids and the log-probability of each prompt token after the first. One engine
per model, fp32, eager (the server test runs vLLM's default compiled path).
"""

import gc
import json
import os
import sys


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    lora, ranks = job.get("lora"), job.get("tensor_parallel", 1)
    # one core per rank (vLLM's CPU binding syntax): the engine processes read it when they start
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(ranks)) if ranks > 1 else "auto"
    llm = LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=job["max_model_len"],
        seed=0,
        enable_lora=lora is not None,
        max_lora_rank=lora["rank"] if lora else 16,
        max_loras=1,
        enable_prefix_caching=False,  # prompt log-probs of every position, computed here
        kv_cache_memory_bytes=256 << 20,  # by default vLLM-CPU takes (and zeroes) most of the machine's memory
        tensor_parallel_size=ranks,
    )
    params = SamplingParams(temperature=0, max_tokens=job["max_tokens"], prompt_logprobs=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    result = {"base": _collect(llm.generate(prompts, params))}
    if lora:
        request = LoRARequest(lora["name"], 1, lora["path"])
        result["lora"] = _collect(llm.generate(prompts, params, lora_request=request))
    del llm
    gc.collect()
    return result


def _collect(outputs) -> list[dict]:
    rows = []
    for out in outputs:
        ids = out.prompt_token_ids
        # prompt_logprobs[0] is None (no context); each later entry maps token id -> Logprob
        logprobs = [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
        rows.append({"tokens": list(out.outputs[0].token_ids), "prompt_logprobs": logprobs})
    return rows


if __name__ == "__main__":  # vLLM's engine core starts by spawn: the guard is required
    jobs = json.loads(open(sys.argv[1]).read())
    results = [run(job) for job in jobs]
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
