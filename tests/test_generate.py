import pytest
import torch
from conftest import build, small_config
from test_model import KNOBS
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from longboi.errors import UserError
from longboi.generate import SamplingParams, generate, generate_ids, pick, process_logits, stream, token_counts
from longboi.tokenizer import Tokenizer

PROMPTS = [[5, 17, 300, 42, 9, 81, 7], [1000], [77, 66, 55, 44]]


def run(model, prompts, params, use_cache=True, **kw):
    return torch.stack(list(generate_ids(model, prompts, params, eos_id=None, use_cache=use_cache, **kw)), dim=1)


@pytest.mark.parametrize("knobs", [{}, dict(attn_type="grouped_query_attention", kv_n_heads=2)], ids=str)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=20, temperature=0),
        SamplingParams(max_new_tokens=20, temperature=1.3, top_k=40, seed=7),
    ],
    ids=str,
)
def test_cached_decoding_equals_recomputing(knobs, params):
    model = build(small_config(**knobs), seed=2)
    assert torch.equal(run(model, PROMPTS, params), run(model, PROMPTS, params, use_cache=False))


def test_batched_prompts_of_different_lengths_equal_one_by_one():
    model = build(small_config(), seed=2)
    params = SamplingParams(max_new_tokens=15, temperature=0)
    batched = run(model, PROMPTS, params)
    for row, prompt in enumerate(PROMPTS):
        assert torch.equal(batched[row], run(model, [prompt], params)[0])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = build(small_config(), seed=2)
    sample = SamplingParams(max_new_tokens=20, temperature=1.0, seed=3)
    assert torch.equal(run(model, PROMPTS, sample), run(model, PROMPTS, sample))
    other = SamplingParams(max_new_tokens=20, temperature=1.0, seed=4)
    assert not torch.equal(run(model, PROMPTS, sample), run(model, PROMPTS, other))
    greedy = run(model, PROMPTS, SamplingParams(max_new_tokens=20, temperature=0))
    assert torch.equal(run(model, PROMPTS, SamplingParams(max_new_tokens=20, top_k=1, seed=5)), greedy)
    assert torch.equal(run(model, PROMPTS, SamplingParams(max_new_tokens=20, top_p=1e-6, seed=5)), greedy)


@pytest.mark.parametrize(
    "penalty, temperature, top_k, top_p",
    [(1.3, 0.7, 50, 0.9), (1.0, 1.5, None, 0.5), (0.8, 1.0, 5, None), (1.1, 0.9, None, None)],
)
def test_logit_processing_matches_transformers(penalty, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits, context = torch.randn(3, 1000, generator=g) * 3, torch.randint(0, 1000, (3, 30), generator=g)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
    prompt_seen = token_counts(context, torch.ones_like(context), 1000) > 0  # the context as a prompt
    ours = process_logits(logits, [params] * 3, torch.zeros(3, 1000), prompt_seen)
    theirs = logits.clone()
    for proc in (
        [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
        + ([TopKLogitsWarper(top_k)] if top_k else [])
        + ([TopPLogitsWarper(top_p)] if top_p else [])
    ):
        theirs = proc(context, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(ours)
    assert torch.allclose(ours[finite], theirs[finite], atol=1e-5)


def test_rows_with_different_params_share_one_pass():
    """Each row of a mixed batch (as a serving engine builds) equals that row processed alone."""
    g = torch.Generator().manual_seed(1)
    logits, context = torch.randn(4, 500, generator=g) * 3, torch.randint(0, 500, (4, 20), generator=g)
    counts = token_counts(context, torch.ones_like(context), 500)
    rows = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.3),
        SamplingParams(temperature=1.2, top_p=0.5, frequency_penalty=0.5, presence_penalty=1.0),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.9, logit_bias=((3, 5.0), (7, -100.0))),
    ]
    mixed = process_logits(logits, rows, counts)
    for i, p in enumerate(rows):
        alone = process_logits(logits[i : i + 1], [p], counts[i : i + 1])[0]
        assert torch.equal(torch.isinf(mixed[i]), torch.isinf(alone)) and torch.allclose(
            mixed[i][torch.isfinite(alone)], alone[torch.isfinite(alone)]
        )
    assert torch.isinf(mixed[1]).sum() == 495  # top-k 5 kept exactly 5
    seen = counts[2] > 0  # OpenAI's penalties: frequency per occurrence, presence once
    expected = (logits[2] - 0.5 * counts[2] - 1.0 * seen) / 1.2
    kept = torch.isfinite(mixed[2])
    assert torch.allclose(mixed[2][kept], expected[kept])
    assert mixed[3][7] == float("-inf") or mixed[3][7] < logits[3][7]


