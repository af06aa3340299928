import dataclasses

import pytest

from longboi.config import PRESETS, ModelConfig, from_dict, from_mpt_dict, preset, to_mpt_dict
from longboi.errors import UserError
from longboi.flops import model_stats


def test_mpt7b_preset_is_the_published_model_and_counts_6_7b_params_on_meta():
    cfg = preset("mpt-7b")
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.expansion_ratio) == (4096, 32, 32, 4)
    assert (cfg.max_seq_len, cfg.vocab_size, cfg.alibi, cfg.no_bias) == (2048, 50432, True, True)
    assert cfg.norm_type == "low_precision_layernorm"
    stats = model_stats(cfg)  # built on the meta device: this would need 26 GB otherwise
    assert 6.6e9 < stats.params < 6.7e9


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("tiny", 10e6, 30e6),
        ("mpt-125m", 115e6, 130e6),
        ("mpt-350m", 330e6, 370e6),
        ("mpt-760m", 730e6, 790e6),
        ("mpt-1b", 1.25e9, 1.4e9),
        ("mpt-3b", 2.6e9, 2.8e9),
        ("mpt-30b", 29e9, 31e9),
    ],
)
def test_preset_param_counts(name, low, high):
    assert low < model_stats(PRESETS[name]).params < high


def test_train_flops_formula_for_mpt7b():
    s = model_stats(preset("mpt-7b"))
    matmul = 32 * 12 * 4096**2 + 50432 * 4096  # every block matrix (12 d^2) and the LM head; norms are no matmul
    assert s.train_flops_per_token == 6 * matmul + 12 * 32 * 4096 * 2048


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(d_model=100, n_heads=3), "divisible by n_heads"),
        (dict(attn_type="grouped_query_attention"), "needs kv_n_heads"),
        (dict(attn_type="grouped_query_attention", kv_n_heads=3), "divisible by kv_n_heads"),
        (dict(kv_n_heads=2), "only used with attn_type"),
        (dict(learned_pos_emb=True), "learned_pos_emb must be false"),
        (dict(clip_qkv=-1.0), "clip_qkv"),
        (dict(attn_pdrop=1.5), "dropout"),
        (dict(embedding_fraction=0.0), "embedding_fraction"),
    ],
)
def test_invalid_configs_are_rejected_with_the_reason(changes, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(**{"d_model": 64, "n_heads": 4, "n_layers": 2, **changes})


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(UserError, match=r"run.yaml.*unknown key 'n_layer'.*did you mean 'n_layers'"):
        from_dict(ModelConfig, {"d_model": 64, "n_heads": 4, "n_layer": 2}, "run.yaml")


def test_missing_required_key_and_wrong_types():
    with pytest.raises(UserError, match="missing required key 'n_layers'"):
        from_dict(ModelConfig, {"d_model": 64, "n_heads": 4}, "m")
    with pytest.raises(UserError, match=r"m.d_model: expected int, got 'big'"):
        from_dict(ModelConfig, {"d_model": "big", "n_heads": 4, "n_layers": 2}, "m")
    with pytest.raises(UserError, match=r"m.norm_type: 'rmsnrom' is not one of .*did you mean 'rmsnorm'"):
        from_dict(ModelConfig, {"d_model": 64, "n_heads": 4, "n_layers": 2, "norm_type": "rmsnrom"}, "m")
    with pytest.raises(UserError, match="expected bool"):
        from_dict(ModelConfig, {"d_model": 64, "n_heads": 4, "n_layers": 2, "alibi": "yes"}, "m")


def test_unknown_preset_suggests():
    with pytest.raises(UserError, match="did you mean 'mpt-7b'"):
        preset("mpt-7")


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(attn_type="grouped_query_attention", kv_n_heads=2),
        dict(attn_type="multiquery_attention"),
        dict(qk_ln=True, clip_qkv=8.0, softmax_scale=0.1, norm_type="rmsnorm", no_bias=False),
        dict(alibi=False, learned_pos_emb=True, init_scheme="normal", init_std=0.01, emb_init_std=0.5),
        dict(expansion_ratio=2.5, logit_scale=0.5, tie_word_embeddings=False, attn_impl="flash"),
    ],
)
def test_mpt_json_round_trip(changes):
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2, **changes)
    assert from_mpt_dict(to_mpt_dict(cfg), "x") == cfg


