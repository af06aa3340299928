"""`longboi convert --to gguf|onnx` from the command line: the demo's own checkpoint, and bad inputs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, build, open_llama, small_config

from longboi.checkpoint import load_model, save_checkpoint
from longboi.cli import main
from longboi.lora import LoraSettings, add_lora, save_adapter
from longboi.tokenizer import Tokenizer

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny-shakespeare.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`make demo`'s steps through the CLI (its tokenizer, data and config), trained 30 steps, not 6 minutes."""
    d = tmp_path_factory.mktemp("demo")
    text = str(SHARED / "text" / "tinyshakespeare.txt")
    tok = str(d / "tokenizer.json")
    assert main(["train-tokenizer", text, "--vocab-size", "4096", "--holdout-fraction", "0.1", "--out", tok]) == 0
    prep = ["prepare", text, "--out", str(d / "data"), "--tokenizer", tok, "--seq-len", "257", "--val-fraction", "0.1"]
    assert main(prep) == 0
    overrides = {"run_dir": d / "train", "tokenizer": tok, "data.sources": f"[{d / 'data' / 'train'}]"}
    overrides |= {"data.val": d / "data" / "val", "max_duration": "30ba", "eval.every": "30ba", "eval.val_batches": 2}
    overrides |= {"checkpoint.every": "30ba", "precision": "fp32"}
    args = [str(DEMO_CONFIG)] + [x for k, v in overrides.items() for x in (f"--{k}", str(v))]
    assert main(["train", *args]) == 0
    return d / "train"


def test_the_demo_checkpoint_exports_to_gguf_and_onnx_from_the_cli(demo_run, tmp_path):
    """The run directory (its final weights) goes straight to both formats; each runtime computes our logits."""
    model = load_model(demo_run / "final")
    tok = Tokenizer(demo_run / "final")
    ids = tok.encode("ROMEO:\nWhat light through yonder window breaks?")
    with torch.no_grad():
        ours = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    assert main(["convert", str(demo_run), str(tmp_path / "demo.onnx"), "--to", "onnx"]) == 0
    from longboi.export.onnx import OnnxDecoder

    runtime = OnnxDecoder(tmp_path / "demo.onnx")
    logits, _ = runtime.step(np.array([ids]), np.ones((1, len(ids))), runtime.empty_past(1))
    assert np.abs(torch.log_softmax(torch.tensor(logits[0]), -1).numpy() - ours.numpy()).max() < 1e-4
    assert main(["convert", str(demo_run), str(tmp_path / "demo.gguf"), "--to", "gguf", "--outtype", "q8_0"]) == 0
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the dev extras")
    llm = open_llama(tmp_path / "demo.gguf", n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=False) == ids
        llm.eval(ids)
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)])), -1)
    finally:
        llm.close()
    target = torch.tensor(ids[1:])[:, None]  # q8_0 weights: the prompt's log-probabilities stay close
    assert (theirs[:-1].gather(1, target) - ours[:-1].gather(1, target)).abs().max() < 0.05


def one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err


@pytest.mark.parametrize("to", ["gguf", "onnx"])
def test_bad_inputs_are_one_line_errors(tmp_path, tokenizer_path, capsys, to):
    dst = str(tmp_path / f"out.{to}")
    one_line_error(capsys, ["convert", str(tmp_path / "missing"), dst, "--to", to], "not a checkpoint, run or adapter")
    base = tmp_path / "base"
    model = build(small_config())
    save_checkpoint(model, base, Tokenizer(tokenizer_path))
    adapter = save_adapter(
        add_lora(model, LoraSettings(r=2, dropout=0.0)), tmp_path / "adapter", base=str(tmp_path / "gone")
    )
    one_line_error(capsys, ["convert", str(adapter), dst, "--to", to], "base checkpoint")
    (base / "tokenizer.json").unlink()
    one_line_error(capsys, ["convert", str(base), dst, "--to", to], "no tokenizer.json")
    assert not (tmp_path / f"out.{to}").exists()  # nothing half-written under the real name


def test_onnx_has_no_quantized_outtype(tmp_path, tokenizer_path, capsys):
    save_checkpoint(build(small_config()), tmp_path / "ck", Tokenizer(tokenizer_path))
    one_line_error(
        capsys, ["convert", str(tmp_path / "ck"), str(tmp_path / "o"), "--to", "onnx", "--outtype", "q8_0"], "f32"
    )


def test_an_adapter_exports_merged_onto_its_base(tmp_path, tokenizer_path):
    """A LoRA adapter directory with its base present exports the merged model (same logits as peft's)."""
    tok = Tokenizer(tokenizer_path)
    base = tmp_path / "base"
    save_checkpoint(build(small_config(max_seq_len=128)), base, tok)
    model = add_lora(build(small_config(max_seq_len=128)), LoraSettings(r=4, dropout=0.0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at zero: make the adapter change the outputs
    adapter = save_adapter(model, tmp_path / "adapter", base=str(base))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert main(["convert", str(adapter), str(tmp_path / "merged"), "--to", "onnx"]) == 0
    from longboi.export.onnx import OnnxDecoder

    ids = tok.encode("Once upon a time")
    runtime = OnnxDecoder(tmp_path / "merged")
    logits, _ = runtime.step(np.array([ids]), np.ones((1, len(ids))), runtime.empty_past(1))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
        plain = build(small_config(max_seq_len=128))(torch.tensor([ids]))[0].numpy()
    assert np.abs(logits[0] - ours).max() < 1e-4 < np.abs(logits[0] - plain).max()
