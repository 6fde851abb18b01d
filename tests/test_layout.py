"""The layout's laws: layers import only downwards, no two files import each other (directly
or around a circle, counting imports inside functions and under TYPE_CHECKING), the library
neither prints nor changes a user's environment."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "pipelines", "jobs", "benchmarks")
# who may import whom: each layer only the ones before it
LAYERS = {"features": set(), "pipelines": {"features"}, "jobs": {"features", "pipelines"}}
LAYERS["benchmarks"] = {"features", "pipelines", "jobs", "benchmarks"}
LIBRARY = ("features", "pipelines")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an import of ``name`` executes (the longest known prefix)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> set[str]:
    """Every project module ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in map(_target, names) if t is not None}
    return found


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_is_read():
    """A check that cannot fail is no check: the graph holds the edges we know exist."""
    assert "features.tables" in GRAPH["features.store"]
    assert "pipelines.build.run" in GRAPH["pipelines.build.samples"]
    assert "pipelines.errors" in GRAPH["pipelines.collect"]  # `from pipelines import errors`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_import_only_downwards(package):
    allowed = LAYERS[package] | {package}
    wrong = {
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if m.split(".")[0] == package
        for t in targets
        if t.split(".")[0] not in allowed
    }
    assert not wrong


def test_the_library_never_imports_the_demo_or_test_fixtures():
    library = [m for m in GRAPH if m.split(".")[0] in LIBRARY]
    assert not [m for m in library if any(t.startswith("jobs") for t in GRAPH[m])]
    tiny = ("tiny", "synthetic", "plots")
    assert not [m for m in library if m.rpartition(".")[2] in tiny]


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_does_not_print(package):
    """Only jobs/ renders to the terminal; the library returns data."""
    offenders = []
    for name, path in MODULES.items():
        if name.split(".")[0] != package:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{name}:{node.lineno} print()")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("rich", "typer", "click") for n in names):
                    offenders.append(f"{name}:{node.lineno} imports a terminal library")
    assert not offenders


def test_importing_the_library_leaves_the_environment_alone():
    """A library must not change its user's environment (HF_HUB_OFFLINE, ...) on import."""
    library = sorted(m for m in MODULES if m.split(".")[0] in LIBRARY)
    code = (
        "import importlib, json, os, sys; before = dict(os.environ); "
        f"[importlib.import_module(m) for m in {library!r}]; "
        "changed = sorted(k for k in set(before) | set(os.environ) "
        "if before.get(k) != os.environ.get(k)); "
        "print(json.dumps(changed)); sys.stdout.flush(); os._exit(0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_public_api():
    """What the README promises users can import from the package roots."""
    import features
    import pipelines

    for name in ("FeatureStore", "StoreError", "FeatureSetMeta", "search", "run_sql"):
        assert name in features.__all__
        assert getattr(features, name)
    for name in ("build", "load_spec", "BuildResult", "embed_query"):
        assert name in pipelines.__all__
        assert getattr(pipelines, name)
    for package in (features, pipelines):  # every promised name resolves, nothing more
        assert all(getattr(package, name) for name in package.__all__)
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            package.nope  # noqa: B018


def test_a_stage_worker_imports_only_what_its_stage_needs():
    """A Ray worker running collect (read, split, dedup, write) is cold in every CLI call:
    importing a stage module must not drag in the package facades (Ray Data plans, DuckDB
    SQL, search, the CLI)."""
    code = """
import json, sys
import features.sink, pipelines.collect, pipelines.dedup, pipelines.route, pipelines.split
heavy = ("pipelines.build", "features.sql", "features.search", "features.store", "jobs")
print(json.dumps(sorted(m for m in sys.modules if m.startswith(heavy))))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_cli_starts_without_the_heavy_libraries():
    """Every ``mmfp`` call is a cold process: the command line itself loads no Ray (1.2 s
    with Ray Data), torch, SciPy, APScheduler or the web stack; a command imports what
    it uses when it runs (a small build never imports Ray: tests/test_in_process.py)."""
    code = """
import json, sys
import jobs.cli
heavy = {"ray", "torch", "scipy", "sklearn", "apscheduler", "transformers", "fastapi"}
print(json.dumps(sorted(heavy & {m.split(".")[0] for m in sys.modules})))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_every_module_ships_to_a_cluster_and_into_git(tmp_path):
    """What `mmfp submit` packs as the job's working_dir (Ray reads .gitignore too) holds
    every module of the project: an unanchored ignore rule once dropped pipelines/build/."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from jobs.submit import DEFAULT_EXCLUDES

    package = tmp_path / "job.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=list(DEFAULT_EXCLUDES))
    shipped = set(zipfile.ZipFile(package).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in MODULES.values()}
    assert not {m for m in modules if not m.startswith("benchmarks/")} - shipped
    ignored = subprocess.run(
        ["git", "check-ignore", *sorted(modules)], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert ignored == []
