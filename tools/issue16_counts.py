"""The before/after figures of issue 16, measured on any checkout of this repository.

    python tools/issue16_counts.py ROOT            # e.g. a worktree of 06cfd20, then the repo itself

Each figure is one function below; the docstring says exactly what it counts. Everything is read
with ``ast`` or plain text from ROOT (nothing of ROOT is imported), so an old tree whose modules
import as ``shared``/``edge``/``cloud`` is read the same as today's ``slmops.*``. The import-cycle
and vocabulary checks are the suite's own (``tests/test_packaging.py``, ``tests/test_vocabulary.py``;
the word lists are this checkout's enums: the old tree had none). The nats-py figures are
``tests/test_nats_boundary.py``'s (run it with ROOT as argument).
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_packaging import module_imports, strongly_connected  # the suite's own checkers
from test_vocabulary import bare_words

PACKAGES = ("shared", "edge", "cloud")


def product_files(root: Path) -> Iterator[Path]:
    """The product's source: shared/, edge/, cloud/ (recursively) and slmops/*.py."""
    for top in PACKAGES:
        yield from sorted((root / top).rglob("*.py"))
    yield from sorted((root / "slmops").glob("*.py"))


def rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


def parse(p: Path) -> ast.Module:
    return ast.parse(p.read_text(), filename=str(p))


# -- §1 ---------------------------------------------------------------------------------------


def old_top_level_imports(root: Path) -> int:
    """Import statements (anywhere, tests and deploy included) naming top-level ``shared``,
    ``edge`` or ``cloud`` instead of ``slmops.*``."""
    n = 0
    for p in [*product_files(root), *sorted((root / "tests").rglob("*.py"))]:
        for node in ast.walk(parse(p)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            n += sum(name.split(".")[0] in PACKAGES for name in names)
    return n


# -- §2 ---------------------------------------------------------------------------------------


def kv_create_sites(root: Path) -> list[str]:
    """Modules that create a KV bucket themselves (a get-or-create copy): they call nats-py's
    ``create_key_value``, or ``add_stream`` with a ``KV_`` stream config."""
    out = []
    for p in product_files(root):
        text = p.read_text()
        if "create_key_value(" in text or ("add_stream(" in text and re.search(r"f?[\"']KV_", text)):
            out.append(rel(root, p))
    return out


def name_literals_outside_names(root: Path) -> list[str]:
    """String literals that spell a NATS resource outside ``shared/names.py``: a bucket or
    consumer (``slmops_…``, not a Prometheus metric ``slmops_edge_…``/``slmops_cloud_…``), a
    stream (``SLMOPS_<TELEMETRY|STATUS|…>``, not an environment variable) or a subject or
    filter of a family (``slmops.telemetry…``, ``slmops.cloud.baseline``…); whole constants
    only, docstrings left out."""
    streams = "TELEMETRY|DRIFT|STATUS|ROLLOUT|DEADLETTER|EVENTS"
    families = "telemetry|status|drift|rollout|events|deadletter|cloud\\.baseline"
    pat = re.compile(
        rf"^((?!slmops_(edge|cloud)_)slmops_[a-z_]+|SLMOPS_({streams})|slmops\.({families})(\..*)?)$"
    )
    out = []
    for p in product_files(root):
        if rel(root, p) == "shared/names.py":
            continue
        tree = parse(p)
        docs = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Constant)
                and isinstance(n.value, str)
                and id(n) not in docs
                and pat.match(n.value)
            ):
                out.append(f"{rel(root, p)}:{n.lineno}: {n.value!r}")
    return out


def hand_written_backoffs(root: Path) -> list[str]:
    """Lines that grow a delay exponentially by hand (``* 2`` or ``2 **`` on a name with
    delay/backoff/wait in it) outside ``shared/backoff.py``."""
    pat = re.compile(
        r"(delay|backoff|wait)\w*\s*(=|\*=)\s*.*(\*\s*2\b|2\s*\*\*)|(delay|backoff|wait)\w*\s*\*=\s*2\b"
    )
    return [
        f"{rel(root, p)}:{i}"
        for p in product_files(root)
        if rel(root, p) != "shared/backoff.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pat.search(line)
    ]


