import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED, build, small_config

from longboi.cli import main
from longboi.errors import UserError
from longboi.eval.harness import (
    Gauntlet,
    GauntletBenchmark,
    GauntletCategory,
    TaskResult,
    evaluate,
    gauntlet_scores,
    load_tasks,
    run_task,
)
from longboi.eval.scoring import LLRequest, loglikelihoods
from longboi.eval.tasks import TaskBuilder, TaskConfig, fewshot_indices, generation_correct, normalize_answer, read_rows
from longboi.hardware import resolve_precision
from longboi.tokenizer import Tokenizer

FIXTURES = SHARED / "eval" / "tests_local_data"


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def model():
    return build(small_config(max_seq_len=512), seed=7)


def decode_request(tok, req):
    return tok.decode(req.context, skip_special_tokens=False), tok.decode(req.continuation, skip_special_tokens=False)


# -- prompt construction, checked against hand-written strings ----------------------------------


def test_language_modeling_prompt_zero_and_few_shot(tok):
    rows = [{"context": "The sky is", "continuation": "blue"}, {"context": "Grass is", "continuation": "green"}]
    cfg = TaskConfig(label="t", dataset_uri="x", icl_task_type="language_modeling", continuation_delimiter=" ")
    (req,) = TaskBuilder(cfg, tok, rows, 0).example(0).requests
    assert decode_request(tok, req) == ("The sky is", " blue")  # delimiter's space moves to the continuation
    (req,) = TaskBuilder(cfg, tok, rows, 1).example(0).requests
    assert decode_request(tok, req) == ("Grass is green\nThe sky is", " blue")
    cfg = TaskConfig(
        label="t",
        dataset_uri="x",
        icl_task_type="language_modeling",
        continuation_delimiter="\nAnswer: ",
        prompt_string="Quiz.",
        question_prelimiter="Q: ",
    )
    (req,) = TaskBuilder(cfg, tok, rows, 1).example(1).requests
    assert decode_request(tok, req) == ("Quiz.\nQ: The sky is\nAnswer: blue\nQ: Grass is\nAnswer:", " green")


def test_multiple_choice_and_schema_prompts(tok):
    mc = [{"query": "2+2 =", "choices": ["4", "5"], "gold": 0}, {"query": "1+1 =", "choices": ["3", "2"], "gold": 1}]
    cfg = TaskConfig(label="m", dataset_uri="x", icl_task_type="multiple_choice", continuation_delimiter="\nAnswer: ")
    ex = TaskBuilder(cfg, tok, mc, 1).example(0)
    assert [decode_request(tok, r) for r in ex.requests] == [
        ("1+1 =\nAnswer: 2\n2+2 =\nAnswer:", " 4"),
        ("1+1 =\nAnswer: 2\n2+2 =\nAnswer:", " 5"),
    ]
    assert ex.gold == 0
    schema = [
        {
            "context_options": ["Bob fell because Bob", "Bob fell because the ice"],
            "continuation": "was slippery.",
            "gold": 1,
        }
    ]
    cfg = TaskConfig(label="s", dataset_uri="x", icl_task_type="schema")
    ex = TaskBuilder(cfg, tok, schema, 0).example(0)
    assert [decode_request(tok, r) for r in ex.requests] == [
        ("Bob fell because Bob", " was slippery."),
        ("Bob fell because the ice", " was slippery."),
    ]


def test_generation_prompt_answers_and_budget(tok):
    rows = read_rows(FIXTURES / "triviaqa_small.jsonl", "generation_task_with_answers")
    cfg = TaskConfig(
        label="g", dataset_uri="x", icl_task_type="generation_task_with_answers", continuation_delimiter="\nAnswer:"
    )
    builder = TaskBuilder(cfg, tok, rows, 0)
    ex = builder.example(0)
    assert tok.decode(ex.prompt) == "Who was the man behind The Chipmunks?\nAnswer:"
    assert ex.answers == ["David Seville"]
    assert builder.max_answer_tokens() == max(len(tok.encode(a)) for r in rows for a in [r["answer"]] + r["aliases"])


def test_fewshot_never_includes_the_target_and_is_seeded():
    for seed in range(20):
        rng = random.Random(seed)
        for target in range(5):
            shots = fewshot_indices(5, 4, rng, target)
            assert target not in shots and len(shots) == 4 and len(set(shots)) == 4
    a = [fewshot_indices(50, 5, random.Random(1234), t) for t in range(3)]
    b = [fewshot_indices(50, 5, random.Random(1234), t) for t in range(3)]
    assert a == b


