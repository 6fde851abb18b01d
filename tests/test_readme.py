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


HEREDOCS = dict(
    re.findall(
        r"cat > (sd/\w+\.yaml) <<'EOF'\n(.*?)\nEOF", README.read_text(encoding="utf-8"), re.S
    )
)


def test_the_walkthrough_configs_are_valid():
    """The spoken-digits walkthrough's spec, train and head configs, as a user pastes them."""
    import yaml

    from jobs.head.config import parse_head_config
    from jobs.pretrain.config import parse_config
    from pipelines.spec import parse_spec

    assert set(HEREDOCS) == {"sd/spec.yaml", "sd/train.yaml", "sd/head.yaml"}
    text = README.read_text(encoding="utf-8")
    appended = re.search(r"cat >> sd/spec.yaml <<'EOF'\n(.*?)\nEOF", text, re.S).group(1)
    spec = parse_spec(yaml.safe_load(HEREDOCS["sd/spec.yaml"] + "\n" + appended))
    assert [f.name for f in spec.encode.feature_sets] == ["inputs", "trained"]
    assert parse_config(yaml.safe_load(HEREDOCS["sd/train.yaml"])).select is not None
    assert parse_head_config(yaml.safe_load(HEREDOCS["sd/head.yaml"])).fusion == "late"
