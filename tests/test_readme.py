"""The README's Python examples run as written, on the demo store, with the public imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block, demo, monkeypatch):
    workdir, _ = demo
    monkeypatch.chdir(workdir.parent)  # the examples say "mmfp-demo/store"
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_examples_use_the_public_imports(block):
    """``from features import ...`` / ``from pipelines import ...``, never their modules."""
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in ("features", "pipelines", "jobs"):
                assert node.module in ("features", "pipelines"), node.module
