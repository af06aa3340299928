"""The serving scheduler's decisions, without a model: admission, chunking, preemption when the KV
blocks run out, prefix hits and eviction. A fake runner "computes" every piece and samples token 7."""

from __future__ import annotations

from longboi.serve.scheduler import Plan, Scheduler, Seq


def run_step(s: Scheduler, finish_after: int | None = None) -> Plan:
    """Execute a plan as the engine's runner would: computed, then one sampled token per last piece."""
    plan = s.schedule()
    for p in plan.pieces:
        assert p.start == p.seq.computed and p.start + p.count <= len(p.seq.blocks) * s.block_size
        s.computed(p.seq, p.count)
    for p in plan.pieces:
        if p.last:
            p.seq.tokens.append(7)
            if finish_after is not None and len(p.seq.tokens) >= finish_after:
                s.finish(p.seq)
    return plan


def held_blocks(s: Scheduler) -> list[int]:
    return [b for q in s.running for b in q.blocks]


def test_prompts_are_cut_at_multiples_of_the_chunk_and_decodes_ride_along():
    s = Scheduler(blocks=64, block_size=4, prefill_chunk=8, step_tokens=8)
    a, b = Seq(list(range(20))), Seq(list(range(100, 103)))
    s.add(a)
    s.add(b)
    plan = run_step(s)
    assert [(p.seq, p.start, p.count) for p in plan.pieces] == [(a, 0, 8)]  # b waits: the budget is spent
    plan = run_step(s)
    assert [(p.seq, p.start, p.count) for p in plan.pieces] == [(a, 8, 8)]
    plan = run_step(s)  # a's last 4 tokens, then b's whole prompt fits what is left of the budget
    assert [(p.seq, p.start, p.count) for p in plan.pieces] == [(a, 16, 4), (b, 0, 3)]
    plan = run_step(s)
    assert [(p.seq, p.start, p.count, p.decode) for p in plan.pieces] == [(a, 20, 1, True), (b, 3, 1, True)]


def test_a_prompt_is_cut_the_same_whatever_runs_beside_it():
    def pieces(others: int) -> list[tuple[int, int]]:
        s = Scheduler(blocks=256, block_size=4, prefill_chunk=5, step_tokens=12)
        for i in range(others):
            s.add(Seq([i] * (3 + 4 * i)))
        mine = Seq(list(range(50, 73)))
        s.add(mine)
        seen = []
        while mine.computed < 23:
            seen += [(p.start, p.count) for p in run_step(s).pieces if p.seq is mine]
        return seen

    alone = pieces(0)
    assert alone == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 3)]
    assert pieces(3) == alone and pieces(7) == alone


def test_admission_stops_at_max_rows_and_counts_the_forks_of_n_choices():
    s = Scheduler(blocks=64, block_size=4, max_rows=4, step_tokens=100)
    jobs = [Seq([1, 2, 3], forks=2), Seq([4, 5]), Seq([6])]
    for q in jobs:
        s.add(q)
    run_step(s)
    assert s.running == jobs[:2] and list(s.waiting) == [jobs[2]]  # 3 rows + 1 row: full
    forks, copies = s.fork(jobs[0], 2)
    assert len(s.running) == 4 and s.rows == 4
    assert [f.tokens for f in forks] == [jobs[0].tokens] * 2 and len(copies) == 2  # partial block copied
    assert all(f.blocks[-1] != jobs[0].blocks[-1] for f in forks)
    s.finish(jobs[1])
    run_step(s)
    assert jobs[2] in s.running


def test_running_out_of_blocks_preempts_the_latest_arrival_which_resumes_and_finishes():
    s = Scheduler(blocks=1 + 4, block_size=4, max_rows=8, prefill_chunk=16, step_tokens=64)
    a, b = Seq([1, 2, 3]), Seq([4, 5, 6])
    s.add(a)
    s.add(b)
    preempted = []
    while s.running or s.waiting:
        plan = run_step(s, finish_after=12)
        preempted += plan.preempted
        assert len(held_blocks(s)) == len(set(held_blocks(s))) <= 4  # no block held twice, none past the pool
    assert preempted and preempted[0] is b  # the later arrival gave way
    assert len(a.tokens) == len(b.tokens) == 12  # both finished, b recomputed after a
    assert s.pool.held == s.pool.total - 1 - len(s.pool.free) and not s.running


def test_a_shared_prefix_is_taken_from_the_cache_and_its_blocks_shared_not_copied():
    s = Scheduler(blocks=64, block_size=4, prefill_chunk=64, step_tokens=64)
    system = list(range(10, 22))  # 3 full blocks
    a = Seq(system + [1, 2])
    s.add(a)
    run_step(s)
    b = Seq(system + [3])
    s.add(b)
    plan = run_step(s)
    mine = [p for p in plan.pieces if p.seq is b][0]
    assert (mine.start, mine.count) == (12, 1) and b.hits == 12  # only the new token is computed
    assert b.blocks[:3] == a.blocks[:3] and s.pool.refs[a.blocks[0]] == 2


