"""GGUF export, verified by llama.cpp itself (llama-cpp-python) loading the file and running it."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SHARED, build, open_llama, small_config, trained

from longboi.checkpoint import load_model, load_tokenizer, save_checkpoint
from longboi.cli import main
from longboi.errors import UserError
from longboi.export.gguf import export_gguf
from longboi.generate import SamplingParams, generate_ids
from longboi.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the dev extras (built from source)")
PROMPTS = ["Once upon a time", "The capital of France is", "def main():\n\treturn 42"]
# GPT-NeoX's 23 added tokens for runs of spaces are USER_DEFINED in our GGUF: typed CONTROL, llama.cpp
# neither produced them from text ("\n    return" gave other ids) nor printed them (indentation vanished).
WHITESPACE = ["\n    return x", "a\t\tb", "    ", "def f(x):\n        if x:\n            return 1\n", "x  \n  y"]


def to_gguf(ck, out, outtype="f32", check=True):
    return export_gguf(load_model(ck), load_tokenizer(ck), out, outtype, check)


def llama(path, n_ctx=256):
    # fp32 KV cache: the comparison measures the export, not llama.cpp's default f16 cache
    return open_llama(path, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)


def scores(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def checkpoint(tmp_path, tokenizer, **cfg):
    path = tmp_path / "ck"
    save_checkpoint(build(small_config(max_seq_len=128, **cfg), seed=1), path, tokenizer)
    return path


@pytest.mark.parametrize(
    "cfg",
    [
        {"d_model": 128},
        {"d_model": 96, "n_heads": 6},
        {"expansion_ratio": 3},
        {"clip_qkv": 0.5},
        {"alibi": False, "learned_pos_emb": True},
        {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "no_bias": False},
    ],
)
def test_llama_cpp_runs_our_gguf_like_we_do(tmp_path, tokenizer_path, cfg):
    """f32: llama.cpp tokenizes as we do, its logits match ours, and its greedy tokens equal ours for
    64 tokens (6 heads: ALiBi slopes for a head count that is not a power of two; QK-LayerNorm, learned
    positions, GQA with biases: llama.cpp's optional MPT tensors)."""
    tok = Tokenizer(tokenizer_path)
    model = trained(tok, **cfg)
    save_checkpoint(model, tmp_path / "ck", tok)
    llm = llama(to_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
    try:
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
            with torch.no_grad():
                ours = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
            theirs = torch.log_softmax(torch.tensor(scores(llm, ids)), -1)
            target = torch.tensor(ids[1:])[:, None]  # the prompt's own log-probabilities, as lm-eval scores
            assert (ours[:-1].gather(1, target) - theirs[:-1].gather(1, target)).abs().max() < 1e-3
            assert (ours - theirs).abs().max() < 3e-3  # every id: llama.cpp approximates GELU (see below)
            greedy = SamplingParams(max_new_tokens=64, temperature=0)
            # llama.cpp may pick the padded ids (a random model gives them mass): compare on the whole vocab
            expected = torch.stack(list(generate_ids(model, [ids], greedy, None)), 1)[0].tolist()
            got = []
            for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                got.append(t)
                if len(got) == 64:
                    break
            assert got == expected
    finally:
        llm.close()


def test_runs_of_spaces_and_tabs_tokenize_generate_and_print_as_ours(tmp_path, tokenizer_path):
    """Token ids equal ours for whitespace runs, and a model trained on indented code generates the same
    greedy tokens in llama.cpp, which prints them as the same text, indentation included."""
    tok = Tokenizer(tokenizer_path)
    code = "".join(f"def f{i}(x):\n    if x > {i}:\n        return x - {i}\n\treturn {i}\n\n" for i in range(600))
    model = trained(tok, steps=80, text=code)
    save_checkpoint(model, tmp_path / "ck", tok)
    llm = llama(to_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
    try:
        for text in WHITESPACE:
            ids = tok.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
            assert llm.detokenize(ids).decode() == text
        prompt = tok.encode("def f7(x):\n")
        greedy = SamplingParams(max_new_tokens=48, temperature=0)
        expected = torch.stack(list(generate_ids(model, [prompt], greedy, None)), 1)[0].tolist()
        got = [t for t, _ in zip(llm.generate(prompt, temp=0.0, top_k=1, reset=True), range(48))]
    finally:
        llm.close()
    assert got == expected
    text = tok.decode(expected)
    assert llm_text(tmp_path / "m.gguf", got) == text and "\n        return" in text  # indentation, printed


def llm_text(path, ids: list[int]) -> str:
    llm = llama(path)
    try:
        return llm.detokenize(ids).decode()
    finally:
        llm.close()


def test_the_remaining_gap_is_llama_cpps_fp16_gelu_table(tmp_path, tokenizer_path, monkeypatch):
    """ggml's CPU GELU is tanh-approximated and read from an fp16 table (GGML_GELU_FP16 in ggml-cpu/vec.h).
    With that GELU in our model, llama.cpp's prompt log-probabilities agree within 1e-3."""
    import torch.nn.functional as F

    tok = Tokenizer(tokenizer_path)
    model = trained(tok, steps=20)
    save_checkpoint(model, tmp_path / "ck", tok)
    llm = llama(to_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
    exact = F.gelu
    try:
        ids = tok.encode(PROMPTS[0] + " there lived a king")
        theirs = torch.log_softmax(torch.tensor(scores(llm, ids)), -1)
        with torch.no_grad():
            ours_exact = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
            monkeypatch.setattr(F, "gelu", lambda x, **_: exact(x.half().float(), approximate="tanh").half().float())
            ours_ggml = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    finally:
        llm.close()
    gap_exact, gap_ggml = (ours_exact - theirs).abs().max(), (ours_ggml - theirs).abs().max()
    print(f"llama.cpp vs ours: exact GELU {gap_exact:.2e}, ggml's GELU {gap_ggml:.2e}")
    assert gap_ggml < 1e-3 and gap_ggml < gap_exact / 3


@pytest.mark.parametrize(
    "cfg",
    [
        {"norm_type": "rmsnorm"},
        {"softmax_scale": 0.5},
        {"logit_scale": 2.0},
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused_and_really_differs(tmp_path, tokenizer_path, cfg):
    """Each refusal names its knob, and the file written anyway (check=False) is run by llama.cpp to
    something else."""
    tok = Tokenizer(tokenizer_path)
    model = build(small_config(max_seq_len=128, **cfg), seed=1)
    with torch.no_grad():
        for p in model.parameters():  # norm weights away from 1 and biases away from 0: every norm matters
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    save_checkpoint(model, tmp_path / "ck", tok)
    with pytest.raises(UserError, match=next(iter(cfg))):
        to_gguf(tmp_path / "ck", tmp_path / "x.gguf")
    llm = llama(to_gguf(tmp_path / "ck", tmp_path / "forced.gguf", check=False))
    try:
        ids = tok.encode(PROMPTS[0])
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        assert np.abs(scores(llm, ids) - ours).max() > 0.05  # llama.cpp computes something else
    finally:
        llm.close()


ABORTS = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False, n_threads=2)
llm.eval([1, 2, 3])
"""


def test_qk_layernorm_is_refused_because_llama_cpp_aborts_on_it(tmp_path, tokenizer_path):
    """llama.cpp reads attn_q_norm / attn_k_norm for MPT but its graph reshapes a non-contiguous view and
    aborts the process (llama-cpp-python 0.3.36). If this test fails, llama.cpp was fixed: lift the refusal."""
    tok = Tokenizer(tokenizer_path)
    save_checkpoint(build(small_config(max_seq_len=128, qk_ln=True), seed=1), tmp_path / "ck", tok)
    with pytest.raises(UserError, match="qk_ln"):
        to_gguf(tmp_path / "ck", tmp_path / "x.gguf")
    forced = to_gguf(tmp_path / "ck", tmp_path / "forced.gguf", check=False)
    run = subprocess.run([sys.executable, "-c", ABORTS, str(forced)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "GGML_ASSERT(ggml_is_contiguous(a))" in run.stderr


def test_quantized_and_half_gguf_load_and_stay_close(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ck = checkpoint(tmp_path, tok, d_model=128)
    ids = tok.encode(PROMPTS[1])
    reference = None
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        llm = llama(to_gguf(ck, tmp_path / f"{outtype}.gguf", outtype))
        try:
            got = scores(llm, ids)
        finally:
            llm.close()
        reference = got if reference is None else reference
        assert np.abs(got - reference).max() < (0.5 if outtype == "q8_0" else 0.1), outtype
    sizes = {t: (tmp_path / f"{t}.gguf").stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_the_demo_tokenizer_and_the_cli(tmp_path, capsys):
    """Our own small BPE (as `make demo` trains it) works in llama.cpp too; the CLI writes the file."""
    from longboi.tokenizer import train_bpe

    text = SHARED / "text" / "tinyshakespeare.txt"
    tok = train_bpe([text], 512, tmp_path / "tok.json")
    ck = tmp_path / "ck"
    save_checkpoint(build(small_config(vocab_size=512, max_seq_len=128), seed=2), ck, tok)
    assert main(["convert", str(ck), str(tmp_path / "d.gguf"), "--to", "gguf"]) == 0
    llm = llama(tmp_path / "d.gguf")
    try:
        sample = text.read_text()[5000:5400]
        assert llm.tokenize(sample.encode(), add_bos=False, special=False) == tok.encode(sample)
    finally:
        llm.close()
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "e.gguf"), "--to", "gguf"]) == 2
    assert "not a checkpoint, run or adapter directory" in capsys.readouterr().err


def test_q8_0_keeps_perplexity_within_one_percent_and_mostly_the_greedy_tokens(tmp_path, tokenizer_path):
    """q8_0 through llama.cpp on held-out Shakespeare (the last 10%, never trained on) vs our fp32 model."""
    tok = Tokenizer(tokenizer_path)
    model = trained(tok, steps=60, d_model=128)
    save_checkpoint(model, tmp_path / "ck", tok)
    text = (SHARED / "text" / "tinyshakespeare.txt").read_text()
    held_out = tok.encode(text[int(len(text) * 0.9) :])[: 8 * 128]
    windows = [held_out[i : i + 128] for i in range(0, len(held_out), 128)]

    def nll(logits: torch.Tensor, ids: list[int]) -> float:
        return -torch.log_softmax(logits[:-1].double(), -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()

    llm = llama(to_gguf(tmp_path / "ck", tmp_path / "q8.gguf", "q8_0"), n_ctx=128)
    try:
        with torch.no_grad():
            ours = sum(nll(model(torch.tensor([w]))[0], w) for w in windows)
        theirs = sum(nll(torch.tensor(scores(llm, w)), w) for w in windows)
        greedy = SamplingParams(max_new_tokens=32, temperature=0)
        same = total = 0
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            expected = torch.stack(list(generate_ids(model, [ids], greedy, None)), 1)[0].tolist()
            got = [t for t, _ in zip(llm.generate(ids, temp=0.0, top_k=1, reset=True), range(32))]
            same += next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(expected))
            total += len(expected)
    finally:
        llm.close()
    n = sum(len(w) - 1 for w in windows)
    ppl_ours, ppl_q8 = np.exp(ours / n), np.exp(theirs / n)
    print(
        f"held-out perplexity: ours fp32 {ppl_ours:.3f}, llama.cpp q8_0 {ppl_q8:.3f}; greedy prefix agreement "
        f"{same}/{total} tokens"
    )
    assert abs(ppl_q8 / ppl_ours - 1) < 0.01
    assert same >= total // 2  # identical until the first near-tie that int8 rounding flips
