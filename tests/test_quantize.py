"""int8 weights: close to fp32 on real text, wired into the CLI and the serving engine."""

import threading

import pytest
import torch
from conftest import SHARED, build, small_config

from longboi.checkpoint import save_checkpoint
from longboi.cli import main
from longboi.eval.perplexity import perplexity
from longboi.generate import SamplingParams
from longboi.quantize import quantize_int8
from longboi.serve.engine import Engine, Job
from longboi.tokenizer import Tokenizer


def test_int8_perplexity_is_within_1_percent_of_fp32(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()[:20_000]
    tokens = torch.tensor(tok.encode(text)).numpy()
    cfg = small_config(d_model=128, max_seq_len=128)
    fp32 = perplexity(build(cfg, seed=3), tok, tokens, 128, None, 4, None)
    int8 = perplexity(quantize_int8(build(cfg, seed=3)), tok, tokens, 128, None, 4, None)
    assert abs(int8.perplexity / fp32.perplexity - 1) < 0.01, (fp32.perplexity, int8.perplexity)
    assert int8.perplexity != fp32.perplexity  # the weights really changed


def test_int8_needs_fp32_weights():
    with pytest.raises(ValueError, match="fp32"):
        quantize_int8(build(small_config()).to(torch.bfloat16))


def test_cli_generate_and_perplexity_with_int8(tmp_path, tokenizer_path, capsys):
    ck = tmp_path / "ck"
    save_checkpoint(build(small_config(), seed=1), ck, Tokenizer(tokenizer_path))
    args = ["generate", str(ck), "--prompt", "Hello", "--max-new-tokens", "5", "--quantize", "int8"]
    assert main(args) == 0
    assert "int8 weights" in capsys.readouterr().err
    assert main(args + ["--dtype", "bf16"]) == 2
    assert "--quantize int8 computes activations in fp32" in capsys.readouterr().err
    text = SHARED / "text" / "tinyshakespeare.txt"
    assert main(["perplexity", str(ck), str(text), "--max-tokens", "300", "--quantize", "int8"]) == 0
    assert "int8 weights, fp32 activations)" in capsys.readouterr().out


def test_the_serving_engine_runs_an_int8_model(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    engine = Engine(quantize_int8(build(small_config(), seed=2)), tok, max_batch=4).start()
    outs, done = [], threading.Semaphore(0)
    for prompt in (tok.encode("One two"), tok.encode("Three")):
        out: list[int] = []
        outs.append(out)

        def sink(ev, out=out):
            out.extend(t.id for t in ev.tokens)
            if ev.done:
                done.release()

        engine.submit(Job(prompt, SamplingParams(max_new_tokens=6, temperature=0), sink, ignore_eos=True))
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    engine.stop()
    assert [len(o) for o in outs] == [6, 6]
