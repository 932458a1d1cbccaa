"""The layering rule (DESIGN §1): shared imports neither edge nor cloud; edge and cloud never
import each other; edge imports no cloud-only heavy package at module level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "shared": {"edge", "cloud", "slmops", "scipy", "onnx", "yaml", "rich"},
    "edge": {"cloud", "slmops", "scipy", "onnx", "yaml", "rich"},
    "cloud": {"edge", "slmops"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_the_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package])
        for f in files
        if imported_roots(f) & FORBIDDEN[package]
    }
    assert bad == {}


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """Guard against a checker that can never fail."""
    f = tmp_path / "x.py"
    f.write_text("import cloud.ingest\nfrom edge import node\n")
    assert imported_roots(f) == {"cloud", "edge"}
