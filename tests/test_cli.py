import subprocess
import sys

import pytest

from longboi.cli import COMMANDS, build_parser, main


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


def test_core_imports_without_optional_extras():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import longboi.cli, longboi.model, longboi.generate, longboi.checkpoint, longboi.export.hf, longboi.plan"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
