"""ONNX export, verified by onnxruntime running the exported graph (not by reading the file back ourselves)."""

import numpy as np
import pytest
import torch
from conftest import build, small_config, trained

from longboi.checkpoint import save_checkpoint
from longboi.cli import main
from longboi.tokenizer import Tokenizer

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extras")
pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (dev extras)")
from longboi.export.onnx import OnnxDecoder, export_onnx, io_names  # noqa: E402

PROMPTS = ["Once upon a time", "The capital of France is", "First Citizen:\nBefore we proceed any further"]


def left_padded(tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [tok.encode(p) for p in PROMPTS]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "no_bias": False, "clip_qkv": 0.5},
        {"alibi": False, "learned_pos_emb": True},
        {"qk_ln": True, "norm_type": "rmsnorm", "softmax_scale": 0.3, "logit_scale": 0.5, "n_heads": 6, "d_model": 96},
    ],
)
@pytest.mark.parametrize("train_steps", [0, 30])
def test_onnxruntime_prefill_and_cached_decode_match_ours(tmp_path, tokenizer_path, cfg, train_steps):
    """A left-padded batch of 3: the prefill logits of every real position and 4 cached decode steps
    agree within 1e-4 (fp32), random and briefly trained weights, for every config knob llama.cpp
    cannot take (the ONNX graph computes them all)."""
    tok = Tokenizer(tokenizer_path)
    model = trained(tok, train_steps, **cfg) if train_steps else build(small_config(max_seq_len=128, **cfg), seed=1)
    out = export_onnx(model, tok, tmp_path / "onnx")
    runtime = OnnxDecoder(out)
    ids, mask = left_padded(tok)
    cache = model.new_cache(64)
    past = runtime.empty_past(len(ids))
    with torch.no_grad():
        for step in range(5):
            ours = model(ids, attention_mask=mask, cache=cache)
            theirs, past = runtime.step(ids.numpy(), mask.numpy(), past)
            real = mask[:, -ids.shape[1] :].bool().numpy()  # padded positions' logits are never used
            assert np.abs(theirs - ours.numpy())[real].max() < 1e-4, f"step {step}"
            ids = ours[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
    assert past[0].shape == (3, model.config.kv_heads, mask.shape[1] - 1, model.config.head_dim)


def test_the_graph_has_optimums_names_dynamic_dims_and_external_weights(tmp_path, tokenizer_path):
    import onnx

    tok = Tokenizer(tokenizer_path)
    cfg = small_config(max_seq_len=128, n_layers=3)
    out = export_onnx(build(cfg), tok, tmp_path / "onnx")
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json"}
    assert (out / "model.onnx").stat().st_size < 200_000 < (out / "model.onnx.data").stat().st_size
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inputs, outputs = io_names(3)
    assert [v.name for v in graph.input] == inputs and [v.name for v in graph.output] == outputs
    assert inputs[2:4] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[1:3] == ["present.0.key", "present.0.value"]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(graph.input[0]) == ["batch_size", "sequence_length"]
    assert dims(graph.input[1]) == ["batch_size", "total_sequence_length"]
    assert dims(graph.input[2]) == ["batch_size", cfg.kv_heads, "past_sequence_length", cfg.head_dim]
    assert dims(graph.output[0]) == ["batch_size", "sequence_length", cfg.vocab_size]
    runtime = OnnxDecoder(out)  # batch 1 and 5 run too: the batch dimension was not fixed by the example
    for batch in (1, 5):
        logits, present = runtime.step(np.ones((batch, 7)), np.ones((batch, 7)), runtime.empty_past(batch))
        assert logits.shape == (batch, 7, cfg.vocab_size) and present[-1].shape[:3] == (batch, cfg.kv_heads, 7)


def test_a_greedy_loop_in_onnxruntime_reproduces_longboi_generate(tmp_path, tokenizer_path, capsys):
    tok = Tokenizer(tokenizer_path)
    model = trained(tok, 60, d_model=128)
    save_checkpoint(model, tmp_path / "ck", tok)
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "onnx"), "--to", "onnx"]) == 0
    runtime = OnnxDecoder(tmp_path / "onnx")
    capsys.readouterr()
    for prompt in PROMPTS:
        # fp32 pinned: onnxruntime runs f32, and `auto` is bf16 on AVX512-BF16 CPUs
        assert (
            main(["generate", str(tmp_path / "ck"), "--prompt", prompt, "--temperature", "0", "--dtype", "fp32"]) == 0
        )
        ours = capsys.readouterr().out[:-1]  # generate ends its stream with a newline
        (ids,) = runtime.greedy([tok.encode(prompt)], 128)
        assert tok.decode(ids) == ours and len(ids) > 20
    batch = runtime.greedy([tok.encode(p) for p in PROMPTS], 24)  # left-padded together: same continuations
    assert batch == [runtime.greedy([tok.encode(p)], 24)[0] for p in PROMPTS]
