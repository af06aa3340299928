"""The compiled decode step (longboi.compiled) against the eager model: same logits, same greedy text."""

from __future__ import annotations

import pytest
import torch
from conftest import build, small_config, trained

from longboi.compiled import CompiledDecoder
from longboi.errors import UserError
from longboi.generate import SamplingParams, generate_ids
from longboi.hardware import native_bf16
from longboi.inference import _check_native_bf16
from longboi.quantize import Int8Linear, quantize_int8_weights
from longboi.tokenizer import Tokenizer

NATIVE_BF16, EVIDENCE = native_bf16(torch.device("cpu"))


def step_logits(model, prompts: list[list[int]], tokens: list[int], decoder=None) -> torch.Tensor:
    """(steps, B, V) logits of decoding `tokens` (the same each row) after left-padded `prompts`."""
    from longboi.generate import _prefill, left_pad

    ids, mask = left_pad(prompts, 0)
    cache = model.new_cache(ids.shape[1] + len(tokens))
    key_valid = torch.nn.functional.pad(mask.bool(), (0, len(tokens)), value=True)
    out = []
    with torch.no_grad():
        _prefill(model, ids, mask, cache)
        for t in tokens:
            token = torch.full((len(prompts), 1), t)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            if decoder is None:
                out.append(model(token, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1])
            else:
                out.append(decoder(token, cache, key_valid))
    return torch.stack(out)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # ALiBi, MHA
        {"alibi": False, "learned_pos_emb": True},  # positions shifted by each row's left padding
        # GQA, QK-LayerNorm, clipping
        {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True, "clip_qkv": 6.0},
    ],
    ids=["alibi", "learned-positions", "gqa-qkln-clip"],
)
def test_compiled_step_matches_eager(changes):
    model = build(small_config(**changes))
    prompts = [list(range(100, 109)), list(range(300, 305))]  # different lengths: the second is left-padded
    tokens = [5, 77, 1000, 31]
    eager = step_logits(model, prompts, tokens)
    compiled = step_logits(model, prompts, tokens, CompiledDecoder(model))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_compiled_greedy_generation_equals_eager(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    model = trained(tokenizer)
    prompts = [tokenizer.encode("ROMEO:"), tokenizer.encode("First Citizen:\nWe are")]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    eager = torch.stack(list(generate_ids(model, prompts, params, None)))
    decoder = CompiledDecoder(model)
    compiled = torch.stack(list(generate_ids(model, prompts, params, None, decoder=decoder)))
    assert torch.equal(compiled, eager)
    longer = [tokenizer.encode("KING HENRY:\nNow, by my faith, the")]  # another capacity: no recompile needed
    again = list(generate_ids(model, longer, params, None, decoder=decoder))
    assert again == list(generate_ids(model, longer, params, None))


def test_a_full_cache_is_refused():
    model = build(small_config())
    cache = model.new_cache(3)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="cache is full"):
        CompiledDecoder(model)(torch.tensor([[4]]), cache, torch.ones(1, 3, dtype=torch.bool))


def test_int8_weights_are_close_to_the_weights_they_quantize():
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    layer = Int8Linear(w, dtype=torch.float32)
    x = torch.randn(3, 64)
    assert layer.weight.dtype == torch.int8
    err = (layer(x) - x @ w.T).abs().max()
    assert 0 < err < 0.02 * (x @ w.T).abs().max()  # per-row scales: ~1/254 of each row's range


@pytest.mark.skipif(not NATIVE_BF16, reason=f"int8 weights with bf16 activations need native bf16 ({EVIDENCE})")
def test_compiled_int8_weights_follow_the_bf16_model(tokenizer_path):
    tokenizer = Tokenizer(tokenizer_path)
    model = trained(tokenizer)
    ids = tokenizer.encode("ROMEO:\nWhat light through yonder window")
    reference = step_logits(model, [ids], [5, 6, 7]).float()
    quantized = quantize_int8_weights(model)
    assert quantized.transformer.wte.weight.dtype == torch.bfloat16
    compiled = step_logits(quantized, [ids], [5, 6, 7], CompiledDecoder(quantized)).float()
    eager = step_logits(quantized, [ids], [5, 6, 7]).float()
    torch.testing.assert_close(compiled, eager, atol=0.1, rtol=0.05)  # bf16 rounding of differently fused ops
    assert (compiled.argmax(-1) == reference.argmax(-1)).float().mean() >= 2 / 3


@pytest.mark.skipif(NATIVE_BF16, reason=f"this CPU has native bf16 ({EVIDENCE}): nothing to refuse")
def test_compiled_int8_is_refused_without_native_bf16():
    with pytest.raises(UserError, match="native bf16"):
        _check_native_bf16(torch.device("cpu"))


def test_generate_with_compile_prints_what_it_prints_without(tmp_path, tokenizer_path, capsys):
    from longboi.checkpoint import save_checkpoint
    from longboi.cli import main

    tok = Tokenizer(tokenizer_path)
    save_checkpoint(trained(tok), tmp_path / "ck", tok)
    args = ["generate", str(tmp_path / "ck"), "--prompt", "ROMEO:", "--temperature", "0", "--dtype", "fp32"]
    assert main(args + ["--max-new-tokens", "20"]) == 0
    eager = capsys.readouterr().out
    assert main(args + ["--max-new-tokens", "20", "--compile"]) == 0
    out = capsys.readouterr()
    assert out.out == eager and "compiling the decode step" in out.err
    if not NATIVE_BF16:
        assert main(args + ["--compile", "--quantize", "int8"]) == 2
        assert "needs a CPU with native bf16" in capsys.readouterr().err
