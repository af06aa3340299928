import subprocess
import sys

import pytest
from conftest import build, small_config

from longboi.checkpoint import save_checkpoint
from longboi.cli import COMMANDS, build_parser, main
from longboi.tokenizer import Tokenizer


@pytest.mark.parametrize("command", [c.__name__.replace("_", "-") for c in COMMANDS])
def test_every_command_has_help_from_its_docstring(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    doc = next(c for c in COMMANDS if c.__name__.replace("_", "-") == command).__doc__.splitlines()[0]
    assert doc in out


def test_info_on_a_preset(capsys):
    assert main(["info", "mpt-125m"]) == 0
    assert "non-embedding" in capsys.readouterr().out
    assert main(["info", "mpt-12m"]) == 2
    assert "did you mean 'mpt-125m'" in capsys.readouterr().err


def test_init_then_generate_through_the_real_command(tmp_path, tokenizer_path):
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "longboi"]
    subprocess.run(cmd + ["init", "tiny", str(ck), "--tokenizer", str(tokenizer_path)], check=True)
    long_prompt = tmp_path / "prompt.txt"
    long_prompt.write_text("word " * 300)  # 300 tokens > tiny's max_seq_len 256: allowed, with a note
    out = subprocess.run(
        cmd
        + [
            "generate",
            str(ck),
            "--prompt-file",
            str(long_prompt),
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr.count("past the trained max_seq_len 256") == 1
    assert out.stdout.strip()
    bad = subprocess.run(cmd + ["generate", str(ck)], capture_output=True, text=True)
    assert bad.returncode == 2 and "exactly one of --prompt or --prompt-file" in bad.stderr
    assert "Traceback" not in bad.stderr


# What the extras install ([hf], [s3], [plot], [lora], [tensorboard], [wandb], [dev]): none may be needed
# to import any longboi module (each is imported where its feature is used).
EXTRAS = ["transformers", "s3fs", "matplotlib", "peft", "tensorboard", "torch.utils.tensorboard", "wandb", "lm_eval",
          "moto", "accelerate", "fastapi", "uvicorn", "onnx", "onnxscript", "onnxruntime", "gguf",
          "llama_cpp", "scipy"]  # fmt: skip


# Loaded only inside vLLM's processes by its plugin hook (longboi.export.vllm.register), where vLLM and its
# transformers are always installed; tests/test_vllm.py imports them there.
INSIDE_VLLM = {"longboi.export.vllm_model", "longboi.export.vllm_config"}


def test_every_module_imports_without_any_optional_extra():
    from conftest import ROOT

    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "longboi").rglob("*.py"))
    assert "longboi.train.loop" in modules and len(modules) > 25 and INSIDE_VLLM <= set(modules)
    modules = [m for m in modules if m not in INSIDE_VLLM]
    code = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in EXTRAS)  # import -> ImportError
    code += "".join(f"import {m.removesuffix('.__init__').removesuffix('.__main__')}\n" for m in modules)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_sampling_options_none_and_zero_and_bad_values_from_the_cli(tmp_path, tokenizer_path, capsys):
    ck = tmp_path / "ck"
    assert main(["init", "tiny", str(ck), "--tokenizer", str(tokenizer_path)]) == 0
    base = ["generate", str(ck), "--prompt", "Hi", "--max-new-tokens", "3", "--seed", "1"]
    assert main(base + ["--top-k", "none", "--top-p", "none"]) == 0  # as documented: no limit
    assert main(base + ["--top-k", "0"]) == 0  # 0 is no limit too
    capsys.readouterr()
    for flag, value, field in [
        ("--top-k", "-3", "top_k"),
        ("--top-p", "1.5", "top_p"),
        ("--temperature", "-1", "temperature"),
    ]:
        assert main(base + [flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: sampling parameter {field}: expected") and "\n" not in err


def test_train_overrides_are_an_argument_of_the_same_function():
    """`longboi train CFG --k v` and `longboi.cli.train(CFG, "--k", "v")` are one function, no global state."""
    import inspect

    from longboi import cli

    ns = build_parser().parse_args(["train", "run.yaml", "--optimizer.lr", "1e-4", "--max_duration=6min"])
    assert (ns.config, ns.overrides) == ("run.yaml", ["--optimizer.lr", "1e-4", "--max_duration=6min"])
    assert ns._fn is cli.train and list(inspect.signature(cli.finetune).parameters) == ["config", "overrides"]
    assert not [name for name in vars(cli) if name.isupper() and name != "COMMANDS"]  # no module-level state
    with pytest.raises(SystemExit):  # other commands still refuse stray arguments
        build_parser().parse_args(["info", "tiny", "--bogus"])


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "{ck}", "--to", "gguf", "/proc/nope/x.gguf"],
        ["convert", "{ck}", "--to", "hf", "{file}/under-a-file"],
        ["merge", "{ck}", "{ck}", "/proc/nope/merged"],
        ["init", "tiny", "/proc/nope/ck", "--tokenizer", "{tok}"],
        ["train-tokenizer", "{tok}", "--vocab-size", "300", "--out", "/proc/nope/tok.json"],
        ["prepare", "{tok}", "--out", "/proc/nope/data", "--tokenizer", "{tok}"],
    ],
)
def test_every_command_that_writes_checks_its_output_location_first(command, tmp_path, tokenizer_path, capsys):
    """A place that cannot be written is one line naming it and why, before any work, never a traceback."""
    ck = tmp_path / "ck"
    save_checkpoint(build(small_config()), ck, Tokenizer(tokenizer_path))
    (tmp_path / "a-file").write_text("x")
    args = [a.format(ck=ck, file=tmp_path / "a-file", tok=tokenizer_path) for a in command]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output ") and "cannot write in" in err and "\n" not in err, err
