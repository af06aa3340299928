"""House rules that a reviewer would otherwise check by hand (GUIDE.md, section 3)."""

import ast

from conftest import ROOT


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = []
    for path in sorted((ROOT / "longboi").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these: " + ", ".join(long)


def test_the_model_file_never_imports_the_distributed_stack():
    source = (ROOT / "longboi" / "model.py").read_text()
    assert "torch.distributed" not in source and "fsdp" not in source.lower()