# -- scoring rules, against independent full-forward computations ----------------------------------


def reference_logprob(model, context, continuation):
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), dim=-1)
    start = len(context) - 1
    targets = ids[0, len(context) :]
    picked = logp[start : start + len(targets)].gather(1, targets[:, None]).squeeze(1)
    greedy = bool((logp[start : start + len(targets)].argmax(-1) == targets).all())
    return float(picked.sum()), greedy


def test_loglikelihoods_match_a_plain_forward_including_shared_contexts(model):
    g = torch.Generator().manual_seed(0)
    ctx = tuple(torch.randint(0, 50000, (12,), generator=g).tolist())
    reqs = [LLRequest(ctx, tuple(torch.randint(0, 50000, (n,), generator=g).tolist())) for n in (1, 3, 5)]
    reqs += [LLRequest(tuple(torch.randint(0, 50000, (m,), generator=g).tolist()), (5, 6)) for m in (2, 9)]
    # a continuation equal to the greedy choice must be flagged greedy
    with torch.no_grad():
        best = int(model(torch.tensor([ctx]))[0, -1].argmax())
    reqs.append(LLRequest(ctx, (best,)))
    got = loglikelihoods(model, reqs, max_seq_len=512, batch_tokens=16)
    for req, res in zip(reqs, got):
        lp, greedy = reference_logprob(model, req.context, req.continuation)
        assert math.isclose(res.logprob, lp, abs_tol=1e-4) and res.greedy == greedy
    assert got[-1].greedy


def test_contexts_are_truncated_from_the_left(model):
    ctx, cont = tuple(range(100, 140)), (7, 8, 9)
    (res,) = loglikelihoods(model, [LLRequest(ctx, cont)], max_seq_len=13)
    lp, _ = reference_logprob(model, ctx[-10:], cont)
    assert math.isclose(res.logprob, lp, abs_tol=1e-4)


@pytest.mark.parametrize(
    "fixture, kind, delimiter",
    [
        ("piqa_small.jsonl", "multiple_choice", "\nAnswer: "),
        ("hellaswag_small.jsonl", "multiple_choice", " "),
        ("winograd_small.jsonl", "schema", " "),
        ("lambada_small.jsonl", "language_modeling", " "),
    ],
)
def test_accuracy_equals_the_rule_applied_by_hand(model, tok, fixture, kind, delimiter):
    rows = read_rows(FIXTURES / fixture, kind)
    cfg = TaskConfig(label=fixture, dataset_uri=fixture, icl_task_type=kind, continuation_delimiter=delimiter)
    for k in (0, 1):
        acc, acc_sum, n = run_task(model, tok, cfg, rows, k, 512)
        builder = TaskBuilder(cfg, tok, rows, k)
        mean_hits = sum_hits = 0
        for ex in builder.examples():
            scored = [reference_logprob(model, r.context, r.continuation) for r in ex.requests]
            if kind == "language_modeling":
                mean_hits += scored[0][1]
                continue
            means = [lp / len(r.continuation) for (lp, _), r in zip(scored, ex.requests)]
            mean_hits += max(range(len(means)), key=lambda i: (means[i], -i)) == ex.gold
            sum_hits += max(range(len(scored)), key=lambda i: (scored[i][0], -i)) == ex.gold
        assert n == len(rows) and math.isclose(acc, mean_hits / n)
        if kind != "language_modeling":
            assert math.isclose(acc_sum, sum_hits / n)


def test_generation_scoring_rules():
    assert normalize_answer("The  Beatles!") == "beatles"
    assert generation_correct(" Sunset Blvd, a musical\nQ: next", ["Sunset Boulevard", "Sunset Blvd"], ["\n"], "", True)
    assert not generation_correct(" Cats", ["Sunset Boulevard"], [], "", True)
    assert generation_correct("so 16 - 3 - 4 = 9. #### 18", ["18"], [], "####", True)
    assert not generation_correct("#### 18 then 19", ["19"], [], "####", True)


