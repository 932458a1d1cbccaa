"""The contract's vocabulary: StrEnum members are the plain wire strings (fields stay ``str``),
the retryable set, the one DP sensitivity both sides use, and statistics() snapshots that
cannot be changed by their reader."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import msgspec
import pytest

from slmops.cloud.drift.signals import DP_SENSITIVITY as CLOUD_SENSITIVITY
from slmops.cloud.drift.signals import SIGNALS
from slmops.edge.privacy import SENSITIVITY as EDGE_SENSITIVITY
from slmops.edge.refresh import RETRYABLE
from slmops.shared.connect import LinkState, LinkStatistics
from slmops.shared.messages import NodeStatus, RefreshResult
from slmops.shared.vocabulary import (
    DP_SENSITIVITY,
    RETRYABLE_CODES,
    BundleCode,
    DriftKind,
    DriftReference,
    DriftSignal,
    NodeEvent,
    RolloutEventState,
    RolloutStatus,
)


def test_members_are_the_wire_strings_and_fields_stay_str() -> None:
    status = NodeStatus(fleet="f", node="n", time=datetime(2026, 1, 1, tzinfo=UTC))
    raw = msgspec.json.encode(msgspec.structs.replace(status, event=NodeEvent.ROLLBACK))
    assert b'"event":"rollback"' in raw
    assert msgspec.structs.fields(NodeStatus)  # still a plain Struct
    assert {f.name: f.type for f in msgspec.structs.fields(RefreshResult)}["code"] is str
    assert BundleCode.DOWNLOAD_FAILED == "download_failed"
    assert "download_failed" in RETRYABLE_CODES
    assert RETRYABLE is RETRYABLE_CODES
    assert BundleCode("bad_signature") is BundleCode.BAD_SIGNATURE
    assert tuple(DriftSignal) == SIGNALS


def test_edge_and_cloud_use_the_one_dp_sensitivity() -> None:
    assert EDGE_SENSITIVITY == CLOUD_SENSITIVITY == DP_SENSITIVITY == 5


def test_statistics_snapshots_are_frozen() -> None:
    stats = LinkStatistics(LinkState.OFFLINE, 0.0, 1, 0, 0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.attempts = 2  # type: ignore[misc]


# -- every call site names the word through its StrEnum ------------------------------------

ROOT = Path(__file__).resolve().parent.parent
#: Field name → the words of its StrEnum: a bare string literal in that field's position
#: (``code="invalid"``, ``state.status == "paused"``, ``BundleError(where, why, "invalid")``)
#: is a word the vocabulary should name.
VOCABULARY: dict[str, type[StrEnum]] = {
    "code": BundleCode,
    "event": NodeEvent,
    "status": RolloutStatus,
    "state": RolloutEventState,
    "signal": DriftSignal,
    "reference": DriftReference,
    "kind": DriftKind,
}


def bare_words(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line: field='word'`` for each vocabulary word spelled as a string literal in a
    keyword argument or comparison on a field of that name, or as ``BundleError``'s code."""
    found: list[str] = []

    def check(node: ast.AST, field: str) -> None:
        words = {m.value for m in VOCABULARY[field]} if field in VOCABULARY else set()
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {field}={node.value!r}")
        elif isinstance(node, ast.Tuple | ast.Set | ast.List):
            for element in node.elts:
                check(element, field)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg:
            check(node.value, node.arg)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for side in sides:
                field = side.attr if isinstance(side, ast.Attribute) else getattr(side, "id", None)
                for other in sides if field else ():
                    check(other, field)
        elif isinstance(node, ast.Call) and len(node.args) >= 3:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name == "BundleError":
                check(node.args[2], "code")
    return found


def product_files() -> list[Path]:
    files = [p for top in ("shared", "edge", "cloud") for p in sorted((ROOT / top).rglob("*.py"))]
    files += sorted((ROOT / "slmops").glob("*.py"))
    return [f for f in files if f != ROOT / "shared" / "vocabulary.py"]


def test_call_sites_name_vocabulary_words_through_their_enum() -> None:
    assert [w for f in product_files() for w in bare_words(f)] == []


def test_the_vocabulary_checker_sees_a_bare_word(tmp_path: Path) -> None:
    probe = ROOT / "cloud" / "_vocabulary_probe.py"
    probe.write_text(
        'raise BundleError("b", "why", "download_failed")\n'
        'if state.status == "paused" or e.kind in ("skew", "other"):\n    pass\n'
        'f(signal="class_prior", code=BundleCode.INVALID, name="paused")\n'
    )
    try:
        found = bare_words(probe)
    finally:
        probe.unlink()
    assert [w.split(": ")[1] for w in found] == [
        "code='download_failed'",
        "status='paused'",
        "kind='skew'",
        "signal='class_prior'",
    ]


def _statistics_types() -> dict[str, type]:
    """``module:Class`` → the class each ``def statistics(self) -> Class`` in the product
    returns (Protocols describing someone else's ``statistics()`` are left out)."""
    found: dict[str, type] = {}
    for path in product_files():
        tree = ast.parse(path.read_text())
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if any(getattr(b, "id", None) == "Protocol" for b in cls.bases):
                continue
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "statistics" and fn.returns is not None:
                    rel = path.relative_to(ROOT).with_suffix("")
                    parts = rel.parts if rel.parts[0] == "slmops" else ("slmops", *rel.parts)
                    module = ".".join(parts)
                    name = ast.unparse(fn.returns)
                    found[f"{module}:{name}"] = getattr(importlib.import_module(module), name)
    return found


def test_every_statistics_returns_a_frozen_snapshot() -> None:
    types = _statistics_types()
    assert len(types) >= 9, sorted(types)

    def frozen(t: type) -> bool:
        if dataclasses.is_dataclass(t):
            return bool(t.__dataclass_params__.frozen)  # type: ignore[attr-defined]
        return issubclass(t, msgspec.Struct) and bool(t.__struct_config__.frozen)

    assert sorted(k for k, t in types.items() if not frozen(t)) == []