def test_attn_impl_is_written_in_mpt_names():
    # MPT/LLM Foundry know "torch" and "flash"; eager is our debugging reference and reads back as sdpa.
    cfg = ModelConfig(d_model=64, n_heads=4, n_layers=2, attn_impl="eager")
    assert to_mpt_dict(cfg)["attn_config"]["attn_impl"] == "torch"
    assert from_mpt_dict(to_mpt_dict(cfg), "x").attn_impl == "sdpa"


def test_mpt_json_refuses_features_longboi_lacks():
    d = to_mpt_dict(ModelConfig(d_model=64, n_heads=4, n_layers=2))
    d["attn_config"]["rope"] = True
    with pytest.raises(UserError, match="attn_config.rope=True is not supported"):
        from_mpt_dict(d, "cfg.json")
    d = to_mpt_dict(ModelConfig(d_model=64, n_heads=4, n_layers=2))
    d["ffn_config"] = {"ffn_type": "te_ln_mlp"}
    with pytest.raises(UserError, match="ffn_type"):
        from_mpt_dict(d, "cfg.json")


def test_llm_foundry_style_config_reads():
    d = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "expansion_ratio": 4,
        "max_seq_len": 128,
        "vocab_size": 512,
        "learned_pos_emb": True,
        "logit_scale": "inv_sqrt_d_model",
        "attn_config": {"attn_impl": "triton", "alibi": True, "prefix_lm": False, "attn_uses_sequence_id": True},
        "init_config": {"name": "kaiming_normal_"},
    }
    cfg = from_mpt_dict(d, "x")
    assert cfg.alibi and not cfg.learned_pos_emb and cfg.attn_impl == "sdpa"
    assert cfg.logit_scale == pytest.approx(1 / 8)


def test_replace_validates():
    cfg = preset("tiny")
    assert cfg.replace(n_layers=2).n_layers == 2
    with pytest.raises(UserError):
        cfg.replace(n_heads=7)
    assert dataclasses.asdict(cfg) == dataclasses.asdict(cfg.replace())


@pytest.mark.parametrize(
    ("section", "key", "value", "wanted"),
    [
        ("optimizer", "lr", -1, "optimizer.lr: -1.0 must be > 0"),
        ("optimizer", "lr", 0, "optimizer.lr: 0.0 must be > 0"),
        ("optimizer", "betas", [0.9, 1.0], "optimizer.betas: [0.9, 1.0] must be two numbers in [0, 1)"),
        ("optimizer", "betas", [0.9], "optimizer.betas: [0.9] must be two numbers in [0, 1)"),
        ("optimizer", "eps", 0, "optimizer.eps: 0.0 must be > 0"),
        ("optimizer", "weight_decay", -0.1, "optimizer.weight_decay: -0.1 must be >= 0"),
        ("optimizer", "momentum", 1.0, "optimizer.momentum: 1.0 must be in [0, 1)"),
        ("schedule", "min_lr_ratio", 1.5, "schedule.min_lr_ratio: 1.5 must be in [0, 1]"),
    ],
)
def test_every_optimizer_and_schedule_number_is_checked_on_load_naming_the_key(section, key, value, wanted):
    from longboi.train.config import config_from_dict

    cfg = {"run_dir": "r", "model": "tiny", "tokenizer": "t", "max_duration": "1ba", "global_batch_size": 1}
    cfg |= {
        "data": {"sources": ["d"]},
        section: {"name": "muon", key: value} if section == "optimizer" else {key: value},
    }
    with pytest.raises(UserError) as e:
        config_from_dict(cfg, "run.yaml")
    assert str(e.value) == f"run.yaml: {wanted}"
