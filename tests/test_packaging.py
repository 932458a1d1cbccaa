"""The distribution: the wheel holds one top-level package, ``slmops`` (the repository's
``shared/``, ``edge/``, ``cloud/`` folders are inside it through the links of
docs/decisions/0001), and no package has an import cycle between its modules.

The cycle check is our own, on ``ast`` and Tarjan's strongly connected components over
module-level imports, those under ``if TYPE_CHECKING:`` included (a type-only import is still
a dependency of the design: the edge's old circle ran through them); imports inside functions
are deliberately lazy and left out: ~60 lines beat a dependency (pydeps/import-linter need
graphviz or a config language for this one rule)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"slmops.shared": ROOT / "shared", "slmops.edge": ROOT / "edge", "slmops.cloud": ROOT / "cloud"}
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "tests"
)


def test_the_wheel_holds_only_the_slmops_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_SKIP)
    out = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=110,
    )
    (wheel,) = out.glob("slmops-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"slmops"}
    for module in ("slmops/shared/names.py", "slmops/edge/node.py", "slmops/cloud/service.py"):
        assert module in names  # the linked folders are in, as files
    for profile in ("till", "tablet", "gateway"):  # `models test` reads them from any directory
        assert f"slmops/shared/device_profiles/{profile}.toml" in names


def _module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            rel = path.relative_to(folder).with_suffix("").parts
            parts = [*package.split("."), *rel]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    rel = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def module_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports when it is imported (module level only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):  # ``if TYPE_CHECKING:`` included: a design dependency
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                    visit(block)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                # ``from pkg import mod`` imports the module; ``from mod import name`` the module
                subs = {f"{base}.{alias.name}" for alias in node.names} & known
                found.update(subs or {base})

    visit(tree.body)
    out = set()
    for name in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module (each a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def import_graph() -> dict[str, set[str]]:
    files = [p for folder in (*PACKAGES.values(), ROOT / "slmops") for p in folder.rglob("*.py")]
    files = [p for p in files if not p.is_relative_to(ROOT / "slmops" / "shared")]  # links, seen above
    files = [p for p in files if not any(p.is_relative_to(ROOT / "slmops" / x) for x in ("edge", "cloud"))]
    # Package __init__ modules are left out: they re-export their package's public names
    # (docs/architecture.md §10), so they import their own modules by design; a cycle among the modules
    # themselves is what makes a package hard to read and to load.
    modules = {_module_name(p): p for p in files if p.name != "__init__.py"}
    known = set(modules)
    return {m: module_imports(p, m, known) for m, p in modules.items()}


def test_no_package_has_an_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 80
    assert strongly_connected(graph) == []


def test_the_cycle_checker_finds_a_cycle() -> None:
    """Guard against a checker that can never fail: a known cycle, and the real graph with
    one edge added back the way the edge used to be wired (node -> safety -> node)."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "slmops.edge.safety" in graph["slmops.edge.node"]
    graph["slmops.edge.safety"].add("slmops.edge.node")
    assert ["slmops.edge.node", "slmops.edge.safety"] in strongly_connected(graph)
