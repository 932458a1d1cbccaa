"""A field renamed in code for its unit (``_s``, issue 16 §5) keeps the name it is stored and
sent under: state written before the rename reads back the same, and is written the same."""

from __future__ import annotations

import msgspec

from slmops.cloud.ingest.state import NodeState


def test_node_state_clock_skew_keeps_its_stored_name() -> None:
    old = b'{"fleet":"f","node":"n","clock_skew":-12.5}'
    state = msgspec.json.decode(old, type=NodeState)
    assert state.clock_skew_s == -12.5
    raw = msgspec.json.encode(state)
    assert b'"clock_skew":-12.5' in raw
    assert b"clock_skew_s" not in raw
