"""Muon (longboi.train.muon): which parameter goes where, the update, training, bit-exact resume, FSDP2."""

from __future__ import annotations

import pytest
import torch
from test_distributed import torchrun, write
from test_train import assert_resumed, assert_same_run, kill_at_then_resume, run_config, train_losses, write_config

from longboi.cli import main
from longboi.config import ModelConfig
from longboi.errors import UserError
from longboi.model import MPTForCausalLM
from longboi.train.config import OptimizerConfig
from longboi.train.muon import MuonAdamW, newton_schulz
from longboi.train.optim import build_optimizer, param_groups

MUON = {"optimizer": {"name": "muon", "lr": 3e-3, "weight_decay": 0.01}}


def test_the_blocks_matrices_go_to_muon_everything_else_to_adamw():
    model = MPTForCausalLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, no_bias=False, vocab_size=512))
    muon, decay, no_decay = param_groups(model, OptimizerConfig(name="muon", weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon["muon"] and {names[id(p)].rsplit(".", 2)[-2] for p in muon["params"]} == {
        "Wqkv",
        "out_proj",
        "up_proj",
        "down_proj",
    }
    assert len(muon["params"]) == 8 and all(p.ndim == 2 for p in muon["params"])
    rest = {names[id(p)] for p in decay["params"] + no_decay["params"]}
    assert "transformer.wte.weight" in rest and "transformer.norm_f.weight" in rest
    assert "transformer.blocks.0.attn.Wqkv.bias" in rest and not any(".Wqkv.weight" in n for n in rest)
    assert isinstance(build_optimizer(model, OptimizerConfig(name="muon")), MuonAdamW)


def test_newton_schulz_computes_in_the_runs_precision():
    """An fp32 run (a pinned ladder) does fp32 Newton-Schulz on every CPU; a bf16 run does bf16."""
    model = MPTForCausalLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=512))
    fp32, bf16 = (build_optimizer(model, OptimizerConfig(name="muon"), bf16=b) for b in (False, True))
    assert (fp32.ns_dtype, bf16.ns_dtype) == (torch.float32, torch.bfloat16)
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    assert newton_schulz(g).dtype == torch.float32 and newton_schulz(g, torch.bfloat16).dtype == torch.bfloat16
    assert (newton_schulz(g) - newton_schulz(g, torch.bfloat16).float()).abs().max() > 1e-4  # not the same sums


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_the_runs_precision_reaches_newton_schulz(tmp_path, data, precision, dtype):
    from longboi.train.config import config_from_dict
    from longboi.train.loop import setup

    knobs = {"max_duration": "1ba", "precision": precision, **MUON}
    run = setup(config_from_dict(run_config(data, tmp_path / precision, **knobs), "x"))
    run.metrics.close()
    assert run.optimizer.ns_dtype == dtype


def test_newton_schulz_orthogonalizes_and_the_update_matches_adamws_rms():
    torch.manual_seed(0)
    g = torch.randn(96, 32)
    o = newton_schulz(g).float()
    singular = torch.linalg.svdvals(o)
    assert o.shape == g.shape and singular.min() > 0.5 and singular.max() < 1.5  # ~U V^T (the quintic's band)
    p = torch.nn.Parameter(torch.zeros(96, 32))
    opt = MuonAdamW([{"params": [p], "muon": True}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, momentum=0.95)
    p.grad = g
    opt.step()
    rms = p.detach().pow(2).mean().sqrt()
    assert 0.1 * 1e-2 < rms < 0.4 * 1e-2  # 0.2 x sqrt(max dim) x lr scales the update RMS near AdamW's (~0.2 lr)


def test_muon_trains_and_resumes_bit_identically_after_kill_9(tmp_path, data):
    knobs = {"max_duration": "10ba", "checkpoint.every": "2ba", "eval.every": "5ba", **MUON}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = write_config(tmp_path / "a", run_config(data, tmp_path / "straight", **knobs))
    crashed = write_config(tmp_path / "b", run_config(data, tmp_path / "crashed", **knobs))
    assert main(["train", str(straight)]) == 0
    losses = train_losses(tmp_path / "straight")
    assert losses[10] < losses[1] - 0.3  # it learns (AdamW at this lr: -2.1, Muon -0.5 in 10 steps of a d64 model)
    kill_at_then_resume(crashed, tmp_path / "crashed", 6)
    assert_same_run(tmp_path / "straight", tmp_path / "crashed")
    assert_resumed(tmp_path / "crashed", from_at_least=6)


@pytest.mark.distributed
def test_muon_with_fsdp_on_two_ranks_matches_one_process(tmp_path, data):
    knobs = {"max_duration": "6ba", "global_batch_size": 8, "micro_batch_size": 2, "eval.every": "3ba", **MUON}
    assert main(["train", str(write(tmp_path, "one", run_config(data, tmp_path / "one", **knobs)))]) == 0
    proc = torchrun(write(tmp_path, "fsdp", run_config(data, tmp_path / "two", parallel="fsdp", **knobs)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(abs(one[k] - two[k]) < 1e-3 * max(1.0, abs(one[k])) for k in one), (one, two)


def test_muon_with_lora_is_refused_with_the_reason():
    from longboi.lora import LoraSettings, add_lora

    model = add_lora(MPTForCausalLM(ModelConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=512)), LoraSettings(r=2))
    with pytest.raises(UserError, match="muon with lora: not supported"):
        build_optimizer(model, OptimizerConfig(name="muon"))
