import resource
import subprocess
import sys

import pytest
import torch
from conftest import build, small_config
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

import longboi.model as model_mod
from longboi.checkpoint import clean_state_dict, save_checkpoint
from longboi.model import KVCache, alibi_slopes

KNOBS = [
    {},
    dict(attn_type="grouped_query_attention", kv_n_heads=2),
    dict(attn_type="multiquery_attention"),
    dict(qk_ln=True, clip_qkv=0.5),
    dict(norm_type="rmsnorm", no_bias=False, softmax_scale=0.3),
    dict(alibi=False, learned_pos_emb=True),
    dict(alibi=False),
    dict(d_model=96, n_heads=6, alibi_bias_max=4, tie_word_embeddings=False, logit_scale=0.7),
]


def ids_for(cfg, batch=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (batch, length), generator=g)


@pytest.mark.parametrize("n_heads", [1, 2, 4, 6, 8, 12, 20, 32, 48, 64])
def test_alibi_slopes_match_mpt_reference_including_non_power_of_two(n_heads):
    ref = build_mpt_alibi_tensor(n_heads, 2)[:, 0, 0]  # bias of key 0 at length 2 = -slope
    assert torch.allclose(alibi_slopes(n_heads), -ref, atol=0)


def test_alibi_slopes_by_hand():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]
    # 6 heads: slopes of 8 heads interleaved (odd positions first), keep 6 (ALiBi paper's recipe)
    eight = [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(6).tolist() == (eight[1::2] + eight[::2])[:6]
    assert alibi_slopes(4, bias_max=4).tolist() == [0.5, 0.25, 0.125, 0.0625]


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
def test_sdpa_equals_eager_reference(knobs):
    cfg = small_config(**knobs)
    sdpa, eager = build(cfg), build(cfg.replace(attn_impl="eager"))
    eager.load_state_dict(sdpa.state_dict())
    ids = ids_for(cfg)
    with torch.no_grad():
        assert torch.allclose(sdpa(ids), eager(ids), atol=1e-5)


@pytest.mark.parametrize("knobs", KNOBS, ids=str)
def test_kv_cache_equals_full_forward(knobs):
    cfg = small_config(**knobs)
    model, ids = build(cfg), ids_for(cfg, length=30)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg.n_layers, capacity=4)  # forces the buffer to grow several times
        parts = [model(ids[:, :11], cache=cache), model(ids[:, 11:12], cache=cache), model(ids[:, 12:], cache=cache)]
    assert cache.length == 30
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_chunked_attention_equals_unchunked(monkeypatch):
    cfg = small_config()
    model, ids = build(cfg), ids_for(cfg, length=40)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # padding forces the explicit-bias path
    with torch.no_grad():
        whole = model(ids, attention_mask=mask)
        monkeypatch.setattr(model_mod, "ATTN_CHUNK_BYTES", 4 * 2 * 4 * 40 * 3)  # 3 query rows per chunk
        chunks = model_mod.AttentionMask(40, 40, alibi_slopes(4), torch.device("cpu"), mask.bool()).row_chunks()
        assert len(chunks) == 14
        chunked = model(ids, attention_mask=mask)
    assert (whole - chunked).abs().max() < 1e-5  # fp32 kernel blocking differs by chunk size


def test_explicit_bias_path_equals_fast_causal_path():
    cfg = small_config()
    model, ids = build(cfg), ids_for(cfg, length=33)
    seq = torch.zeros_like(ids)  # one document per row: same answer, but through the chunked path
    with torch.no_grad():
        assert torch.allclose(model(ids), model(ids, sequence_id=seq), atol=1e-5)


@pytest.mark.parametrize("knobs", [{}, dict(alibi=False), dict(attn_impl="eager")], ids=str)
def test_sequence_id_isolates_packed_documents(knobs):
    cfg = small_config(**knobs)
    model = build(cfg)
    a, b = ids_for(cfg, 1, 10, seed=1), ids_for(cfg, 1, 14, seed=2)
    other_a = ids_for(cfg, 1, 10, seed=3)
    seq = torch.tensor([[0] * 10 + [1] * 14])
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), sequence_id=seq)
        changed = model(torch.cat([other_a, b], 1), sequence_id=seq)
        alone = model(b)
    assert torch.allclose(packed[:, 10:], changed[:, 10:], atol=1e-6)  # A's tokens cannot reach B
    if cfg.alibi:  # ALiBi is relative, so B packed behind A is exactly B alone
        assert torch.allclose(packed[:, 10:], alone, atol=1e-5)
    assert not torch.allclose(packed[:, :10], changed[:, :10])


def test_left_padding_gives_the_unpadded_logits():
    cfg = small_config()
    model = build(cfg)
    short = ids_for(cfg, 1, 9, seed=5)
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0] * 6 + [1] * 9])
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask)[:, 6:], model(short), atol=1e-5)


def test_learned_positions_refuse_to_extrapolate_but_alibi_does():
    cfg = small_config(alibi=False, learned_pos_emb=True, max_seq_len=16)
    with pytest.raises(ValueError, match="cannot extrapolate"):
        build(cfg)(ids_for(cfg, 1, 17))
    alibi = small_config(max_seq_len=16)
    assert torch.isfinite(build(alibi)(ids_for(alibi, 1, 100))).all()


