import pytest
import torch
import yaml
from conftest import TOKENIZER, build, finetune_run, small_config
from safetensors.torch import load_file

from longboi.checkpoint import load_model, save_checkpoint
from longboi.cli import main
from longboi.errors import UserError
from longboi.lora import LoraSettings, add_lora, load_adapter, merge, save_adapter
from longboi.tokenizer import Tokenizer
from longboi.train.config import config_from_dict


def ids():
    return torch.randint(0, 50000, (2, 20), generator=torch.Generator().manual_seed(0))


def test_adapter_save_load_and_merge_give_the_same_logits(tmp_path):
    base = build(small_config(), seed=1)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = add_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # lora_B starts at zero; make the adapter do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
        adapted = model(ids())
    save_adapter(model, tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 0.2 * sum(v.numel() * 4 for v in reference.values())
    fresh = build(small_config(), seed=1)
    loaded = load_adapter(fresh, tmp_path / "adapter").eval()
    merged = merge(load_adapter(build(small_config(), seed=1), tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids()), adapted, atol=1e-6)
        assert torch.allclose(merged(ids()), adapted, atol=1e-5)
        assert not torch.allclose(build(small_config(), seed=1)(ids()), adapted, atol=1e-3)
    assert set(merged.state_dict()) == set(reference)  # a plain model again: no LoRA names left


def test_lora_finetune_trains_adapters_only_and_merge_cli_matches(tmp_path):
    base_dir = tmp_path / "base"
    save_checkpoint(build(small_config(max_seq_len=64)), base_dir, Tokenizer(TOKENIZER))
    cfg = finetune_run(
        base_dir,
        run_dir=str(tmp_path / "run"),
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        max_duration="6ba",
        optimizer={"lr": 1e-2},
        checkpoint={"every": "3ba"},
    )
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["finetune", str(path)]) == 0
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert main(["merge", str(base_dir), str(tmp_path / "run" / "adapter"), str(tmp_path / "merged")]) == 0
    a, b = load_model(tmp_path / "merged"), load_model(tmp_path / "run" / "final")
    base = load_model(base_dir)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.transformer.blocks[0].attn.Wqkv.weight, base.transformer.blocks[0].attn.Wqkv.weight)
    assert torch.equal(a.transformer.wte.weight, base.transformer.wte.weight)  # not a LoRA target: untouched


def test_lora_needs_a_base_model():
    with pytest.raises(UserError, match="lora trains adapters on a base model"):
        config_from_dict(
            {
                "run_dir": "r",
                "model": "tiny",
                "tokenizer": "t",
                "max_duration": "1ba",
                "global_batch_size": 1,
                "finetune": {"data": "x.jsonl"},
                "lora": {},
            },
            "cfg.yaml",
        )