# -- §3 / §4: the import graph ----------------------------------------------------------------


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → modules of the product it imports at module level, by the suite's own reader
    (``tests/test_packaging.module_imports``; ``__init__`` left out as there). Names lose the
    ``slmops.`` prefix of today's tree, so both trees compare."""
    prefix = "slmops." if (root / "slmops" / "shared").exists() else ""
    files = [p for p in product_files(root) if p.name != "__init__.py"]

    def name(p: Path) -> str:
        parts = p.relative_to(root).with_suffix("").parts
        return (prefix if parts[0] in PACKAGES else "") + ".".join(parts)

    known = {name(p) for p in files}

    def bare(m: str) -> str:
        return m.removeprefix(prefix) if prefix and m.split(".")[1] in PACKAGES else m

    return {bare(name(p)): {bare(m) for m in module_imports(p, name(p), known)} for p in files}


def floors(graph: dict[str, set[str]], prefix: str) -> int:
    """The longest import chain among modules under ``prefix`` (number of modules on it),
    cycles collapsed (a module already on the path is not revisited)."""
    sub = {m: {d for d in ds if d.startswith(prefix)} for m, ds in graph.items() if m.startswith(prefix)}
    memo: dict[str, int] = {}

    def depth(m: str, path: frozenset[str]) -> int:
        if m in memo:
            return memo[m]
        d = 1 + max((depth(x, path | {m}) for x in sub[m] if x not in path), default=0)
        memo[m] = d
        return d

    return max((depth(m, frozenset()) for m in sub), default=0)


def loose_cloud_modules(root: Path) -> int:
    """``.py`` modules directly in ``cloud/`` (``__init__`` not counted)."""
    return len([p for p in (root / "cloud").glob("*.py") if p.name != "__init__.py"])


# -- §5 ---------------------------------------------------------------------------------------


def bare_vocabulary_words(root: Path) -> list[str]:
    """Vocabulary words spelled as string literals where the word is a field's value
    (``tests/test_vocabulary.py``'s rule, with this checkout's word lists), outside
    ``shared/vocabulary.py``."""
    return [
        w for p in product_files(root) if rel(root, p) != "shared/vocabulary.py" for w in bare_words(p, root)
    ]


def sensitivity_restated(root: Path) -> list[str]:
    """Places that write the DP sensitivity as a number: an assignment to a name with
    SENSITIVITY in it, or a ``sensitivity`` field default, whose value is a literal number."""
    out = []
    for p in product_files(root):
        for n in ast.walk(parse(p)):
            if isinstance(n, ast.Assign | ast.AnnAssign):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                value = n.value.value if isinstance(n.value, ast.Constant) else None
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if number and any("sensitivity" in x.lower() for x in names):
                    out.append(f"{rel(root, p)}:{n.lineno}: {names[0]} = {value}")
    return out


TIME_WORDS = re.compile(
    r"(timeout|interval|wait|ttl|delay|cooldown|_age$|^age$|period|soak_s|skew|(^|_)stall|duration)"
)


def unsuffixed_time_fields(root: Path) -> list[str]:
    """Class-level fields typed float/int whose name says a duration but has no ``_s``/``_ms``
    suffix, outside the wire (``shared/messages.py``) and the config types (``*/config.py``,
    whose keys are the flag names)."""
    out = []
    for p in product_files(root):
        r = rel(root, p)
        if r == "shared/messages.py" or r.endswith("config.py"):
            continue
        for cls in (n for n in ast.walk(parse(p)) if isinstance(n, ast.ClassDef)):
            for st in cls.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                    name, ann = st.target.id, ast.unparse(st.annotation)
                    if (
                        TIME_WORDS.search(name)
                        and not name.endswith(("_s", "_ms", "_started", "_at"))  # a unit, or a time
                        and re.search(r"\b(float|int)\b", ann)
                    ):
                        out.append(f"{r}:{st.lineno}: {cls.name}.{name}")
    return out


def mutable_statistics(root: Path) -> list[str]:
    """``def statistics(self) -> X`` (outside Protocols) whose ``X`` is defined in the product as
    neither ``@dataclass(frozen=True)`` nor a ``msgspec.Struct`` with ``frozen=True``."""
    classes: dict[str, ast.ClassDef] = {}
    returns: list[tuple[str, str]] = []
    for p in product_files(root):
        for cls in (n for n in ast.walk(parse(p)) if isinstance(n, ast.ClassDef)):
            classes[cls.name] = cls
            if any(getattr(b, "id", None) == "Protocol" for b in cls.bases):
                continue
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "statistics" and fn.returns is not None:
                    returns.append((f"{rel(root, p)}:{cls.name}", ast.unparse(fn.returns)))

    def frozen(c: ast.ClassDef) -> bool:
        deco = any("frozen=True" in ast.unparse(d) for d in c.decorator_list)
        struct = any(k.arg == "frozen" and ast.unparse(k.value) == "True" for k in c.keywords)
        return deco or struct

    return [f"{where} -> {ret}" for where, ret in returns if ret in classes and not frozen(classes[ret])]


