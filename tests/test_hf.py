"""Parity with Hugging Face transformers' native MptForCausalLM (no trust_remote_code).

Every knob HF can represent must give the same logits and greedy tokens; every knob it cannot is
shown to change HF's output (so our refusal to export it is necessary, not guesswork).
"""

import json

import pytest
import torch
from conftest import build, small_config
from transformers import MptConfig, MptForCausalLM

from longboi.checkpoint import config_json, load_model, save_checkpoint
from longboi.cli import main
from longboi.config import hf_unsupported
from longboi.errors import UserError
from longboi.export.hf import export_hf
from longboi.generate import SamplingParams, generate_ids
from longboi.tokenizer import Tokenizer

REPRESENTABLE = [
    {},
    dict(clip_qkv=0.3),
    dict(softmax_scale=0.35),
    dict(tie_word_embeddings=False),
    dict(norm_type="layernorm", layer_norm_epsilon=1e-3),
    dict(d_model=96, n_heads=6),  # non-power-of-2 heads: MPT's interleaved slopes
    dict(d_model=80, n_heads=5, n_layers=3),
    dict(embedding_fraction=0.5, resid_pdrop=0.1, emb_pdrop=0.1),  # training-only knobs
]

UNREPRESENTABLE = [
    (dict(attn_type="grouped_query_attention", kv_n_heads=2), "grouped_query_attention"),
    (dict(attn_type="multiquery_attention"), "multiquery_attention"),
    (dict(qk_ln=True), "qk_ln"),
    (dict(alibi=False, learned_pos_emb=True), "alibi=false"),
    (dict(alibi_bias_max=4), "alibi_bias_max=4"),
    (dict(expansion_ratio=2), "expansion_ratio=2"),
    (dict(no_bias=False), "no_bias=false"),
    (dict(norm_type="rmsnorm"), "rmsnorm"),
    (dict(logit_scale=0.5), "logit_scale"),
    (dict(attn_pdrop=0.1), "attn_pdrop"),
]


def ids_batch(length=40, batch=2, seed=0):
    return torch.randint(0, 50000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("knobs", REPRESENTABLE, ids=str)
def test_logits_match_transformers(knobs, tmp_path):
    ours = build(small_config(**knobs))
    save_checkpoint(ours, tmp_path / "ck")
    theirs = MptForCausalLM.from_pretrained(tmp_path / "ck").eval()
    ids = ids_batch()
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_logits_match_transformers_with_left_padding(tmp_path):
    ours = build(small_config())
    save_checkpoint(ours, tmp_path / "ck")
    theirs = MptForCausalLM.from_pretrained(tmp_path / "ck").eval()
    ids, mask = ids_batch(24), torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask), theirs(ids, attention_mask=mask).logits
    assert (a[0] - b[0]).abs().max() <= 1e-4 and (a[1, 7:] - b[1, 7:]).abs().max() <= 1e-4


@pytest.mark.parametrize("knobs", [{}, dict(clip_qkv=0.5, d_model=96, n_heads=6)], ids=str)
def test_greedy_tokens_match_transformers_generate(knobs, tmp_path):
    ours = build(small_config(max_seq_len=128, **knobs), seed=3)
    save_checkpoint(ours, tmp_path / "ck")
    theirs = MptForCausalLM.from_pretrained(tmp_path / "ck").eval()
    prompts = [ids_batch(12, 1, seed=1)[0].tolist(), ids_batch(5, 1, seed=2)[0].tolist()]
    params = SamplingParams(max_new_tokens=30, temperature=0)
    steps = list(generate_ids(ours, prompts, params, eos_id=None, pad_id=1))
    ours_tokens = torch.stack(steps, dim=1)
    for row, prompt in enumerate(prompts):
        hf = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=1, eos_token_id=None
        )
        assert hf[0, len(prompt) :].tolist() == ours_tokens[row].tolist()


