"""The serving engine's paged KV cache with the real model: a step mixing decodes and prompt pieces gives
each sequence the numbers it has alone, prefix-cache hits give the numbers of recomputation, and memory
pressure evicts and preempts without changing any output."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import build, small_config, submit_all

from longboi.generate import SamplingParams
from longboi.serve.engine import Engine, Job, kv_bytes_per_token
from longboi.serve.kv_cache import PagedCache
from longboi.tokenizer import Tokenizer


def run(engine: Engine, jobs: list[tuple[list[int], SamplingParams]], logprobs: int | None = None) -> list[list]:
    """Submit all jobs at once; each one's (token, logprob) list."""
    out: dict[int, list] = {k: [] for k in range(len(jobs))}
    done = threading.Semaphore(0)
    for k, (prompt, params) in enumerate(jobs):

        def sink(ev, k=k):
            assert ev.error is None, ev.error
            out[k].extend((t.id, t.logprob) for t in ev.tokens)
            if ev.done:
                done.release()

        engine.submit(Job(prompt, params, sink, logprobs=logprobs))
    for _ in jobs:
        assert done.acquire(timeout=120)
    return [out[k] for k in range(len(jobs))]


@pytest.mark.parametrize("kind", ["alibi", "learned", "gqa"])
def test_one_step_of_mixed_decodes_and_prompt_pieces_equals_each_sequence_alone(kind):
    cfg = {
        "alibi": dict(),
        "learned": dict(alibi=False, learned_pos_emb=True),
        "gqa": dict(attn_type="grouped_query_attention", kv_n_heads=2),
    }[kind]
    model = build(small_config(**cfg), seed=2)
    a, b = torch.randint(0, 1000, (1, 23)), torch.randint(0, 1000, (1, 11))
    with torch.no_grad():
        ref_a, ref_b = model(a)[0], model(b)[0]
        cache = PagedCache(model.config.n_layers, blocks=32, block_size=4)
        blocks_a, blocks_b = [5, 1, 2, 9, 3, 4], [8, 7, 6]  # scattered on purpose
        slopes = model.transformer.alibi_slopes(torch.device("cpu"))

        def step(segments, decodes, ids):
            cache.plan(segments, decodes, slopes, torch.device("cpu"))
            return model(torch.tensor([ids]), cache=cache)[0]

        out = step([(0, 10, blocks_a), (0, 5, blocks_b)], 0, a[0, :10].tolist() + b[0, :5].tolist())
        torch.testing.assert_close(out, torch.cat([ref_a[:10], ref_b[:5]]), atol=2e-5, rtol=0)
        out = step([(5, 1, blocks_b), (10, 12, blocks_a)], 1, b[0, 5:6].tolist() + a[0, 10:22].tolist())
        torch.testing.assert_close(out, torch.cat([ref_b[5:6], ref_a[10:22]]), atol=2e-5, rtol=0)
        out = step([(22, 1, blocks_a), (6, 1, blocks_b)], 2, a[0, 22:].tolist() + b[0, 6:7].tolist())
        torch.testing.assert_close(out, torch.cat([ref_a[22:], ref_b[6:7]]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["alibi", "gqa"])
def test_one_long_decode_row_beside_many_short_ones_gathers_each_group_to_its_own_length(kind):
    """One 2,000-position row and 32 rows of 20 decode together: gathered to the longest row, the short ones
    would cost 2,000 positions each (33x the long row's keys); in length groups the gathered keys/values stay
    within twice those the rows hold. Each row's output still equals its sequence computed alone."""
    cfg = {"alibi": dict(), "gqa": dict(attn_type="grouped_query_attention", kv_n_heads=2)}[kind]
    model = build(small_config(max_seq_len=4096, **cfg), seed=2)
    bs, lengths = 16, [20] * 16 + [2000] + [20] * 16  # the long row in the middle: outputs keep row order
    seqs = [torch.randint(0, 1000, (n + 1,)) for n in lengths]
    tables, next_block = [], 1
    for n in lengths:
        tables.append(list(range(next_block, next_block + n // bs + 1)))
        next_block += n // bs + 1
    cache = PagedCache(model.config.n_layers, blocks=next_block, block_size=bs)
    slopes = model.transformer.alibi_slopes(torch.device("cpu"))
    with torch.no_grad():
        for seq, table, n in zip(seqs, tables, lengths):  # the prompts, one by one
            cache.plan([(0, n, table)], 0, slopes, torch.device("cpu"))
            model(seq[None, :n], cache=cache)
        cache.plan([(n, 1, table) for n, table in zip(lengths, tables)], len(lengths), slopes, torch.device("cpu"))
        out = model(torch.stack([seq[-1] for seq in seqs])[None], cache=cache)[0]
        want = torch.stack([model(seq[None])[0, -1] for seq in seqs])
    torch.testing.assert_close(out, want, atol=5e-5, rtol=0)
    cfg = model.config
    gathered = sum(t.numel() for t in cache._gathered) * 4  # fp32 keys and values
    held = 2 * sum(n + 1 for n in lengths) * cfg.kv_heads * cfg.head_dim * 4
    assert gathered <= 2 * held  # padded to the longest row it would be 33 x 2,001 positions: 15x more
    assert len(cache.decode_groups) == 2


def test_a_reused_block_never_shows_what_its_last_sequence_left():
    """A retired sequence may leave inf in a block (an overflowing model); a new sequence in that block
    reads only the positions it wrote, and gathers pad with the zero block: 0 x inf would be NaN."""
    model = build(small_config(), seed=2)
    cache = PagedCache(model.config.n_layers, blocks=8, block_size=4)
    slopes = model.transformer.alibi_slopes(torch.device("cpu"))
    with torch.no_grad():
        cache.plan([(0, 8, [1, 2])], 0, slopes, torch.device("cpu"))
        model(torch.randint(0, 1000, (1, 8)), cache=cache)
        cache.keys[:, :, 4:12] = float("inf")  # what the old sequence left in blocks 1 and 2
        cache.values[:, :, 4:12] = float("inf")
        cache.plan([(0, 2, [2])], 0, slopes, torch.device("cpu"))
        model(torch.tensor([[5, 6]]), cache=cache)
        cache.plan([(2, 1, [2]), (1, 1, [3])], 2, slopes, torch.device("cpu"))  # two decodes of unequal length
        cache.keys[:, :, 12] = 0  # the other row's first position
        cache.values[:, :, 12] = 0
        out = model(torch.tensor([[7, 8]]), cache=cache)
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def served(tokenizer_path):
    from conftest import trained

    tok = Tokenizer(tokenizer_path)
    return trained(tok), tok


def test_a_shared_prefix_is_computed_once_and_gives_the_numbers_of_recomputation(served):
    model, tok = served
    system = tok.encode("You are a helpful assistant who answers in the voice of a Shakespearean actor. " * 2)
    prompts = [system + tok.encode(q) for q in ("ROMEO:", "JULIET: Where", "Tell me of the sea", "KING:")]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    plain = Engine(model, tok, prefill_chunk=16, prefix_cache=False).start()
    cached = Engine(model, tok, prefill_chunk=16).start()
    try:
        reference = run(plain, [(p, params) for p in prompts], logprobs=0)
        first = run(cached, [(prompts[0], params)], logprobs=0)  # computes the system prompt
        rest = run(cached, [(p, params) for p in prompts[1:]], logprobs=0)  # take it from the cache
        assert cached.scheduler.pool.hits >= 3 * (len(system) // 16 * 16) and plain.scheduler.pool.hits == 0
    finally:
        plain.stop()
        cached.stop()
    for got, want in zip(first + rest, reference):
        assert [t for t, _ in got] == [t for t, _ in want]  # greedy: the same tokens
        assert max(abs(g - w) for (_, g), (_, w) in zip(got, want)) < 1e-4  # and the same numbers


def test_memory_pressure_evicts_cached_prefixes_and_preempts_without_changing_any_output(served):
    model, tok = served
    per_block = 16 * kv_bytes_per_token(model)
    prompts = [tok.encode(f"Citizen {i}: we are accounted poor citizens, the patricians good {i}") for i in range(8)]
    params = [SamplingParams(max_new_tokens=30, temperature=0.8, top_k=20, seed=i) for i in range(8)]
    roomy = Engine(model, tok).start()
    tight = Engine(model, tok, kv_cache_bytes=6 * per_block).start()  # 6 blocks: each job needs 3 at its longest
    try:
        want = run(roomy, list(zip(prompts, params)))
        got = run(tight, list(zip(prompts, params)))
        again = run(tight, list(zip(prompts, params)))  # the cached prefixes of the first round are evicted
    finally:
        roomy.stop()
        tight.stop()
    assert tight.scheduler.preemptions > 0 and tight.scheduler.pool.evictions > 0
    assert [[t for t, _ in r] for r in got] == [[t for t, _ in r] for r in want]
    assert [[t for t, _ in r] for r in again] == [[t for t, _ in r] for r in want]


def test_n_choices_fork_from_one_prompt_and_each_equals_its_seed_alone(served):
    model, tok = served
    prompt = tok.encode("MENENIUS: What work's, my countrymen, in hand?")  # a partial last block to copy
    engine = Engine(model, tok, prefill_chunk=8).start()
    try:
        out: dict[int, list[int]] = {}
        done = threading.Event()

        def sink(ev):
            out.setdefault(ev.index, []).extend(t.id for t in ev.tokens)
            if ev.done:
                done.set()

        params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
        engine.submit(Job(prompt, params, sink, n=3))
        assert done.wait(60)
        alone = [
            run(engine, [(prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5 + i))])[0] for i in range(3)
        ]
    finally:
        engine.stop()
    assert [out[i] for i in range(3)] == [[t for t, _ in a] for a in alone]


def test_prompt_scores_of_positions_taken_from_the_prefix_cache_equal_a_full_computation(served):
    """lm-eval's loglikelihood requests (echo, max_tokens 0) share their few-shot context: positions hit in
    the prefix cache are scored from the hidden states kept with their blocks."""
    model, tok = served
    shots = tok.encode("Q: Who loves Juliet?\nA: Romeo\n\nQ: Who is the king?\nA: Lear\n\n" * 2)
    prompts = [shots + tok.encode(f"Q: Who speaks {i}?\nA: the fool") for i in range(4)]
    tops = [1, 1, 1, 3]  # the last asks for more alternatives than the scores kept with the blocks hold

    def scores(engine: Engine) -> list[list[tuple[int, float | None]]]:
        out = []
        for prompt, top in zip(prompts, tops):
            got: list = []
            done = threading.Event()

            def sink(ev, got=got, done=done):
                got.extend((t.id, t.logprob, [i for i, _ in t.top]) for t in ev.prompt or [])
                if ev.done:
                    done.set()

            engine.submit(Job(prompt, SamplingParams(max_new_tokens=0), sink, prompt_logprobs=top))
            assert done.wait(60)
            out.append(got)
        return out

    plain = Engine(model, tok, prefill_chunk=16, prefix_cache=False).start()
    cached = Engine(model, tok, prefill_chunk=16).start()
    try:
        want, got = scores(plain), scores(cached)
        assert cached.scheduler.pool.hits >= 3 * (len(shots) // 16 * 16)
    finally:
        plain.stop()
        cached.stop()
    for g, w in zip(got, want):
        assert [t for t, _, _ in g] == [t for t, _, _ in w] and g[0][1] is None
        assert max(abs(a - b) for (_, a, _), (_, b, _) in zip(g[1:], w[1:])) < 1e-4
        assert [top for _, _, top in g] == [top for _, _, top in w]  # the same alternatives, as many as asked


def submit_and_wait(engine: Engine, jobs: list[Job]) -> list[dict]:
    """Each job's events gathered: {"tokens": {choice: ids}, "error": ...}."""
    out = [{"tokens": {}, "error": None} for _ in jobs]

    def record(k, ev):
        out[k]["tokens"].setdefault(ev.index, []).extend(t.id for t in ev.tokens)
        if ev.done:
            out[k]["error"] = ev.error

    submit_all(engine, jobs, record)
    return out


@pytest.mark.parametrize("chunk", [16, 256])
def test_n_choices_wait_for_blocks_to_fork_instead_of_failing_under_memory_pressure(served, chunk):
    """A pool of 5 blocks: a long request holds 3 and grows to 5; an n=3 request beside it has room for its
    prompt but not for its choices' copies of the partial last block. It waits (at admission, or at the fork
    when its prompt ends in a later piece) and then equals the same request on a roomy engine."""
    model, tok = served
    per_block = 16 * kv_bytes_per_token(model)
    long = tok.encode("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First")
    long = (long * 3)[:40]
    prompt = tok.encode("MENENIUS: What work's, my countrymen, in hand? Where go you")[:20]

    def jobs():
        return [
            Job(long, SamplingParams(max_new_tokens=30, temperature=0), None),
            Job(prompt, SamplingParams(max_new_tokens=4, temperature=1.0, seed=3), None, n=3),
        ]

    roomy = Engine(model, tok, prefill_chunk=chunk).start()
    tight = Engine(model, tok, prefill_chunk=chunk, kv_cache_bytes=5 * per_block).start()
    try:
        want = submit_and_wait(roomy, jobs())
        got = submit_and_wait(tight, jobs())
    finally:
        roomy.stop()
        tight.stop()
    assert [g["error"] for g in got] == [None, None]
    assert got == want


def test_a_cache_salt_keeps_prefix_hits_within_requests_of_the_same_salt(served):
    """vLLM's cache_salt: one user's cached prompt is no hit (and no faster first token) for another salt or
    for unsalted requests; the same salt hits as before."""
    model, tok = served
    prompt = tok.encode("You are a helpful assistant who answers in the voice of a Shakespearean actor. " * 2)
    engine = Engine(model, tok, prefill_chunk=16, idle_release=600).start()  # the cache outlives the gaps

    def hits_after(salt: str | None) -> int:
        before = engine.scheduler.pool.hits
        (out,) = submit_and_wait(engine, [Job(prompt, SamplingParams(max_new_tokens=2), None, cache_salt=salt)])
        assert out["error"] is None
        return engine.scheduler.pool.hits - before

    try:
        assert hits_after("alice") == 0  # computes and caches it under alice's salt
        assert hits_after("bob") == 0
        assert hits_after(None) == 0
        assert hits_after("alice") == (len(prompt) - 1) // 16 * 16
        assert hits_after(None) == (len(prompt) - 1) // 16 * 16  # the unsalted copy computed above
    finally:
        engine.stop()
