"""The house rules, checked: every module of the package imports, ARCHITECTURE.md names every
module and folder, imports go the way the contracts in pyproject.toml say and never round in
a cycle, and runtime files and functions stay small enough to read."""

import ast
import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# the folders linked into fleetwise/
PARTS = ["worker", "router", "controllers", "operator", "telemetry", "sim", "bench", "testenv", "admin"]
DEV_PACKAGES = {"fleetwise.bench", "fleetwise.testenv"}  # development only: not in the wheel
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_FILE_REASON = "Why this file is long:"


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name, with its path in the repository (a part's
    modules by their path in the part's own folder, not through its link)."""
    found = {}
    for path in sorted((ROOT / "fleetwise").glob("*.py")):
        found["fleetwise" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    for part in PARTS:
        for path in sorted((ROOT / part).rglob("*.py")):
            rel = path.relative_to(ROOT / part).with_suffix("")
            found[".".join(["fleetwise", part, *(p for p in rel.parts if p != "__init__")])] = path
    return found


MODULES = _modules()


def _runtime(name: str) -> bool:
    return not any(name == p or name.startswith(p + ".") for p in DEV_PACKAGES)


def test_every_runtime_subpackage_and_no_development_one_is_declared_for_the_wheel():
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    runtime = {name for name in packages if _runtime(name)}
    assert runtime - declared == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert declared - runtime == set(), "declared, but development-only or without an __init__.py"


def test_the_wheel_ships_the_runtime_and_not_the_development_parts(tmp_path):
    """What a worker image installs: every runtime module, no benchmark or test control plane."""
    # from a clean copy: setuptools reuses whatever an earlier build left in build/
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".testenv", ".venv", ".fleetwise", "build", "*.egg-info", "__pycache__", "results", "data"))
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_wheel(sys.argv[1]))", str(tmp_path)],
                           cwd=source, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / build.stdout.split()[-1]) as wheel:
        shipped = {n for n in wheel.namelist() if n.endswith(".py")}
    expected = {name.replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
                for name, path in MODULES.items() if _runtime(name)}
    assert expected - shipped == set(), "runtime modules missing from the wheel"
    assert not [n for n in shipped if n.startswith(("fleetwise/bench/", "fleetwise/testenv/"))]


def test_every_part_is_linked_into_the_package():
    """fleetwise/<part> -> ../<part>: the package's real shape on disk (pyproject.toml says why)."""
    for part in PARTS:
        link = ROOT / "fleetwise" / part
        assert link.is_symlink() and link.resolve() == (ROOT / part).resolve(), f"fleetwise/{part} -> ../{part}"
    links = {p.name for p in (ROOT / "fleetwise").iterdir() if p.is_symlink()}
    assert links == set(PARTS), "a linked part this test does not know: add it to PARTS"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.endswith(".__main__")))  # that one runs the CLI
def test_module_imports(name):
    importlib.import_module(name)


def test_architecture_names_every_module_and_folder():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    unnamed = [str(path.relative_to(ROOT)) for name, path in MODULES.items()
               if _runtime(name) and path.name != "__init__.py" and f"`{path.relative_to(ROOT)}`" not in text]
    assert not unnamed, f"ARCHITECTURE.md does not name these modules (as `path`): {unnamed}"
    folders = _top_level_folders()
    unnamed = sorted(f for f in folders if f"`{f}/`" not in text)
    assert not unnamed, f"ARCHITECTURE.md does not name these top-level folders (as `folder/`): {unnamed}"


def _top_level_folders() -> set[str]:
    """The repository's folders: what git tracks, or in a copy without git, what is there
    less what git ignores."""
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout:
        return {line.split("/")[0] for line in r.stdout.splitlines() if "/" in line and not line.startswith(".")}
    ignored = {"build", "dist", "__pycache__"}
    return {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.name not in ignored and not p.name.endswith(".egg-info")}


def test_import_contracts_hold():
    """The contracts in pyproject.toml ([tool.importlinter]): which part may import which.
    import-linter prints the broken ones."""
    from importlinter.cli import lint_imports
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_import_cycles():
    """No module reaches itself through imports, type-checking-only imports included."""
    import grimp
    graph = grimp.build_graph("fleetwise")
    cycles = _cycles({m: graph.find_modules_directly_imported_by(m) for m in graph.modules})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _runtime_sources() -> list[Path]:
    return [p for name, p in MODULES.items() if _runtime(name)]


def test_runtime_files_are_short_or_say_why():
    long = []
    for path in _runtime_sources():
        lines = path.read_text().count("\n")
        if lines > MAX_FILE_LINES and LONG_FILE_REASON not in (ast.get_docstring(ast.parse(path.read_text())) or ""):
            long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not long, f"over {MAX_FILE_LINES} lines without '{LONG_FILE_REASON}' in the docstring: {long}"


def test_runtime_functions_are_short():
    long = []
    for path in _runtime_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