def test_generation_task_runs_greedy_on_the_fixture(model, tok):
    rows = read_rows(FIXTURES / "triviaqa_small.jsonl", "generation_task_with_answers")
    cfg = TaskConfig(
        label="tqa",
        dataset_uri="x",
        icl_task_type="generation_task_with_answers",
        continuation_delimiter="\nAnswer:",
        early_stopping_criteria=["\n"],
    )
    acc, _, n = run_task(model, tok, cfg, rows, 1, 512)
    assert n == 4 and acc == 0.0  # a random model answers nothing right; the machinery ran end to end


# -- harness, gauntlet, errors ---------------------------------------------------------------------


def test_cli_eval_writes_results_and_skips_missing_files(tmp_path, tokenizer_path, capsys):
    from longboi.checkpoint import save_checkpoint

    save_checkpoint(build(small_config(max_seq_len=512)), tmp_path / "ck", Tokenizer(tokenizer_path))
    for name in ("piqa_small.jsonl", "lambada_small.jsonl"):
        (tmp_path / name).write_text((FIXTURES / name).read_text())
    mmlu_rows = [json.loads(x) for x in (FIXTURES / "mmlu_small.jsonl").read_text().splitlines()]
    for i, row in enumerate(mmlu_rows):  # the fixture has one category; split it in two
        row["category"] = "cat-a" if i % 2 else "cat-b"
    (tmp_path / "mmlu_small.jsonl").write_text("\n".join(json.dumps(r) for r in mmlu_rows) + "\n")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("""icl_tasks:
- {label: piqa, dataset_uri: piqa_small.jsonl, num_fewshot: [0, 2], icl_task_type: multiple_choice,
   continuation_delimiter: "\\nAnswer: "}
- {label: lambada, dataset_uri: lambada_small.jsonl, num_fewshot: [0], icl_task_type: language_modeling}
- {label: mmlu, dataset_uri: mmlu_small.jsonl, num_fewshot: [1], icl_task_type: multiple_choice, has_categories: true}
- {label: gone, dataset_uri: nope.jsonl, num_fewshot: [0], icl_task_type: language_modeling}
""")
    gauntlet = tmp_path / "g.yaml"
    gauntlet.write_text("""eval_gauntlet:
  weighting: EQUAL
  subtract_random_baseline: true
  rescale_accuracy: true
  categories:
  - name: reasoning
    benchmarks:
    - {name: piqa, num_fewshot: 0, random_baseline: 0.5}
""")
    assert (
        main(
            [
                "eval",
                str(tmp_path / "ck"),
                "--tasks",
                str(tasks),
                "--data-root",
                str(tmp_path),
                "--gauntlet",
                str(gauntlet),
            ]
        )
        == 0
    )
    out = json.loads((tmp_path / "ck" / "eval" / "results.json").read_text())
    assert [(t["label"], t["num_fewshot"]) for t in out["tasks"]] == [
        ("piqa", 0),
        ("piqa", 2),
        ("lambada", 0),
        ("mmlu", 1),
    ]
    assert out["skipped"] and "nope.jsonl" in out["skipped"][0]
    mmlu = out["tasks"][3]
    assert set(mmlu["categories"]) == {"cat-a", "cat-b"}
    assert math.isclose(mmlu["accuracy"], sum(mmlu["categories"].values()) / 2)  # macro mean over categories
    piqa = out["tasks"][0]["accuracy"]
    assert math.isclose(out["gauntlet"]["reasoning"], (piqa - 0.5) / 0.5)
    assert "| piqa | 0 |" in (tmp_path / "ck" / "eval" / "results.md").read_text()
    auto = resolve_precision("auto", torch.device("cpu"), quiet=True).precision  # the default --dtype auto
    assert out["precision"] == auto and f"Precision: {auto}" in (tmp_path / "ck" / "eval" / "results.md").read_text()


def test_gauntlet_arithmetic():
    g = Gauntlet(
        categories=[
            GauntletCategory("a", [GauntletBenchmark("x", 0, 0.25), GauntletBenchmark("y", 3, 0.0)]),
            GauntletCategory("b", [GauntletBenchmark("z", 0, 0.5)]),
            GauntletCategory("c", [GauntletBenchmark("missing", 0, 0.5)]),
        ],
        averages={"core": ["a", "b", "c"]},
    )
    results = [
        TaskResult("x", 0, "mc", 0.55, 100, 1.0),
        TaskResult("y", 3, "lm", 0.2, 400, 1.0),
        TaskResult("z", 0, "mc", 0.6, 16, 1.0),
    ]
    s = gauntlet_scores(g, results)
    assert math.isclose(s["a"], ((0.55 - 0.25) / 0.75 + 0.2) / 2) and math.isclose(s["b"], 0.2)
    assert "c" not in s and math.isclose(s["core"], (s["a"] + s["b"]) / 2)
    weighted = gauntlet_scores(Gauntlet(categories=g.categories[:1], weighting="SAMPLE_SZ"), results)
    assert math.isclose(weighted["a"], (0.4 * 100 + 0.2 * 400) / 500)
    no_rescale = gauntlet_scores(Gauntlet(categories=g.categories[:1], rescale_accuracy=False), results)
    assert math.isclose(no_rescale["a"], ((0.55 - 0.25) + 0.2) / 2)


