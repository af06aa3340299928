"""One loader for every inference command (longboi.inference): sources, devices, precisions, errors."""

import pytest
import torch
from conftest import build, small_config

from longboi.checkpoint import save_checkpoint
from longboi.cli import main
from longboi.errors import UserError
from longboi.inference import load_for_inference, resolve_device
from longboi.lora import LoraSettings, add_lora, save_adapter
from longboi.tokenizer import Tokenizer

IDS = torch.tensor([[5, 17, 300, 2048, 9]])


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_path):
    """A checkpoint, a run directory holding it as final/, and a LoRA adapter on it; with their logits."""
    d = tmp_path_factory.mktemp("sources")
    tok = Tokenizer(tokenizer_path)
    base = build(small_config(max_seq_len=128))
    save_checkpoint(base, d / "ck", tok)
    save_checkpoint(base, d / "run" / "final", tok)
    tuned = add_lora(build(small_config(max_seq_len=128)), LoraSettings(r=4, dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # make the adapter change the outputs
        logits = {"ck": base(IDS), "adapter": tuned(IDS)}
    save_adapter(tuned, d / "adapter", base=str(d / "ck"))
    return d, logits


@pytest.mark.parametrize("name", ["ck", "run", "adapter"])
def test_every_source_loads_in_fp32_on_the_cpu_with_its_logits(sources, name):
    d, logits = sources
    model, tok = load_for_inference(d / name, "fp32", device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32 and tok.vocab_size == 50277
    with torch.no_grad():
        got = model(IDS)
    assert torch.allclose(got, logits["adapter" if name == "adapter" else "ck"], atol=1e-5)


def test_int8_is_the_cpus_and_computes_in_fp32(sources):
    d, logits = sources
    from longboi.checkpoint import load_model
    from longboi.lora import load_adapter, merge
    from longboi.quantize import quantize_int8

    model, _ = load_for_inference(d / "adapter", "auto", "int8", "cpu")
    by_hand = quantize_int8(merge(load_adapter(load_model(d / "ck", dtype=torch.float32), d / "adapter")))
    with torch.no_grad():
        got = model(IDS)
        assert torch.equal(got, by_hand(IDS))  # the merged fp32 weights, quantized
        assert 0 < (got - logits["adapter"]).abs().mean() < 0.05  # int8 weights: close, not equal
    with pytest.raises(UserError, match="computes activations in fp32"):
        load_for_inference(d / "ck", "bf16", "int8", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_devices_are_checked_before_anything_loads(sources, capsys):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for bad, says in (("cuda", "no CUDA GPU is visible"), ("cuda:1", "no CUDA GPU"), ("tpu", "expected auto, cpu")):
        with pytest.raises(UserError, match=says):
            resolve_device(bad)
    with pytest.raises(UserError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("gpu:x")
    d, _ = sources
    for command in (
        ["generate", str(d / "run"), "--prompt", "a"],
        ["perplexity", str(d / "ck"), str(d / "ck" / "config.json")],
    ):
        assert main([*command, "--device", "cuda"]) == 2
        assert "error: --device cuda: no CUDA GPU is visible" in capsys.readouterr().err


def test_generate_and_chat_take_a_run_or_an_adapter_directory(sources, capsys, monkeypatch):
    d, _ = sources
    for source in ("run", "adapter"):
        args = ["generate", str(d / source), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--temperature", "0"]
        assert main([*args, "--device", "cpu", "--dtype", "fp32"]) == 0
        assert capsys.readouterr().out.strip()
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(d / "adapter"), "--max-new-tokens", "3", "--device", "cpu", "--seed", "0"]) == 0
    assert "assistant> " in capsys.readouterr().out
