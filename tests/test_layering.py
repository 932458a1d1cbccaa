"""The layering rule (docs/architecture.md, "Layers"): slmops.shared imports neither slmops.edge nor
slmops.cloud; edge and cloud never import each other; edge imports no cloud-only heavy package;
no package has an import cycle between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"scipy", "onnx", "yaml", "rich", "torch", "transformers"}
FORBIDDEN = {
    "shared": {"slmops.edge", "slmops.cloud", "slmops.cli", "slmops.bench", "slmops.demo"} | HEAVY,
    "edge": {"slmops.cloud", "slmops.cli", "slmops.bench", "slmops.demo"} | HEAVY,
    "cloud": {"slmops.edge", "slmops.cli", "slmops.bench", "slmops.demo"},
}
# The old top-level names must never come back: they collide with PyPI packages (docs/decisions/0001).
OLD_ROOTS = {"shared", "edge", "cloud"}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports are resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("").parts
    here = ["slmops", *rel] if rel[0] in OLD_ROOTS else list(rel)
    package = here if here[-1] == "__init__" else here[:-1]
    if package and package[-1] == "__init__":
        package = package[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                names.add(node.module)
    return names


def violations(names: set[str], forbidden: set[str]) -> list[str]:
    return sorted(
        n
        for n in names
        if n.split(".")[0] in OLD_ROOTS or any(n == f or n.startswith(f + ".") for f in forbidden)
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_the_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = {str(f.relative_to(ROOT)): violations(imported_modules(f), FORBIDDEN[package]) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}


def test_nothing_imports_the_old_top_level_names() -> None:
    files = [
        p
        for d in ("slmops", "tests", "deploy")
        for p in (ROOT / d).rglob("*.py")
        if not any(part in OLD_ROOTS for part in p.relative_to(ROOT).parts[1:2])
    ]
    bad = {
        str(f.relative_to(ROOT)): sorted(n for n in imported_modules(f) if n.split(".")[0] in OLD_ROOTS)
        for f in files
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """Guard against a checker that can never fail."""
    f = ROOT / "edge" / "_layering_probe.py"
    f.write_text("import slmops.cloud.ingest\nfrom slmops.edge import node\nfrom . import window\n")
    try:
        names = imported_modules(f)
    finally:
        f.unlink()
    assert names == {"slmops.cloud.ingest", "slmops.edge"}
    assert violations(names, FORBIDDEN["edge"]) == ["slmops.cloud.ingest"]


#: Configuration types (what a file or flag sets) are named like this ...
CONFIG_SUFFIXES = ("Config", "Settings", "Limits", "Timings")
#: ... and live in a package's ``config`` module (issue 16 §4), not beside what they configure
#: in persistence or service modules. The factory's build hyperparameters (``TrainConfig``,
#: the encoder's ``BertConfig``) are arguments of one build step, not service configuration.
CONFIG_ELSEWHERE_OK = {"cloud/factory/build.py", "cloud/factory/encoder.py", "shared/config.py"}


def test_config_types_live_in_config_modules() -> None:
    found = {
        f"{path.relative_to(ROOT)}:{node.name}"
        for package in FORBIDDEN
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "config.py" and path.relative_to(ROOT).as_posix() not in CONFIG_ELSEWHERE_OK
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name.endswith(CONFIG_SUFFIXES)
    }
    assert found == set()