def test_bad_task_files_and_rows(tmp_path, model, tok):
    bad = tmp_path / "t.yaml"
    bad.write_text("icl_tasks:\n- {label: a, dataset_uri: x, icl_task_type: multiple_choice, num_fewshots: [0]}\n")
    with pytest.raises(UserError, match="unknown key 'num_fewshots' .*did you mean 'num_fewshot'"):
        load_tasks(bad)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a"]}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:2: .*missing \['gold'\]"):
        read_rows(rows, "multiple_choice")
    rows.write_text('{"query": "q", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:1: gold must index"):
        read_rows(rows, "multiple_choice")
    rows.write_text('{"context": "q", "answer": "a"\n')
    with pytest.raises(UserError, match=r"rows.jsonl:1: invalid JSON"):
        read_rows(rows, "generation_task_with_answers")
    cfg = TaskConfig(label="a", dataset_uri=str(rows), icl_task_type="language_modeling")
    results, skipped = evaluate(
        model, tok, [TaskConfig(label="b", dataset_uri="missing.jsonl", icl_task_type="schema")], tmp_path
    )
    assert results == [] and skipped and cfg.kind == "language_modeling"


def test_perplexity_past_the_trained_length(tmp_path, model, tok, capsys):
    from longboi.checkpoint import save_checkpoint
    from longboi.eval.perplexity import perplexity

    tokens = torch.tensor(tok.encode((SHARED / "text" / "tinystories_sample.txt").read_text())).numpy()
    short = perplexity(model, tok, tokens, seq_len=64, progress=False)
    strided = perplexity(model, tok, tokens, seq_len=64, stride=32, progress=False)
    assert short.tokens == strided.tokens == len(tokens) - 1  # every target scored once
    long = perplexity(model, tok, tokens, seq_len=2048, progress=False)  # 4x max_seq_len: ALiBi runs
    assert math.isfinite(long.loss) and long.bits_per_byte > 0 and long.tokens == len(tokens) - 1
    save_checkpoint(model, tmp_path / "ck", tok)
    assert (
        main(["perplexity", str(tmp_path / "ck"), str(SHARED / "text" / "tinystories_sample.txt"), "--seq-len", "128"])
        == 0
    )
    auto = resolve_precision("auto", torch.device("cpu"), quiet=True).precision
    assert "bits/byte" in (printed := capsys.readouterr().out) and f"tokens/s, {auto})" in printed


def test_perplexity_equals_a_hand_computation(model, tok):
    """Each target j is scored once, given the tokens of the first window that contains it."""
    from longboi.eval.perplexity import perplexity

    text = (SHARED / "text" / "tinystories_sample.txt").read_text()
    tokens = torch.tensor(tok.encode(text)[:150]).numpy()
    for seq_len, stride in ((40, 39), (40, 13), (400, None)):
        step = stride or seq_len - 1
        nats = 0.0
        with torch.no_grad():
            for j in range(1, len(tokens)):
                start = max(0, math.ceil((j - seq_len + 1) / step)) * step
                context = torch.from_numpy(tokens[start:j].astype("int64"))[None]
                nats -= float(model(context)[0, -1].float().log_softmax(-1)[int(tokens[j])])
        r = perplexity(model, tok, tokens, seq_len=seq_len, stride=stride, progress=False)
        n_bytes = len(tok.decode(tokens[1:].tolist(), skip_special_tokens=False).encode())
        assert r.tokens == len(tokens) - 1
        assert r.loss == pytest.approx(nats / r.tokens, rel=1e-5)
        assert r.perplexity == pytest.approx(math.exp(nats / r.tokens), rel=1e-5)
        assert r.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
