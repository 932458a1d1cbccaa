"""Pushed fleet configuration on a real edge node against a real nats-server (issue 17):
applied at run time, refused with its reason, rolled back on the node when it breaks the
link, pinned keys and privacy floors kept, the DP budget kept across a reinstall."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from _edge_util import Keys, edge_config
from _fleetcfg import WAIT, Env, put_raw, signed
from _nats import free_port, wait_until
from slmops.edge.config import EdgeConfig
from slmops.edge.fleetconfig import resolve
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import TrustStore
from slmops.shared.fleetconfig import PUSHABLE, ConfigRejected, verify_config

pytestmark = pytest.mark.anyio


def test_resolve_keeps_pins_and_privacy_floors_and_refuses_unknown_keys(tmp_path: Path, keys: Keys) -> None:
    local = edge_config(
        tmp_path,
        keys,
        fleet="f",
        pin=["window", "safety.max_error_rate"],
        min_count=5,
        dp_epsilon=1.0,
        dp_budget=10.0,
    )
    r = resolve(
        local,
        {
            "window": "5s",
            "status_interval": "7s",
            "min_count": 2,
            "dp_epsilon": 4.0,
            "dp_budget": 100,
            "safety": {"max_error_rate": 0.5, "min_samples": 20},
        },
        schema=1,
    )
    assert r.config.window == local.window  # pinned
    assert r.config.status_interval == 7.0
    assert (r.config.min_count, r.config.dp_epsilon, r.config.dp_budget) == (5, 1.0, 10.0)
    assert r.config.safety.max_error_rate == local.safety.max_error_rate
    assert r.config.safety.min_samples == 20
    text = " | ".join(r.warnings)
    for name in (
        "window: pinned",
        "safety.max_error_rate: pinned",
        "min_count: 2",
        "dp_epsilon: 4.0",
        "dp_budget: 100",
    ):
        assert name in text
    # Turning DP off, or an unlimited budget, is loosening too.
    off = resolve(local, {"dp_epsilon": None, "dp_budget": None}, schema=1)
    assert (off.config.dp_epsilon, off.config.dp_budget) == (1.0, 10.0)
    # Tightening is taken.
    tight = resolve(local, {"min_count": 50, "dp_epsilon": 0.5, "dp_budget": 2.0}, schema=1)
    assert (tight.config.min_count, tight.config.dp_epsilon, tight.config.dp_budget) == (50, 0.5, 2.0)
    # Unknown keys: refused at this schema, skipped with a warning from a newer one.
    with pytest.raises(ConfigRejected, match="unknown keys \\['turbo'\\]"):
        resolve(local, {"turbo": True}, schema=1)
    newer = resolve(local, {"turbo": True, "safety": {"x": 1}, "status_interval": 9}, schema=2)
    assert newer.config.status_interval == 9
    assert any("turbo" in w for w in newer.warnings)
    assert any("safety.x" in w for w in newer.warnings)
    with pytest.raises(ConfigRejected, match="window must be a number in"):
        resolve(edge_config(tmp_path, keys, fleet="f"), {"window": 1e-9}, schema=1)


async def test_config_applied_at_run_time_and_reported(env: Env) -> None:
    async with env.node() as node:
        settings = {
            "window": "400ms",
            "min_count": 3,
            "status_interval": "7s",
            "outbox_max_bytes": "2MB",
            "safety": {"max_error_rate": 0.2},
            "refresh": {"poll_interval": "30s"},
            "log_level": "warning",
        }
        await env.put(1, settings)
        st = await env.wait_state("n1", 1, "applied")
        assert st.config_version == 1
        assert st.config_warnings == []
        assert (node.buffer.k, node.status.interval) == (3, 7.0)
        assert node.buffer.outbox_max_bytes == 2_000_000
        assert node.safety.limits.max_error_rate == 0.2
        # window: from the next boundary on (long passed after the probation)
        assert (node.windower.window, node.buffer.window, node.config.window) == (0.4, 0.4, 0.4)
        assert node.local_config.window == 0.2
        assert len(await node.predict(["hello there"])) == 1  # served throughout
        cfg = node.local_config
    # A restart starts with the last good pushed config, before it connects.
    async with EdgeNode(cfg.replace(nats_url="nats://127.0.0.1:1")) as again:
        assert (again.buffer.k, again.windower.window) == (3, 0.4)


async def test_rejected_config_is_reported_with_its_reason(env: Env) -> None:
    async with env.node() as node:
        # signed by a key the node does not trust
        await put_raw(env.js, env.fleet, signed(env.fleet, 1, {"min_count": 3}, Ed25519PrivateKey.generate()))
        await wait_until(
            lambda: any("not trusted" in (s.config_reason or "") for s in env.statuses.items),
            WAIT,
            what="untrusted config rejected",
        )
        # trusted, but a value the node refuses
        await env.put(2, {"status_interval": "-3s"})
        st = await env.wait_state("n1", 2, "rejected")
        assert "status_interval" in (st.config_reason or "")
        assert st.config_version is None  # nothing pushed is in effect
        assert (node.buffer.k, node.status.interval) == (node.local_config.min_count, 5.0)
        # unknown key at the node's own schema: refused; from a newer schema: warned and taken
        await env.put(3, {"min_count": 4, "turbo": 1})
        await env.wait_state("n1", 3, "rejected")
        await env.put(4, {"min_count": 4, "turbo": 1}, schema=2)
        st = await env.wait_state("n1", 4, "applied")
        assert any("turbo" in w for w in st.config_warnings)
        assert node.buffer.k == 4


async def test_config_that_cuts_the_node_off_nats_is_rolled_back_on_the_node(env: Env) -> None:
    async with env.node() as node:
        await env.put(1, {"min_count": 2})
        await env.wait_state("n1", 1, "applied")
        await env.put(2, {"nats_url": f"nats://127.0.0.1:{free_port()}", "min_count": 7})
        await wait_until(lambda: node.buffer.k == 7, WAIT, what="v2 taken")
        st = await env.wait_state("n1", 2, "rolled_back", WAIT * 2)
        assert "could not reach NATS" in (st.config_reason or "")
        assert st.config_version == 1
        assert node.buffer.k == 2
        assert node.link.state.value == "online"
        # The bad version is never taken again, even when it is read again.
        await anyio.sleep(1.0)
        assert node.fleetcfg.saved.highest == 2
        assert "2" in node.fleetcfg.saved.bad


async def test_pinned_key_and_privacy_floor_hold_on_a_running_node(env: Env) -> None:
    floors = {"min_count": 5, "dp_epsilon": 1.0, "dp_budget": 20.0}
    async with env.node(pin=["status_interval"], **floors) as node:
        await env.put(
            1, {"status_interval": "2s", "min_count": 1, "dp_epsilon": 8.0, "dp_budget": 1000, "window": "1s"}
        )
        st = await env.wait_state("n1", 1, "applied")
        assert node.status.interval == 5.0  # pinned
        assert (node.buffer.k, node.buffer.dp_epsilon, node.buffer.dp_budget) == (5, 1.0, 20.0)
        assert node.windower.window == 1.0  # not pinned, not a floor: taken
        joined = " | ".join(st.config_warnings)
        for part in ("status_interval: pinned", "min_count: 1", "dp_epsilon: 8.0", "dp_budget: 1000"):
            assert part in joined


async def test_privacy_floors_hold_against_values_of_another_json_type(env: Env) -> None:
    # Hostile: a signed document whose looser values are strings or floats. The node converts
    # them ("1000" -> 1000.0, 2.0 -> 2), so the floors must be judged on the converted values.
    floors = {"min_count": 5, "dp_epsilon": 1.0, "dp_budget": 20.0}
    async with env.node(**floors) as node:
        await env.put(1, {"min_count": 2.0, "dp_epsilon": "1000", "dp_budget": "1e9", "window": "1s"})
        st = await env.wait_state("n1", 1, "applied")
        assert (node.config.min_count, node.config.dp_epsilon, node.config.dp_budget) == (5, 1.0, 20.0)
        assert (node.buffer.k, node.buffer.dp_epsilon, node.buffer.dp_budget) == (5, 1.0, 20.0)
        assert node.windower.window == 1.0  # the rest of the document is taken
        joined = " | ".join(st.config_warnings)
        for part in ("min_count: 2.0", "dp_epsilon: '1000'", "dp_budget: '1e9'"):
            assert part in joined
        # A tighter value of another type is taken as the node converts it.
        await env.put(2, {"min_count": 7.0, "dp_epsilon": "0.5", "dp_budget": "10"})
        await env.wait_state("n1", 2, "applied")
        assert (node.buffer.k, node.buffer.dp_epsilon, node.buffer.dp_budget) == (7, 0.5, 10.0)


async def _spend(node: EdgeNode, windows: int) -> float:
    for _ in range(windows):
        await node.predict(["hello", "football is great"])
        await node.windower.tick()
    return await node.buffer.dp_spent()


async def test_dp_budget_survives_config_changes_and_a_reinstall(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """Windows of epsilon 1 spend a budget of 3; a wiped telemetry database (a new install
    id) does not get a fresh budget; a ledger outside the data directory outlives a wiped
    data directory."""
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, model=keys.bundle().path, dp_epsilon=1.0, dp_budget=3.0, window=60.0
    )
    async with EdgeNode(cfg) as node:
        first_install = node.buffer.install
        assert await _spend(node, 4) == pytest.approx(3.0)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cfg.data_path / 'telemetry.db'}{suffix}").unlink(missing_ok=True)
    async with EdgeNode(cfg) as node:
        assert node.buffer.install != first_install  # a new install
        assert await _spend(node, 1) == pytest.approx(3.0)  # nothing more spent
    cfg2 = cfg.replace(data_dir=str(tmp_path / "data-b"), dp_ledger=str(tmp_path / "privacy" / "ledger.db"))
    async with EdgeNode(cfg2) as node:
        assert await _spend(node, 1) == pytest.approx(1.0)
    shutil.rmtree(tmp_path / "data-b")
    async with EdgeNode(cfg2) as node:
        assert await node.buffer.dp_spent() == pytest.approx(1.0)


def _hostile() -> tuple[list[bytes], list[dict[str, object]]]:
    """Unsigned junk, and signed settings that must be refused."""
    raw = [
        b"",
        b"\x00\xff" * 100,
        b"[" * 100_000,
        b'{"fleet": 1}',
        b'{"v": 1, "fleet": "x", "version": 99999999999999999999999999}',
        b"null",
        json.dumps(
            {"fleet": "x", "version": 5, "settings": {}, "signature": {"key_id": "x", "value": "!!"}}
        ).encode(),
        b"x" * 70_000,
    ]
    settings: list[dict[str, object]] = [
        {"window": "1e309"},
        {"window": 1e-9},
        {"safety": []},
        {"safety": {"min_samples": True}},
        {"refresh": {"poll_interval": "forever"}},
        {"outbox_max_bytes": "9ZB"},
        {"min_count": -1},
        {"log_level": {"a": 1}},
        {"nats_url": "http://example.com"},
        {"nats_url": 12},
    ]
    return raw, settings


async def test_hostile_config_payloads_never_stop_the_node(env: Env) -> None:
    raw, settings = _hostile()
    async with env.node() as node:
        for body in raw:
            await put_raw(env.js, env.fleet, body)
            await put_raw(env.js, env.fleet, body, node="n1")
        for version, hostile in enumerate(settings, start=1):
            await env.put(version, hostile)
        await env.wait_state("n1", len(settings), "rejected")
        assert len(await node.predict(["still serving"])) == 1
        await env.put(len(settings) + 1, {"min_count": 6})
        await env.wait_state("n1", len(settings) + 1, "applied")
        assert node.buffer.k == 6
        assert node.last_error is None or "fleetconfig" not in node.last_error


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from([*PUSHABLE, "safety", "refresh", "turbo", ""])


@settings(max_examples=300, deadline=None)
@given(
    settings_=st.dictionaries(
        _keys, _json | st.dictionaries(st.text(max_size=20), _json, max_size=4), max_size=6
    ),
    schema=st.integers(min_value=-2, max_value=5),
)
def test_fuzzed_settings_are_resolved_or_refused_with_a_reason(
    settings_: dict[str, object], schema: int
) -> None:
    """Whatever a (signed) document holds, ``resolve`` gives a validated config or
    ``ConfigRejected`` — never another exception, never a loosened floor."""
    local = EdgeConfig(fleet="f", node="n", data_dir="/tmp/x", min_count=5, dp_epsilon=1.0, dp_budget=9.0)
    try:
        r = resolve(local, settings_, schema=schema)
    except ConfigRejected as exc:
        reason = exc.reason
        assert reason, "a refusal names its reason"
        return
    assert r.config.min_count >= 5
    assert r.config.dp_epsilon is not None
    assert r.config.dp_epsilon <= 1.0
    assert r.config.dp_budget is not None
    assert r.config.dp_budget <= 9.0


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | _json.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_stored_documents_are_refused_with_a_reason(raw: bytes) -> None:
    with pytest.raises(ConfigRejected):
        verify_config(raw, TrustStore([]))