def test_the_last_token_is_always_computed_even_when_every_block_is_cached():
    s = Scheduler(blocks=64, block_size=4)
    a = Seq(list(range(8)))
    s.add(a)
    run_step(s)
    s.finish(a)
    again = Seq(list(range(8)))
    s.add(again)
    plan = run_step(s)
    assert [(p.start, p.count) for p in plan.pieces] == [(4, 4)]  # 1 block hit; the last token's block recomputed


def test_different_content_after_a_shared_block_misses_and_unshared_sequences_never_hit():
    s = Scheduler(blocks=64, block_size=4)
    a = Seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    s.add(a)
    run_step(s)
    b = Seq([1, 2, 3, 4, 5, 6, 7, 0, 9])  # second block differs in one token
    c = Seq([1, 2, 3, 4, 5, 6, 7, 8, 9], shared=False)  # asks not to read the cache (scores its prompt)
    s.add(b)
    s.add(c)
    run_step(s)
    assert b.hits == 4 and c.hits == 0


def test_cached_blocks_nobody_holds_are_evicted_least_recently_used_first_under_pressure():
    s = Scheduler(blocks=1 + 6, block_size=2, prefill_chunk=8, step_tokens=8)
    old, recent = Seq([1, 1, 1, 1, 9]), Seq([2, 2, 2, 2, 9])
    for q in (old, recent):
        s.add(q)
        run_step(s)
        s.finish(q)
    assert len(s.pool.unused) == 4 and s.pool.held == 4  # kept for hits while nobody needs the room
    big = Seq([3] * 7)  # needs 4 blocks: 2 free, 2 evicted, oldest first
    s.add(big)
    run_step(s)
    assert s.pool.evictions == 2
    back = Seq([2, 2, 2, 2, 5])
    s.add(back)
    s.finish(big)
    run_step(s)
    assert back.hits == 4  # the recent prefix survived
    lost = Seq([1, 1, 1, 1, 5])
    s.add(lost)
    run_step(s)
    assert lost.hits == 0  # the old one was evicted


def test_a_preempted_sequence_finds_its_own_blocks_in_the_prefix_cache():
    s = Scheduler(blocks=1 + 6, block_size=4, prefill_chunk=64, step_tokens=64)
    a, b = Seq(list(range(10))), Seq(list(range(50, 58)))
    s.add(a)
    s.add(b)
    run_step(s)  # a: 3 blocks, b: 2 blocks
    while b in s.running:
        run_step(s)  # a grows until b is preempted
    assert b in s.waiting and s.preemptions == 1
    s.finish(a)
    run_step(s)
    assert b.hits == 8  # its prompt's two full blocks were still cached


def test_a_block_being_computed_is_waited_for_not_computed_twice():
    """Four choices of one question sent together: the first computes the shared blocks, the others take
    them from the cache a step later instead of each computing its own copy."""
    s = Scheduler(blocks=64, block_size=4, prefill_chunk=64, step_tokens=64)
    question = list(range(10, 22))  # 3 full blocks
    choices = [Seq(question + [c, c + 1]) for c in (1, 3, 5, 7)]
    for q in choices:
        s.add(q)
    first = run_step(s)
    assert [p.seq for p in first.pieces] == choices[:1]  # the others wait for its blocks
    second = run_step(s)
    assert [(p.seq, p.start) for p in second.pieces if p.seq is not choices[0]] == [(q, 12) for q in choices[1:]]
    assert all(q.blocks[:3] == choices[0].blocks[:3] for q in choices[1:])


def test_an_unshared_sequence_never_waits_for_another():
    s = Scheduler(blocks=64, block_size=4)
    a, b = Seq(list(range(10))), Seq(list(range(10)), shared=False)
    s.add(a)
    s.add(b)
    assert {p.seq for p in run_step(s).pieces} == {a, b}


def test_the_choices_of_an_unshared_sequence_stay_unshared_when_preempted_and_readmitted():
    """--no-prefix-cache holds for a request's n choices too: a preempted fork recomputes, it does not hit."""
    s = Scheduler(blocks=64, block_size=4)
    cached = Seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    s.add(cached)
    run_step(s)
    private = Seq([1, 2, 3, 4, 5, 6, 7, 8, 9], shared=False, forks=2)
    s.add(private)
    run_step(s)
    forks, _ = s.fork(private, 2)
    assert [f.shared for f in forks] == [False, False]
    s.requeue(forks[-1])
    run_step(s)
    assert forks[-1] in s.running and forks[-1].hits == 0


def test_a_prompt_whose_choices_need_blocks_waits_until_its_forks_fit():
    """A prompt that ends this step is admitted only with room for the partial last block each other choice
    copies: admitted without it, the fork would find no block and the request would fail."""
    s = Scheduler(blocks=1 + 5, block_size=4)
    a = Seq(list(range(10)))  # 3 blocks
    b = Seq(list(range(100, 106)), forks=2)  # 2 blocks, then 2 copies of its partial last block
    s.add(a)
    s.add(b)
    run_step(s)
    assert a in s.running and b in s.waiting  # 2 blocks are left: b needs 2, then 2 more for its forks
    s.finish(a)
    run_step(s)
    assert b in s.running and s.fork(b, 2) is not None
