"""The README's copy-paste sequences run as written: `make demo`'s recipe (durations shortened through overrides),
then the "Finetune to serve" block and the Python after it, in a fresh directory laid out like a clone (the
repository's configs and bench, ../shared beside it), so nothing a previous run left behind can make it pass."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import ROOT, SHARED
from test_serve import free_port

SHORTER = ["--max_duration", "2ba"]  # the only change to what the README says: minutes of training become 2 steps


def make_recipe(target: str) -> list[str]:
    """The shell lines of a Makefile target, continuation lines joined and $(VARS) substituted."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(
        re.findall(r"^([A-Z_]+) :?\?=\s*(.*)$", text, re.M) + re.findall(r"^([A-Z_]+) :?=\s*(.*)$", text, re.M)
    )
    recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    lines = recipe.replace("\\\n", " ").splitlines()
    expand = lambda s: re.sub(r"\$\((\w+)\)", lambda m: expand(variables[m.group(1)]), s)
    return [expand(line.strip()) for line in lines]


def readme_block(after: str, language: str) -> str:
    """The first ```language block after the line starting with `after`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    return re.search(rf"```{language}\n(.*?)```", text[start:], re.S).group(1)


def command(line: str) -> list[str]:
    """A README/Makefile shell line as argv in this interpreter (`longboi` and `python` are ours)."""
    words = shlex.split(line, comments=True)
    if words[0].endswith("longboi"):
        return [sys.executable, "-m", "longboi", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    raise AssertionError(f"not a command this test knows how to run: {line}")


def run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_finetune_to_serve_block_runs_as_written_after_the_demo(tmp_path):
    work = tmp_path / "clone"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED.parent)  # the README's ../shared
    for part in ("configs", "bench"):
        (work / part).symlink_to(ROOT / part)
    for line in make_recipe("demo"):  # train-tokenizer, prepare, train (2 steps), generate
        argv = command(line)
        run(argv + SHORTER if argv[3:4] == ["train"] else argv, work)
    assert (work / "runs" / "demo" / "train" / "final" / "config.json").is_file()

    shell = readme_block("**Finetune to serve**", "bash").replace("\\\n", " ")
    lines = [line for line in shell.splitlines() if line.strip()]
    *steps, serve = lines
    for line in steps:
        argv = command(line)
        run(argv + SHORTER if "finetune" in argv[3:4] else argv, work)
    port = free_port()
    server = subprocess.Popen([*command(serve), "--port", str(port)], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        python = readme_block("**Finetune to serve**", "python").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        scope: dict = {}
        for line in python.splitlines():  # each line as written; a value the README shows after # is checked
            code, _, shown = line.partition("  # ")
            tree = ast.parse(code, mode="exec")
            if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
                value = eval(compile(ast.Expression(tree.body[0].value), "README", "eval"), scope)
                if shown.strip().startswith("["):
                    assert value == ast.literal_eval(shown.strip()), (line, value)
            else:
                exec(compile(tree, "README", "exec"), scope)
    finally:
        server.terminate()
        server.wait(timeout=60)