def test_backward_through_every_knob():
    for knobs in KNOBS + [dict(embedding_fraction=0.25, attn_pdrop=0.1, resid_pdrop=0.1, emb_pdrop=0.1)]:
        model = build(small_config(**knobs)).train()
        model(ids_for(model.config)).logsumexp(-1).mean().backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), knobs


def test_embedding_fraction_scales_only_the_embedding_gradient():
    full, frac = small_config(), small_config(embedding_fraction=0.25)
    grads = []
    for cfg in (full, frac):
        model = build(cfg)
        model.transformer.wte.weight.requires_grad_(True)
        ids = ids_for(cfg)
        model.transformer(ids).sum().backward()  # trunk only: the tied head would add its own gradient
        grads.append(model.transformer.wte.weight.grad)
    assert torch.allclose(grads[1], 0.25 * grads[0], atol=1e-6)


def test_bf16_autocast_runs_close_to_fp32():
    cfg = small_config()
    model, ids = build(cfg), ids_for(cfg)
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_init_scales_residual_projections():
    cfg = small_config(n_layers=8, d_model=256)
    model = build(cfg)
    up = model.transformer.blocks[0].ffn.up_proj.weight.std().item()
    down = model.transformer.blocks[0].ffn.down_proj.weight.std().item()
    assert up == pytest.approx((2 / 256) ** 0.5, rel=0.05)  # kaiming normal, fan_in, relu gain
    assert down == pytest.approx((2 / 1024) ** 0.5 / 4, rel=0.05)  # / sqrt(2 * n_layers)


def test_compile_wrapper_prefixes_never_reach_saved_files(tmp_path):
    from safetensors.torch import load_file

    model = build(small_config())
    compiled = torch.compile(model)  # lazy: nothing compiles until called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_checkpoint(compiled, tmp_path / "ck")
    names = set(load_file(str(tmp_path / "ck" / "model.safetensors")))
    assert names == set(model.state_dict()) and not any("_orig_mod" in n for n in names)
    assert clean_state_dict({"module._orig_mod.transformer.wte.weight": 1}) == {"transformer.wte.weight": 1}


LONG_PREFILL = """
import resource, torch
from longboi.config import preset
from longboi.model import MPTForCausalLM
torch.manual_seed(0)
model = MPTForCausalLM(preset("tiny")).eval()
ids = torch.randint(0, 50000, (1, 32768))
with torch.no_grad():
    logits = model(ids, logits_to_keep=1)
    assert torch.isfinite(logits).all()
    cache = model.new_cache()  # then decode past it through the KV cache (explicit bias chunks)
    model(ids[:, :-256], cache=cache, logits_to_keep=1)
    last = model(ids[:, -256:], cache=cache, logits_to_keep=1)
    assert torch.allclose(last, logits, atol=1e-3), (last - logits).abs().max()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_32k_prefill_of_tiny_runs_in_bounded_memory():
    """128x past max_seq_len; a full (heads x T x T) fp32 tensor alone would be 17 GiB."""
    out = subprocess.run([sys.executable, "-c", LONG_PREFILL], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    peak_mib = int(out.stdout.strip())
    assert peak_mib < 4096, f"peak RSS {peak_mib} MiB"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


@pytest.mark.parametrize("knobs", [{}, dict(tie_word_embeddings=False, logit_scale=0.7)], ids=str)
def test_chunked_lm_loss_equals_cross_entropy_and_its_gradients(knobs, monkeypatch):
    import torch.nn.functional as F

    model = build(small_config(**knobs)).train()
    ids = ids_for(model.config, batch=3, length=41)
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[0, :7] = -100  # ignored positions (prompt masking) contribute nothing
    F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten()).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(model_mod, "LOSS_CHUNK_ROWS", 17)  # several chunks, a ragged last one
    loss = model(inputs, labels=labels)
    loss.backward()
    expected = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
    assert torch.allclose(loss, expected, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, reference[name], atol=1e-6), name


def test_the_fused_loss_does_no_gradient_work_without_grad(monkeypatch):
    """Under no_grad (validation) the loss is the same number, and the gradient pass never runs."""
    model, ids = build(small_config()), ids_for(small_config(), length=33)
    with_grad = model(ids[:, :-1], labels=ids[:, 1:])
    calls = []
    monkeypatch.setattr(model_mod.ChunkedLMLoss, "forward", lambda *a: calls.append(a))
    with torch.no_grad():
        without = model(ids[:, :-1], labels=ids[:, 1:])
    assert not calls and torch.allclose(without, with_grad.detach(), atol=1e-6)


def test_the_attention_bias_is_built_once_per_forward_and_shared_by_the_layers(monkeypatch):
    model = build(small_config(n_layers=4))
    ids = ids_for(small_config(), length=40)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # padding: the explicit-bias path
    built = []
    real = model_mod.AttentionMask.bias
    monkeypatch.setattr(model_mod.AttentionMask, "bias", lambda self, s, e: built.append((s, e)) or real(self, s, e))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert built == [(0, 40)]  # one chunk, once, for all 4 layers
    m = model_mod.AttentionMask(40, 40, alibi_slopes(4), torch.device("cpu"))
    assert m.bias_shape() == (1, 4)  # no padding or packing: the bias does not vary over the batch