def test_presence_and_frequency_count_generated_tokens_only_and_repetition_counts_the_prompt_too():
    """vLLM's semantics: a token of the prompt is not penalized by presence/frequency penalties."""
    logits = torch.zeros(1, 10)
    prompt_seen = torch.zeros(1, 10, dtype=torch.bool)
    prompt_seen[0, 2] = True
    generated = torch.zeros(1, 10)
    generated[0, 5] = 3
    p = SamplingParams(temperature=0, presence_penalty=1.0, frequency_penalty=0.5)
    out = process_logits(logits, [p], generated, prompt_seen)[0]
    assert out[2] == 0 and out[5] == -(1.0 + 0.5 * 3) and out[0] == 0
    logits = torch.ones(1, 10)
    out = process_logits(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], generated, prompt_seen)[0]
    assert out[2] == 0.5 and out[5] == 0.5 and out[0] == 1.0


def test_logit_bias_of_many_ids_is_one_indexed_add_equal_to_adding_each():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g)
    bias = tuple(
        (int(i), float(v)) for i, v in zip(torch.randperm(500, generator=g)[:300], torch.rand(300) * 200 - 100)
    )
    rows = [
        SamplingParams(temperature=0, logit_bias=bias),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0),
    ]
    out = process_logits(logits, rows, None)
    expected = logits.clone()
    for i, v in bias:
        expected[0, i] += v
    assert torch.allclose(out, expected) and torch.equal(out[1:], logits[1:])


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-300, 1e-7])
def test_tiny_temperatures_sample_the_argmax_instead_of_nan(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1000, generator=g) * 20
    rows = [SamplingParams(temperature=temperature, top_p=0.9, seed=1)] * 2
    processed = process_logits(logits, rows, None)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    assert torch.equal(pick(processed, rows, gens), logits.argmax(-1))


def test_seeds_outside_64_bits_are_refused_naming_the_field():
    for seed in (2**63, 18446744073709551616, -(2**63) - 1, -(2**70)):
        with pytest.raises(UserError, match="sampling parameter seed"):
            SamplingParams(seed=seed)
    model = build(small_config(), seed=2)
    for seed in (2**63 - 1, -(2**63), -1):  # the extremes sample, and -1 is its own seed
        assert run(model, PROMPTS, SamplingParams(max_new_tokens=3, temperature=1.0, seed=seed)).shape == (3, 3)


def test_padded_vocab_ids_are_never_generated():
    model = build(small_config(tie_word_embeddings=False))
    with torch.no_grad():  # make the padded rows (>= 50277) win every argmax unless they are masked
        model.lm_head.weight.zero_()
        direction = torch.randn(model.config.d_model)
        model.lm_head.weight[50300], model.lm_head.weight[50301] = direction * 10, -direction * 10
    params = SamplingParams(max_new_tokens=5, temperature=0)
    assert run(model, PROMPTS, params).max() >= 50277
    assert run(model, PROMPTS, params, valid_vocab=50277).max() < 50277


