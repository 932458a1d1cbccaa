"""An analyst of ``slmops fleet init`` reads what the README promises (drift, rollout, status,
events, the audit; stored and live) with nothing but its creds, and still writes nothing, nor
creates any consumer (its delivery subject is in the request body, which rights cannot judge:
a push consumer could aim deliveries at a node's inbox or at a subject a stream stores), so
every read goes by message and direct gets and a core subscription.
Against a real nats-server in operator mode (JWT) with a cloud running (new-user trial: every
read command failed with 'permission denied' on its inbox and on consumer creation)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from _cloud_util import cloud_config, opened_event
from click.testing import CliRunner
from test_fleet_status_pages import _snapshot

from _nats import operator_server
from slmops.cli import main
from slmops.cloud.ingest.snapshot import ensure_fleet_bucket
from slmops.cloud.rollout import RolloutStore
from slmops.cloud.rollout.state import NodeEntry, RolloutState
from slmops.cloud.service import CloudService
from slmops.shared import names
from slmops.shared.connect import own_inbox
from slmops.shared.identity import decode_jwt, read_creds
from slmops.shared.messages import Assignment, ModelRef, RolloutEvent, encode_json

pytestmark = pytest.mark.anyio

SLMOPS = [sys.executable, "-m", "slmops.cli"]


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--log-level", "error", *args], catch_exceptions=False)
    return result.exit_code, result.output


async def _denied(url: str, creds: Path, attempts: list[tuple[str, bytes]], listen: list[str]) -> set[str]:
    """The subjects of ``attempts`` the server refuses ``creds`` to publish on, and of
    ``listen`` to subscribe to (each refusal is answered before the flush's pong)."""
    errors: list[Exception] = []
    all_in = anyio.Event()

    async def on_error(exc: Exception) -> None:
        errors.append(exc)
        if len(errors) >= len(attempts) + len(listen):
            all_in.set()

    nc = await nats.connect(
        url, user_credentials=str(creds), inbox_prefix=own_inbox(str(creds)), error_cb=on_error
    )
    try:
        for subject, body in attempts:
            await nc.publish(subject, body, reply=f"{own_inbox(str(creds))}.x")
        for subject in listen:
            await nc.subscribe(subject)
        await nc.flush()
        # nats-py hands each -ERR to the callback in a task of its own: wait for them.
        with anyio.move_on_after(10):
            await all_in.wait()
    finally:
        await nc.close()
    said = " ".join(str(e).lower() for e in errors)
    published = {s for s, _ in attempts if f'publish to "{s.lower()}"' in said}
    return published | {s for s in listen if f'subscription to "{s.lower()}"' in said}


async def test_an_analyst_runs_every_read_command_and_still_writes_nothing(
    tmp_path: Path, fleet: str
) -> None:
    async with operator_server(tmp_path / "ids") as (server, ids):
        cfg = msgspec.structs.replace(
            cloud_config(server.url, tmp_path / "state", fleet), nats_creds=str(ids.cloud_creds.resolve())
        )
        alice = ids.enroll("analyst", name="alice").creds
        assert own_inbox(str(alice)).startswith("_INBOX.U")
        assert own_inbox(str(ids.cloud_creds)) == "_INBOX"
        # One fleet's analyst keeps live reads only: stored ones would not stay in its fleet.
        bob = ids.enroll("analyst", name="bob", fleet=fleet).creds
        assert own_inbox(str(bob)) == "_INBOX"
        assert decode_jwt(read_creds(bob)[0]).nats["pub"] == {"deny": [">"]}
        creds = ("--nats", server.url, "--creds", str(alice))
        model = ModelRef(name="m", version=1)
        stats = {"statistic": "G", "value": 12.5, "p_value": 0.001, "effect_size": 0.12}
        cloud = await nats.connect(server.url, user_credentials=str(ids.cloud_creds))
        try:
            js = cloud.jetstream()
            await js.publish(names.drift_subject(fleet), encode_json(opened_event(fleet, model, **stats)))
            async with CloudService(cfg) as svc:
                await svc.wait_active(30)
                # Stored, then live: one event replayed, the next published while it follows
                # (a process of its own: the command waits for SIGINT in its main thread).
                cmd = [*SLMOPS, "--log-level", "error", "drift", "watch", *creds, "--all", "--json"]
                cmd += ["--limit", "2"]
                with anyio.fail_after(60):
                    async with await anyio.open_process(cmd) as proc:
                        assert proc.stdout is not None
                        first = await proc.stdout.receive()  # the replayed event: it follows now
                        live = encode_json(opened_event(fleet, model, **stats))
                        await js.publish(names.drift_subject(fleet), live)
                        rest = b"".join([chunk async for chunk in proc.stdout])
                        stderr = b"".join([chunk async for chunk in proc.stderr]) if proc.stderr else b""
                        result = [(await proc.wait(), (first + rest + stderr).decode())]
                code, out = result[0]
                assert code == 0, out
                events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
                assert len(events) == 2, out
                assert all(e["fleet"] == fleet for e in events)
                # KV reads without a consumer: a node's snapshot and an assignment (the cloud's
                # own buckets allow no direct get: message gets by subject), the cloud's lease.
                fleet_kv = await ensure_fleet_bucket(js)
                await fleet_kv.put(f"{fleet}.n1", msgspec.json.encode(_snapshot(fleet, "n1", 7)))
                assigned = Assignment(fleet=fleet, model="m", version=1, assigned_at=datetime.now(UTC))
                await js.publish(
                    f"$KV.{names.ASSIGNMENTS_BUCKET}.{names.assignment_key(fleet)}", encode_json(assigned)
                )
                # A rollout of a fleet this cloud does not run (its controller leaves it be):
                # its state (KV, in parts) and its event (stream).
                other, now = f"{fleet}x", datetime.now(UTC)
                t0, n1 = now.timestamp(), NodeEntry(stage=0, assigned_at=now.timestamp())
                started = RolloutState(id="r-an", fleet=other, model="m", version=2, previous_version=1,
                                       created=t0, stage_started=t0, nodes={"n1": n1})  # fmt: skip
                await RolloutStore(js).create(started)
                event = RolloutEvent(
                    rollout="r-an", fleet=other, model="m", version=2, state="started", time=now
                )
                await js.publish(names.rollout_subject(other), encode_json(event))
                expect = {
                    ("rollout", "status"): ["r-an"],
                    ("rollout", "history"): ["r-an"],
                    ("fleet", "status"): ["n1"],
                    ("fleet", "status", "--json"): ['"n1"'],
                    ("status",): ["holds lease", "m v1", "drift open class_prior ("],
                    ("audit",): [],
                }
                for cmd, shown in expect.items():
                    code, out = await anyio.to_thread.run_sync(lambda c=cmd: _cli(*c[:2], *creds, *c[2:]))  # type: ignore[misc]
                    assert code == 0, f"{cmd}: {out}"
                    assert "permission denied" not in out.lower(), out
                    assert all(s in out for s in shown), f"{cmd}: {out}"
        finally:
            await cloud.close()
        # Still writes nothing: no KV put, no telemetry, no consumer (ephemeral or durable, by
        # either create subject; one delivering into a node's inbox), no consumer delete, no
        # stream change, nothing outside the read streams.
        durable = json.dumps({"stream_name": names.DRIFT_STREAM, "config": {"durable_name": "mine"}}).encode()
        aimed = {"deliver_subject": f"{names.inbox_prefix(fleet, 'n1')}.x", "deliver_policy": "all"}
        ephemeral = json.dumps({"stream_name": names.DRIFT_STREAM, "config": aimed}).encode()
        api = "$JS.API"
        attempts = [
            (f"{api}.CONSUMER.CREATE.{names.DRIFT_STREAM}", ephemeral),
            (f"{api}.CONSUMER.CREATE.{names.DRIFT_STREAM}", durable),
            (f"{api}.CONSUMER.CREATE.{names.DRIFT_STREAM}.eph", ephemeral),
            (f"{api}.CONSUMER.CREATE.KV_{names.ROLLOUTS_BUCKET}", b"{}"),
            (f"{api}.CONSUMER.CREATE.{names.AUDIT_STREAM}", b"{}"),
            (f"$JS.FC.{names.DRIFT_STREAM}.x", b""),
            (f"$KV.{names.ASSIGNMENTS_BUCKET}.{fleet}.n1", b"{}"),
            (names.telemetry_subject(fleet, "n1"), b"{}"),
            (names.drift_subject(fleet), b"{}"),
            (f"{api}.CONSUMER.DURABLE.CREATE.{names.DRIFT_STREAM}.mine", durable),
            (f"{api}.CONSUMER.CREATE.{names.DRIFT_STREAM}.mine", durable),
            (f"{api}.CONSUMER.CREATE.{names.TELEMETRY_STREAM}", b"{}"),
            (f"{api}.CONSUMER.DELETE.{names.DRIFT_STREAM}.x", b""),
            (f"{api}.STREAM.PURGE.{names.DRIFT_STREAM}", b""),
            (f"{api}.STREAM.DELETE.{names.DRIFT_STREAM}", b""),
            (f"{api}.DIRECT.GET.KV_{names.FLEETCONFIG_BUCKET}", b"{}"),
            (f"{api}.STREAM.UPDATE.KV_{names.ROLLOUTS_BUCKET}", b"{}"),
            (f"$KV.{names.ROLLOUTS_BUCKET}.{fleet}", b"{}"),
            (names.CHANGE_GLOBAL, b"{}"),
        ]
        # ... and listens on no other client's inbox (a node's, the cloud's) nor on telemetry.
        listen = ["_INBOX.>", f"{names.inbox_prefix(fleet, 'n1')}.>", names.TELEMETRY_ALL, "$KV.>"]
        assert await _denied(server.url, alice, attempts, listen) == {s for s, _ in attempts} | set(listen)
