"""The contract's vocabulary: StrEnum members are the plain wire strings (fields stay ``str``),
the retryable set, the one DP sensitivity both sides use, and statistics() snapshots that
cannot be changed by their reader."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

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
    DriftSignal,
    NodeEvent,
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