@pytest.mark.parametrize("knobs, name", UNREPRESENTABLE, ids=str)
def test_unrepresentable_knobs_are_refused_and_really_differ_in_hf(knobs, name, tmp_path):
    cfg = small_config(**knobs)
    assert any(name in p for p in hf_unsupported(cfg))
    ours = build(cfg)
    with torch.no_grad():  # biases start at zero, which would hide that HF drops them
        for param_name, p in ours.named_parameters():
            if param_name.endswith(".bias"):
                p.normal_(std=0.5)
    save_checkpoint(ours, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "longboi_mpt"
    if "pdrop" not in name:  # dropout is zeroed by the inference export instead (next test)
        with pytest.raises(UserError, match=name):
            export_hf(tmp_path / "ck", tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
    # What HF would do with it: read the same config as MPT, load the weights it can, compare.
    hf_cfg = {k: v for k, v in config_json(cfg).items() if k not in ("architectures", "model_type", "longboi")}
    try:
        theirs = MptForCausalLM(MptConfig(**hf_cfg)).eval()
        theirs.load_state_dict(ours.state_dict(), strict=False)
        ids = ids_batch()
        with torch.no_grad():
            differs = (ours(ids) - theirs(ids).logits).abs().max().item() > 1e-3
    except Exception as e:  # HF rejects the config or cannot hold the weights: refusing is right too
        assert any(word in str(e) for word in ("size mismatch", "expected", "Validation")), e
        differs = True
    assert differs


def test_hf_export_zeroes_training_only_dropout(tmp_path):
    ours = build(small_config(attn_pdrop=0.1, resid_pdrop=0.2))
    save_checkpoint(ours, tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf")
    theirs = MptForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.attn_config.attn_pdrop == 0 and theirs.config.resid_pdrop == 0
    ids = ids_batch()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


def test_hf_saved_directory_converts_to_longboi_including_pickle(tmp_path, tokenizer_path, capsys):
    torch.manual_seed(0)
    theirs = MptForCausalLM(
        MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=50432, attn_config={"clip_qkv": 1.0})
    ).eval()
    theirs.save_pretrained(tmp_path / "hf_st")
    theirs.save_pretrained(tmp_path / "hf_bin")  # then the same weights in the older pickle format, which
    (tmp_path / "hf_bin" / "model.safetensors").unlink()  # transformers 5 no longer writes itself
    torch.save(theirs.state_dict(), tmp_path / "hf_bin" / "pytorch_model.bin")
    ids = ids_batch()
    with torch.no_grad():
        ref = theirs(ids).logits
    assert main(["convert", str(tmp_path / "hf_st"), "--to", "longboi", str(tmp_path / "ours")]) == 0
    with torch.no_grad():
        assert (load_model(tmp_path / "ours")(ids) - ref).abs().max() <= 1e-4
    assert main(["convert", str(tmp_path / "hf_bin"), "--to", "longboi", str(tmp_path / "o2")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="pickled"):
        main(["convert", str(tmp_path / "hf_bin"), "--to", "longboi", str(tmp_path / "o2"), "--allow-pickle"])
    with torch.no_grad():
        assert (load_model(tmp_path / "o2")(ids) - ref).abs().max() <= 1e-4


def test_sharded_hf_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    theirs = MptForCausalLM(MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=50432)).eval()
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = ids_batch()
    with torch.no_grad():
        assert (load_model(tmp_path / "hf")(ids) - theirs(ids).logits).abs().max() <= 1e-4


def test_export_cli_writes_a_directory_hf_auto_classes_load(tmp_path, tokenizer_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = build(small_config())
    save_checkpoint(ours, tmp_path / "ck", Tokenizer(tokenizer_path))
    assert main(["convert", str(tmp_path / "ck"), "--to", "hf", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("Hello world")["input_ids"] == [12092, 1533]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|padding|>"
    ids = ids_batch()
    with torch.no_grad():
        assert (ours(ids) - model(ids).logits).abs().max() <= 1e-4


def test_a_run_starts_from_a_directory_transformers_saved(tmp_path):
    """init_from a Hugging Face directory (save_pretrained, safetensors): read slice by slice into the
    meta-built model, every weight as saved."""
    from conftest import TOKENIZER

    from longboi.train.config import TrainConfig
    from longboi.train.loop import _start_model
    from longboi.train.parallelize import Dist

    cfg = small_config()
    source = build(cfg, seed=3)
    save_checkpoint(source, tmp_path / "ours", Tokenizer(TOKENIZER))
    MptForCausalLM.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf", safe_serialization=True)
    run = TrainConfig(
        run_dir=str(tmp_path / "run"), model=cfg, tokenizer=str(TOKENIZER), max_duration="1ba",
        global_batch_size=1, init_from=str(tmp_path / "hf"),
    )  # fmt: skip
    model, _ = _start_model(run, Tokenizer(TOKENIZER), Dist(), bf16=False)
    started, saved = model.state_dict(), source.state_dict()
    assert started.keys() == saved.keys() and all(torch.equal(started[k], saved[k]) for k in saved)
