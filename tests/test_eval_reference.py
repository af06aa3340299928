"""Our harness against EleutherAI's lm-evaluation-harness on the same model and requests.

The model is exported to HF format and loaded by lm-eval's HFLM; both score the same (context,
continuation) pairs and generate greedily from the same prompts.
"""

import dataclasses
import os

import lm_eval  # noqa: F401 - a plain import: a broken install must fail here, not skip
import pytest
import torch
from conftest import SHARED, build, small_config

from longboi.checkpoint import save_checkpoint
from longboi.eval.scoring import greedy_generate, loglikelihoods
from longboi.eval.tasks import TaskBuilder, TaskConfig, read_rows
from longboi.tokenizer import Tokenizer

FIXTURES = SHARED / "eval" / "tests_local_data"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from lm_eval.models.huggingface import HFLM

    model = build(small_config(max_seq_len=512), seed=11)
    tok = Tokenizer(tokenizer_path)
    path = tmp_path_factory.mktemp("hf") / "ck"
    save_checkpoint(model, path, tok)
    return model, tok, HFLM(pretrained=str(path), device="cpu", batch_size=4, max_length=512)


def requests(tok):
    out = []
    for fixture, kind, delim in (
        ("piqa_small.jsonl", "multiple_choice", "\nAnswer: "),
        ("lambada_small.jsonl", "language_modeling", " "),
    ):
        cfg = TaskConfig(label=fixture, dataset_uri=fixture, icl_task_type=kind, continuation_delimiter=delim)
        builder = TaskBuilder(cfg, tok, read_rows(FIXTURES / fixture, kind), 1)
        out += [r for ex in builder.examples() for r in ex.requests]
    return out


def greedy_requests(model, tok, lm, reqs):
    """Requests the model is greedy on by construction (each continuation is its own argmax tokens),
    kept where lm-eval's tokenization of the texts gives back exactly those tokens."""
    out = []
    for i, r in enumerate(reqs[:30]):
        ids, cont = list(r.context), []
        with torch.no_grad():
            for _ in range(1 + i % 3):  # 1 to 3 tokens
                cont.append(int(model(torch.tensor([ids + cont]), logits_to_keep=1)[0, -1].argmax()))
        texts = (tok.decode(r.context, skip_special_tokens=False), tok.decode(cont, skip_special_tokens=False))
        if tuple(lm._encode_pair(*texts)[1]) == tuple(cont):
            out.append(dataclasses.replace(r, continuation=tuple(cont)))
    assert len(out) >= 3
    return out


def test_loglikelihoods_and_greedy_flags_match_lm_eval(pair):
    from lm_eval.api.instance import Instance

    model, tok, lm = pair
    reqs = requests(tok)
    reqs += greedy_requests(model, tok, lm, reqs)
    ours = loglikelihoods(model, reqs, max_seq_len=512)
    texts = [
        (tok.decode(r.context, skip_special_tokens=False), tok.decode(r.continuation, skip_special_tokens=False))
        for r in reqs
    ]
    theirs = lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=t, idx=i) for i, t in enumerate(texts)]
    )
    assert len(theirs) == len(ours) >= 10
    for r, (lp, greedy), req in zip(ours, theirs, reqs):
        assert abs(r.logprob - lp) <= 1e-4, (r.logprob, lp, req)
        assert r.greedy == bool(greedy)
    flags = [r.greedy for r in ours]
    assert any(flags) and not all(flags)  # both answers occur, so the comparison can fail either way


def test_greedy_generation_matches_lm_eval(pair):
    from lm_eval.api.instance import Instance

    model, tok, lm = pair
    rows = read_rows(FIXTURES / "triviaqa_small.jsonl", "generation_task_with_answers")
    cfg = TaskConfig(
        label="t", dataset_uri="t", icl_task_type="generation_task_with_answers", continuation_delimiter="\nAnswer:"
    )
    prompts = [e.prompt for e in TaskBuilder(cfg, tok, rows, 1).examples()]
    unstopped = greedy_generate(model, tok, prompts, [], max_new_tokens=12, max_seq_len=512)
    stop = next(t[3:5] for t in unstopped if len(t.strip()) > 6)  # text this model really generates
    ours = greedy_generate(model, tok, prompts, [stop], max_new_tokens=12, max_seq_len=512)
    args = [
        (tok.decode(p, skip_special_tokens=False), {"until": [stop], "max_gen_toks": 12, "do_sample": False})
        for p in prompts
    ]
    theirs = lm.generate_until(
        [Instance(request_type="generate_until", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]
    )
    assert ours == theirs
    assert any(len(a) < len(b) for a, b in zip(ours, unstopped))  # the stop string fired


def test_encoding_agrees_for_the_compared_requests(pair):
    """The comparison above is only meaningful if lm-eval sees the same tokens we score."""
    _, tok, lm = pair
    for r in requests(tok)[:6]:
        ctx = tok.decode(r.context, skip_special_tokens=False)
        cont = tok.decode(r.continuation, skip_special_tokens=False)
        context_enc, continuation_enc = lm._encode_pair(ctx, cont)
        assert tuple(context_enc) == r.context and tuple(continuation_enc) == r.continuation
