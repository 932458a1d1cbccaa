"""ensure_resources: creates slmops' JetStream resources once, and refuses incompatible ones."""

from __future__ import annotations

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from slmops.shared import names
from slmops.shared.errors import ResourceConflict
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

WANT_SUBJECTS = {
    names.TELEMETRY_STREAM: ["slmops.telemetry.>"],
    names.DRIFT_STREAM: ["slmops.drift.>"],
    names.STATUS_STREAM: ["slmops.status.>"],
    names.ROLLOUT_STREAM: ["slmops.rollout.>"],
    names.DEADLETTER_STREAM: ["slmops.deadletter", "slmops.deadletter.>"],
}


async def test_idempotent_and_creates_every_resource(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_resources(js)
    await ensure_resources(js)  # a second run finds everything in place and changes nothing

    for stream, subjects in WANT_SUBJECTS.items():
        info = await js.stream_info(stream)
        assert sorted(info.config.subjects or []) == sorted(subjects)
        assert info.config.storage == StorageType.FILE

    telemetry = (await js.stream_info(names.TELEMETRY_STREAM)).config
    assert telemetry.duplicate_window == 120
    assert telemetry.max_age == 7 * 24 * 3600
    assert (await js.stream_info(names.DRIFT_STREAM)).config.max_age == 90 * 24 * 3600
    assert (await js.stream_info(names.STATUS_STREAM)).config.max_msgs_per_subject == 100

    assignments = await js.key_value(names.ASSIGNMENTS_BUCKET)
    assert (await assignments.status()).history == 5
    manifests = await js.key_value(names.MODELS_MANIFEST_BUCKET)
    assert (await manifests.status()).history == 1
    await js.object_store(names.MODELS_BUCKET)


async def _conflict(server: EmbeddedServer, config: StreamConfig) -> ResourceConflict:
    nc = await nats.connect(server.url, allow_reconnect=False)
    try:
        js: JetStreamContext = nc.jetstream()
        await js.add_stream(config)
        with pytest.raises(ResourceConflict) as caught:
            await ensure_resources(js)
        # slmops never touches what it did not create
        assert (await js.stream_info(config.name or "")).config.subjects == config.subjects
        return caught.value
    finally:
        await nc.close()


async def test_stream_with_other_subjects_is_a_conflict(private_server: EmbeddedServer) -> None:
    conflict = await _conflict(
        private_server, StreamConfig(name=names.DRIFT_STREAM, subjects=["elsewhere.drift.>"])
    )
    assert (conflict.kind, conflict.name, conflict.field) == ("stream", names.DRIFT_STREAM, "subjects")
    assert conflict.have == ["elsewhere.drift.>"]
    assert "subjects" in str(conflict)


async def test_stream_in_memory_is_a_conflict(private_server: EmbeddedServer) -> None:
    conflict = await _conflict(
        private_server,
        StreamConfig(name=names.ROLLOUT_STREAM, subjects=["slmops.rollout.>"], storage=StorageType.MEMORY),
    )
    assert (conflict.field, conflict.have, conflict.want) == ("storage", "memory", "file")


async def test_compatible_stream_with_other_limits_is_left_alone(private_server: EmbeddedServer) -> None:
    nc = await nats.connect(private_server.url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name=names.DRIFT_STREAM, subjects=["slmops.drift.>"], max_age=3600)
        await ensure_resources(js)
        assert (await js.stream_info(names.DRIFT_STREAM)).config.max_age == 3600
    finally:
        await nc.close()


@pytest.mark.parametrize("replicas", [0, 6, -1])
async def test_invalid_replicas_raise_value_error(nc: NATS, replicas: int) -> None:
    with pytest.raises(ValueError, match="replicas"):
        await ensure_resources(nc.jetstream(), replicas=replicas)
