"""GGUF export, verified by llama.cpp itself (llama-cpp-python) loading the file and running it."""

import numpy as np
import pytest
import torch
from conftest import SHARED, build, small_config

from longboi.checkpoint import save_checkpoint
from longboi.cli import main
from longboi.export.gguf import export_gguf
from longboi.generate import SamplingParams, generate_ids
from longboi.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the dev extras (built from source)")
# Runs of spaces are left out: llama.cpp's "mpt" pre-tokenizer splits "\n    return" into other tokens than
# the GPT-NeoX tokenizer does (5 vs 6 ids), a difference of llama.cpp's, seen while writing these tests.
PROMPTS = ["Once upon a time", "The capital of France is", "def main():\n\treturn 42"]


def llama(path, n_ctx=256):
    # fp32 KV cache: the comparison measures the export, not llama.cpp's default f16 cache
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)


def scores(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def checkpoint(tmp_path, tokenizer, **cfg):
    path = tmp_path / "ck"
    save_checkpoint(build(small_config(max_seq_len=128, **cfg), seed=1), path, tokenizer)
    return path


def trained(tokenizer, steps: int = 40, **cfg):
    """A model trained a few steps on Shakespeare: peaked next-token distributions, so greedy decoding
    has real margins (random weights give near-ties that any rounding flips)."""
    model = build(small_config(max_seq_len=128, **cfg), seed=1).train()
    ids = torch.tensor(tokenizer.encode((SHARED / "text" / "tinyshakespeare.txt").read_text()[:40_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize(
    "cfg", [{"d_model": 128}, {"d_model": 96, "n_heads": 6}, {"expansion_ratio": 3}, {"clip_qkv": 0.5}]
)
def test_llama_cpp_runs_our_gguf_like_we_do(tmp_path, tokenizer_path, cfg):
    """f32: llama.cpp tokenizes as we do, its logits match ours, and its greedy tokens equal ours for
    64 tokens (6 heads: ALiBi slopes for a head count that is not a power of two)."""
    tok = Tokenizer(tokenizer_path)
    model = trained(tok, **cfg)
    save_checkpoint(model, tmp_path / "ck", tok)
    llm = llama(export_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
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


def test_the_remaining_gap_is_llama_cpps_fp16_gelu_table(tmp_path, tokenizer_path, monkeypatch):
    """ggml's CPU GELU is tanh-approximated and read from an fp16 table (GGML_GELU_FP16 in ggml-cpu/vec.h).
    With that GELU in our model, llama.cpp's prompt log-probabilities agree within 1e-3."""
    import torch.nn.functional as F

    tok = Tokenizer(tokenizer_path)
    model = trained(tok, steps=20)
    save_checkpoint(model, tmp_path / "ck", tok)
    llm = llama(export_gguf(tmp_path / "ck", tmp_path / "m.gguf"))
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


def test_what_llama_cpp_cannot_compute_is_refused_and_really_differs(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ck = checkpoint(tmp_path, tok, qk_ln=True)
    with pytest.raises(Exception, match="qk_ln"):
        export_gguf(ck, tmp_path / "x.gguf")
    model = build(small_config(max_seq_len=128, qk_ln=True), seed=1)
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm weights away from 1, so the per-head norm matters
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    save_checkpoint(model, ck, tok)
    llm = llama(export_gguf(ck, tmp_path / "forced.gguf", check=False))
    try:
        ids = tok.encode(PROMPTS[0])
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        assert np.abs(scores(llm, ids) - ours).max() > 0.05  # llama.cpp computes something else
    finally:
        llm.close()


def test_quantized_and_half_gguf_load_and_stay_close(tmp_path, tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    ck = checkpoint(tmp_path, tok, d_model=128)
    ids = tok.encode(PROMPTS[1])
    reference = None
    for outtype in ("f32", "f16", "bf16", "q8_0"):
        llm = llama(export_gguf(ck, tmp_path / f"{outtype}.gguf", outtype))
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
    assert "not a checkpoint directory" in capsys.readouterr().err
