"""Pushed fleet configuration on a real edge node against a real nats-server (issue 17):
applied at run time, refused with its reason, rolled back on the node when it breaks the
link, pinned keys and privacy floors kept, the DP budget kept across a reinstall."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from _fleetcfg import config_state, put_config, put_raw, signed
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _edge_util import Keys, Statuses, edge_config
from _nats import free_port, wait_until
from slmops.edge.fleetconfig import PROBATION_S, resolve
from slmops.edge.node import EdgeNode
from slmops.shared.fleetconfig import ConfigRejected
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

WAIT = PROBATION_S * 3


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


async def test_config_applied_at_run_time_and_reported(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> None:
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=keys.bundle().path)
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await put_config(
            js,
            fleet,
            1,
            {
                "window": "400ms",
                "min_count": 3,
                "status_interval": "7s",
                "outbox_max_bytes": "2MB",
                "safety": {"max_error_rate": 0.2},
                "refresh": {"poll_interval": "30s"},
                "log_level": "warning",
            },
            keys.key,
        )
        await wait_until(
            lambda: config_state(statuses.items, "n1", 1, "applied") is not None, WAIT, what="v1 applied"
        )
        st = config_state(statuses.items, "n1", 1, "applied")
        assert st is not None
        assert st.config_version == 1
        assert st.config_warnings == []
        assert node.buffer.k == 3
        assert node.status.interval == 7.0
        assert node.buffer.outbox_max_bytes == 2_000_000
        assert node.safety.limits.max_error_rate == 0.2
        # window: at the next boundary (long passed after the probation)
        assert node.windower.window == 0.4
        assert node.buffer.window == 0.4
        assert node.config.window == 0.4
        assert node.local_config.window == 0.2
        # Served throughout: a prediction works
        assert len(await node.predict(["hello there"])) == 1
    # A restart starts with the last good pushed config, before it connects.
    async with EdgeNode(cfg.replace(nats_url="nats://127.0.0.1:1")) as again:
        assert again.buffer.k == 3
        assert again.windower.window == 0.4


async def test_rejected_config_is_reported_with_its_reason(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> None:
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=keys.bundle().path)
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        # signed by a key the node does not trust
        await put_config(js, fleet, 1, {"min_count": 3}, Ed25519PrivateKey.generate())
        await wait_until(
            lambda: any(
                s.config_state == "rejected" and "not trusted" in (s.config_reason or "")
                for s in statuses.items
            ),
            WAIT,
            what="untrusted config rejected",
        )
        # trusted, but a value the node refuses
        await put_config(js, fleet, 2, {"status_interval": "-3s"}, keys.key)
        await wait_until(
            lambda: config_state(statuses.items, "n1", 2, "rejected") is not None, WAIT, what="v2 rejected"
        )
        st = config_state(statuses.items, "n1", 2, "rejected")
        assert st is not None
        assert "status_interval" in (st.config_reason or "")
        assert st.config_version is None  # nothing pushed is in effect
        assert node.buffer.k == cfg.min_count
        assert node.status.interval == cfg.status_interval
        # unknown key at the node's own schema: refused; from a newer schema: warned and taken
        await put_config(js, fleet, 3, {"min_count": 4, "turbo": 1}, keys.key)
        await wait_until(
            lambda: config_state(statuses.items, "n1", 3, "rejected") is not None, WAIT, what="v3"
        )
        await put_config(js, fleet, 4, {"min_count": 4, "turbo": 1}, keys.key, schema=2)
        await wait_until(
            lambda: config_state(statuses.items, "n1", 4, "applied") is not None, WAIT, what="v4"
        )
        st = config_state(statuses.items, "n1", 4, "applied")
        assert st is not None
        assert any("turbo" in w for w in st.config_warnings)
        assert node.buffer.k == 4


async def test_config_that_cuts_the_node_off_nats_is_rolled_back_on_the_node(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> None:
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=keys.bundle().path)
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await put_config(js, fleet, 1, {"min_count": 2}, keys.key)
        await wait_until(
            lambda: config_state(statuses.items, "n1", 1, "applied") is not None, WAIT, what="v1"
        )
        dead = f"nats://127.0.0.1:{free_port()}"
        await put_config(js, fleet, 2, {"nats_url": dead, "min_count": 7}, keys.key)
        await wait_until(lambda: node.buffer.k == 7, WAIT, what="v2 taken")
        await wait_until(
            lambda: config_state(statuses.items, "n1", 2, "rolled_back") is not None,
            WAIT * 2,
            what="v2 rolled back",
        )
        st = config_state(statuses.items, "n1", 2, "rolled_back")
        assert st is not None
        assert "could not reach NATS" in (st.config_reason or "")
        assert st.config_version == 1
        assert node.buffer.k == 2
        assert node.link.state.value == "online"
        # The bad version is never taken again, even when it is read again.
        await anyio.sleep(1.0)
        assert node.fleetcfg.saved.highest == 2
        assert "2" in node.fleetcfg.saved.bad


async def test_pinned_key_and_privacy_floor_hold_on_a_running_node(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> None:
    cfg = edge_config(
        tmp_path,
        keys,
        fleet=fleet,
        url=nats_server.url,
        model=keys.bundle().path,
        pin=["status_interval"],
        min_count=5,
        dp_epsilon=1.0,
        dp_budget=20.0,
    )
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await put_config(
            js,
            fleet,
            1,
            {"status_interval": "2s", "min_count": 1, "dp_epsilon": 8.0, "dp_budget": 1000, "window": "1s"},
            keys.key,
        )
        await wait_until(
            lambda: config_state(statuses.items, "n1", 1, "applied") is not None, WAIT, what="v1"
        )
        st = config_state(statuses.items, "n1", 1, "applied")
        assert st is not None
        assert node.status.interval == 5.0  # pinned
        assert (node.buffer.k, node.buffer.dp_epsilon, node.buffer.dp_budget) == (5, 1.0, 20.0)
        assert node.windower.window == 1.0  # not pinned, not a floor: taken
        joined = " | ".join(st.config_warnings)
        assert "status_interval: pinned" in joined
        assert "min_count: 1" in joined
        assert "dp_epsilon: 8.0" in joined
        assert "dp_budget: 1000" in joined


async def test_dp_budget_survives_config_changes_and_a_reinstall(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """Three windows of epsilon 1 spend a budget of 3; a wiped telemetry database (a new
    install id) does not get a fresh budget, nor does a bigger pushed budget."""
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, model=keys.bundle().path, dp_epsilon=1.0, dp_budget=3.0, window=60.0
    )
    async with EdgeNode(cfg) as node:
        first_install = node.buffer.install
        for _ in range(4):
            await node.predict(["hello", "football is great"])
            await node.windower.tick()
        assert await node.buffer.dp_spent() == pytest.approx(3.0)
    db = cfg.data_path / "telemetry.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    async with EdgeNode(cfg) as node:
        assert node.buffer.install != first_install  # a new install
        assert await node.buffer.dp_spent() == pytest.approx(3.0)
        await node.predict(["hello again"])
        await node.windower.tick()
        assert await node.buffer.dp_spent() == pytest.approx(3.0)  # nothing more spent
    # A ledger outside the data directory outlives a wiped data directory too.
    outside = tmp_path / "privacy" / "ledger.db"
    cfg2 = cfg.replace(data_dir=str(tmp_path / "data-b"), dp_ledger=str(outside))
    async with EdgeNode(cfg2) as node:
        await node.predict(["one"])
        await node.windower.tick()
        assert await node.buffer.dp_spent() == pytest.approx(1.0)
    import shutil

    shutil.rmtree(tmp_path / "data-b")
    async with EdgeNode(cfg2) as node:
        assert await node.buffer.dp_spent() == pytest.approx(1.0)


async def test_hostile_config_payloads_never_stop_the_node(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> None:
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=keys.bundle().path)
    deep: object = 1
    for _ in range(5000):
        deep = [deep]
    import json

    hostile: list[bytes] = [
        b"",
        b"\x00\xff" * 100,
        b"[" * 100_000,
        b'{"fleet": 1}',
        b'{"v": 1, "fleet": "x", "version": 99999999999999999999999999}',
        b"null",
        json.dumps(
            {"fleet": fleet, "version": 5, "settings": {}, "signature": {"key_id": "x", "value": "!!"}}
        ).encode(),
        b"x" * 70_000,
    ]
    signed_hostile = [
        {"window": "1e309"},
        {"window": 10**400},
        {"safety": []},
        {"safety": {"min_samples": True}},
        {"refresh": {"poll_interval": "forever"}},
        {"outbox_max_bytes": "9ZB"},
        {"min_count": -1},
        {"log_level": {"a": 1}},
        {"nats_url": "http://example.com"},
        {"nats_url": 12},
    ]
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        for raw in hostile:
            await put_raw(js, fleet, raw)
            await put_raw(js, fleet, raw, node="n1")
        version = 1
        for settings in signed_hostile:
            try:
                raw = signed(fleet, version, settings, keys.key)
            except (OverflowError, TypeError, ValueError):
                continue
            await put_raw(js, fleet, raw)
            version += 1
        await wait_until(
            lambda: config_state(statuses.items, "n1", version - 1, "rejected") is not None,
            WAIT,
            what="last hostile",
        )
        assert len(await node.predict(["still serving"])) == 1
        await put_config(js, fleet, version, {"min_count": 6}, keys.key)
        await wait_until(
            lambda: config_state(statuses.items, "n1", version, "applied") is not None, WAIT, what="good"
        )
        assert node.buffer.k == 6
        assert node.last_error is None or "fleetconfig" not in node.last_error