def test_eos_stops_a_row_and_finished_rows_emit_eos():
    model = build(small_config(), seed=2)
    params = SamplingParams(max_new_tokens=30, temperature=0)
    free = run(model, PROMPTS, params)
    eos = int(free[0, 3])  # pretend row 0's 4th token is EOS
    steps = list(generate_ids(model, PROMPTS, params, eos_id=eos))
    tokens = torch.stack(steps, dim=1)
    assert (tokens[0, 3:] == eos).all()
    if len(steps) < 30:  # everyone stopped early only if every row produced it
        assert all((row == eos).any() for row in tokens)


def test_text_generation_stop_strings_and_streaming(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    model = build(small_config(), seed=4)
    params = SamplingParams(max_new_tokens=40, temperature=0)
    full = generate(model, tok, ["Once upon a time"], params)[0]
    assert full and "".join(stream(model, tok, "Once upon a time", params)) == full
    stop = full[10:14]
    cut = generate(model, tok, ["Once upon a time"], SamplingParams(max_new_tokens=40, temperature=0, stop=(stop,)))
    assert cut[0] == full[: full.index(stop)]
    pieces = list(
        stream(model, tok, "Once upon a time", SamplingParams(max_new_tokens=40, temperature=0, stop=(stop,)))
    )
    assert "".join(pieces) == cut[0]
    batch = generate(model, tok, ["Once upon a time", "The"], params)
    assert batch[0] == full and batch[1] == generate(model, tok, ["The"], params)[0]


def test_empty_prompt_is_an_error():
    with pytest.raises(ValueError, match="at least one token"):
        next(generate_ids(build(small_config()), [[]], SamplingParams(), eos_id=None))


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", -1),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("repetition_penalty", 0.0),
        ("stop", ("",)),
        ("stop", (3,)),
        ("seed", "x"),
        ("seed", True),
    ],
)
def test_sampling_params_are_checked_in_one_place(field, value):
    from longboi.errors import UserError

    with pytest.raises(UserError, match=f"^sampling parameter {field}: expected .*, got "):
        SamplingParams(**{field: value})


def test_top_k_zero_and_none_mean_no_limit():
    assert SamplingParams(top_k=0).top_k is None and SamplingParams(top_k=None).top_k is None
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
def test_batched_generation_equals_one_at_a_time_for_every_model_kind(knobs):
    """Left padding must not show: not in positions (learned embeddings), not in the repetition penalty
    (pads are id 0 here, a real token), not in attention."""
    model = build(small_config(**knobs), seed=3)
    prompts = [[5, 17, 300, 42, 9, 81, 7], [1000], [0, 66, 55, 44]]
    for params in (
        SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=11),
    ):
        batched = run(model, prompts, params)
        for row, prompt in enumerate(prompts):
            assert torch.equal(batched[row], run(model, [prompt], params)[0]), (row, params)


def test_learned_positions_refuse_to_generate_past_max_seq_len_with_a_clear_error():
    from longboi.errors import UserError

    model = build(small_config(alibi=False, learned_pos_emb=True, max_seq_len=32))
    with pytest.raises(UserError, match="prompt of 30 tokens plus max_new_tokens 5 exceeds.*max_seq_len 32.*at most 2"):
        run(model, [list(range(1, 31))], SamplingParams(max_new_tokens=5, temperature=0))
    assert run(model, [list(range(1, 31))], SamplingParams(max_new_tokens=2, temperature=0)).shape == (1, 2)


def test_generation_allocates_its_kv_cache_once(monkeypatch):
    from longboi.model import KVCache

    real, sizes = KVCache._grow, []

    def counting(self, like, capacity):
        sizes.append(capacity)
        return real(self, like, capacity)

    monkeypatch.setattr(KVCache, "_grow", counting)
    run(build(small_config()), PROMPTS, SamplingParams(max_new_tokens=300, temperature=0))
    assert sizes == [7 + 300]  # the longest prompt plus the new tokens, known up front