# -- §6 / §7 ----------------------------------------------------------------------------------


def grep(root: Path, pattern: str, files: list[Path] | None = None) -> list[str]:
    pat = re.compile(pattern)
    return [
        f"{rel(root, p)}:{i}"
        for p in (files if files is not None else list(product_files(root)))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pat.search(line)
    ]


def relative_imports(root: Path, top: str) -> int:
    return sum(
        isinstance(n, ast.ImportFrom) and n.level > 0
        for p in sorted((root / top).rglob("*.py"))
        for n in ast.walk(parse(p))
    )


def asserts(root: Path) -> list[str]:
    """``assert`` statements in the product (tests excluded)."""
    return [
        f"{rel(root, p)}:{n.lineno}"
        for p in product_files(root)
        for n in ast.walk(parse(p))
        if isinstance(n, ast.Assert)
    ]


def main(root: Path) -> None:
    graph = import_graph(root)
    edge_cycles = [c for c in strongly_connected(graph) if c[0].startswith("edge.")]
    rows = {
        "§1 imports of top-level shared/edge/cloud": old_top_level_imports(root),
        "§2 modules creating a KV bucket (get-or-create copies)": kv_create_sites(root),
        "§2 bucket/stream/subject literals outside shared/names.py": name_literals_outside_names(root),
        "§2 hand-written exponential backoffs": hand_written_backoffs(root),
        "§2 edge/_fetch.py exists": (root / "edge" / "_fetch.py").exists(),
        "§2 modules using shared/objects.py": grep(root, r"shared\.objects import"),
        "§3 import cycles among edge modules": edge_cycles,
        "§3 import cycles in any package": strongly_connected(graph),
        "§3 for_node factories": grep(root, r"def for_node\b"),
        "§3 tests overwriting node.safety.limits": grep(
            root, r"safety\.limits\s*=", sorted((root / "tests").rglob("*.py"))
        ),
        "§3 api.py setting node.http_port": grep(root, r"node\.http_port\s*="),
        "§4 loose modules in cloud/": loose_cloud_modules(root),
        "§4 longest import chain in cloud (modules)": floors(graph, "cloud."),
        "§4 --nats option definitions in the CLI": grep(
            root, r"^\s*[\"']--nats[\"'],|option\(\s*[\"']--nats[\"']", sorted((root / "slmops").glob("*.py"))
        ),
        "§4 config classes outside config modules": [
            f"{rel(root, p)}:{c.name}"
            for p in product_files(root)
            if p.name != "config.py"
            and rel(root, p) not in {"cloud/factory/build.py", "cloud/factory/encoder.py", "cloud/factory.py"}
            for c in ast.walk(parse(p))
            if isinstance(c, ast.ClassDef) and c.name.endswith(("Config", "Settings", "Limits", "Timings"))
        ],
        "§5 bundle verification implementations": grep(
            root, r"def (verify_bundle|_verify)\b|def verify\(self, bundle"
        ),
        "§5 vocabulary words as bare strings at call sites": bare_vocabulary_words(root),
        "§5 DP sensitivity written as a number": sensitivity_restated(root),
        "§5 time fields without _s/_ms (code, not wire or config)": unsuffixed_time_fields(root),
        "§5 statistics() returning a mutable type": mutable_statistics(root),
        "§6 source files citing DESIGN §n or STYLE n": sorted(
            {r.split(":")[0] for r in grep(root, r"DESIGN §|STYLE \d|STYLE\.md \d")}
        ),
        "§6 docs/decisions records": len(list((root / "docs" / "decisions").glob("*.md")))
        if (root / "docs" / "decisions").exists()
        else 0,
        "§7 relative imports in cloud/": relative_imports(root, "cloud"),
        "§7 aiohttp private attributes in edge/api.py": grep(
            root, r"_client_max_size|site\._server|\._runner\b", [root / "edge" / "api.py"]
        ),
        "§7 asserts in the product": asserts(root),
    }
    for key, value in rows.items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
