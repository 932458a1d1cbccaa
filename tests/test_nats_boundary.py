"""One NATS boundary (docs/decisions/0005): no module outside ``shared/jetstream.py`` catches an
exception class from nats-py; callers catch the project's tree (``slmops.shared.errors``).

The check is an AST walk, not a grep: it resolves what each module bound nats-py's modules and
classes to (``import nats.errors``, ``from nats.js import errors as js_errors``,
``from nats.errors import TimeoutError as X``) and flags an ``except`` whose type names one of
them. Run as a script to list the handlers of another tree (the issue-16 before/after counts):
``python tests/test_nats_boundary.py [ROOT]``.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The product's source: the three packages and the command layer (tests may catch anything).
SOURCES = ("shared", "edge", "cloud", "slmops")
#: The one module allowed to name nats-py's exception classes.
BOUNDARY = {"shared/jetstream.py"}


def _nats_bindings(tree: ast.AST) -> dict[str, str]:
    """Local names bound to nats-py modules or to names imported from them → dotted name."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "nats" or alias.name.startswith("nats."):
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and (node.module == "nats" or node.module.startswith("nats."))
        ):
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _dotted(expr: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return [expr.id, *reversed(parts)]


def _is_nats_exception(qualified: str) -> bool:
    """Whether the dotted name is an exception class of nats-py (imported to be sure)."""
    module, _, attr = qualified.rpartition(".")
    while module:
        try:
            obj: object = importlib.import_module(module)
        except ImportError:
            module, _, head = module.rpartition(".")
            attr = f"{head}.{attr}"
            continue
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        return isinstance(obj, type) and issubclass(obj, BaseException)
    return False


def _refs(tree: ast.AST) -> list[ast.expr]:
    bound = _nats_bindings(tree)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    refs: list[ast.expr] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute | ast.Name) or id(node) in inner:
            continue
        parts = _dotted(node)
        if parts is None or parts[0] not in bound:
            continue
        if _is_nats_exception(".".join([bound[parts[0]], *parts[1:]])):
            refs.append(node)
    return refs


def nats_exception_refs(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line: name`` of every reference to a nats-py exception class in ``path``: in an
    ``except``, a ``contextlib.suppress``, an ``isinstance``, a tuple kept for later."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(root)
    return sorted(f"{rel}:{n.lineno}: {ast.unparse(n)}" for n in _refs(tree))


def nats_handlers(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line: except <types>`` for each handler in ``path`` whose types name a nats-py
    exception class, directly or through a module-level tuple (``_NATS_ERRORS = (...)``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    refs = {id(n) for n in _refs(tree)}
    aliases = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign) and any(id(n) in refs for n in ast.walk(node.value))
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ExceptHandler) or node.type is None:
            continue
        if any(id(n) in refs or (isinstance(n, ast.Name) and n.id in aliases) for n in ast.walk(node.type)):
            found.append(f"{path.relative_to(root)}:{node.lineno}: except {ast.unparse(node.type)}")
    return found


def source_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for top in SOURCES:
        base = root / top
        if top == "slmops":  # the command layer; slmops/{shared,edge,cloud} are links to the above
            files += sorted(p for p in base.glob("*.py"))
        else:
            files += sorted(base.rglob("*.py"))
    return files


def outside_boundary(root: Path = ROOT) -> list[Path]:
    return [f for f in source_files(root) if f.relative_to(root).as_posix() not in BOUNDARY]


def test_no_module_outside_the_boundary_names_a_nats_error() -> None:
    """No ``except``, ``suppress`` or ``isinstance`` outside the boundary names nats-py's
    exception classes (a handler through a kept tuple is found via the tuple's definition)."""
    assert [r for f in outside_boundary() for r in nats_exception_refs(f)] == []


def test_the_boundary_itself_is_seen() -> None:
    """Guard against a checker that can never fail: the boundary does name nats-py classes."""
    path = ROOT / "shared" / "jetstream.py"
    assert len(nats_handlers(path)) >= 4
    assert len(nats_exception_refs(path)) >= 6


def test_the_checker_resolves_every_import_form(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import contextlib\n"
        "import nats.errors\n"
        "from nats.js import errors as js_errors\n"
        "from nats.errors import TimeoutError as NatsTimeout\n"
        "from nats.js import api as js_api\n"
        "from slmops.shared.errors import NatsUnavailable\n"
        "_KEPT = (nats.errors.NoServersError, OSError)\n"
        "try:\n    pass\nexcept nats.errors.Error:\n    pass\n"
        "try:\n    pass\nexcept (OSError, js_errors.NotFoundError):\n    pass\n"
        "try:\n    pass\nexcept NatsTimeout:\n    pass\n"
        "try:\n    pass\nexcept _KEPT:\n    pass\n"
        "try:\n    pass\nexcept (NatsUnavailable, TimeoutError):\n    pass\n"
        "with contextlib.suppress(js_errors.APIError):\n    x = js_api.StorageType.FILE\n"
    )
    handlers = [h.split(": ", 1)[1] for h in nats_handlers(probe, tmp_path)]
    assert handlers == [
        "except nats.errors.Error",
        "except (OSError, js_errors.NotFoundError)",
        "except NatsTimeout",
        "except _KEPT",
    ]
    refs = [r.split(": ", 1)[1] for r in nats_exception_refs(probe, tmp_path)]
    assert sorted(refs) == sorted(
        [
            "nats.errors.NoServersError",
            "nats.errors.Error",
            "js_errors.NotFoundError",
            "NatsTimeout",
            "js_errors.APIError",
        ]
    )


if __name__ == "__main__":
    tree = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    files = outside_boundary(tree)
    handlers = [h for f in files for h in nats_handlers(f, tree)]
    refs = [r for f in files for r in nats_exception_refs(f, tree)]
    print("\n".join(handlers))
    print(
        f"outside {', '.join(sorted(BOUNDARY))}: {len(handlers)} except clauses naming nats-py "
        f"exceptions in {len({h.split(':')[0] for h in handlers})} files; {len(refs)} references "
        f"to nats-py exception classes in {len({r.split(':')[0] for r in refs})} files"
    )
