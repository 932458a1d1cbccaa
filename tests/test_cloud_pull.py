"""``cloud.pull.PullBatches`` (the JetStream pull protocol over one subscription) against a real
nats-server, and its use by the cloud ingest: whole batches in order, idle and lingering
fetches, prefetched messages handed back on close, a deleted consumer re-created, and a
dead-letter copy retried under ack-all until it is stored."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import nats
import nats.errors
import numpy as np
import pytest
from _cloud_util import cloud_config, make_aggregate, publish
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from structlog.testing import capture_logs

from _nats import wait_until
from slmops.cloud.ingest.consumers import consumer_name
from slmops.cloud.ingest.pull import ConsumerGone, PullBatches
from slmops.cloud.service import CloudService
from slmops.shared.messages import TelemetryAggregate, encode_telemetry
from slmops.shared.names import DEADLETTER_STREAM, TELEMETRY_STREAM, telemetry_subject
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

DURABLE = "puller"


@pytest.fixture
async def stream(js: JetStreamContext, fleet: str) -> AsyncIterator[str]:
    """A small stream of this test's own (``T_<fleet>`` on ``t.<fleet>.>``), deleted after."""
    name = f"T_{fleet}"
    await js.add_stream(name=name, subjects=[f"t.{fleet}.>"])
    try:
        yield name
    finally:
        await js.delete_stream(name)


async def _add_consumer(
    js: JetStreamContext, stream: str, *, ack_wait: float = 30.0, max_ack_pending: int = 10_000
) -> None:
    await js.add_consumer(
        stream,
        js_api.ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
        ),
    )


async def _fill(nc: NATS, js: JetStreamContext, stream: str, subject: str, n: int) -> None:
    """``n`` messages with payloads ``b"0"``…, stored in that order (core publishes, one flush)."""
    for i in range(n):
        await nc.publish(subject, str(i).encode())
    await nc.flush()

    async def stored() -> bool:
        return (await js.stream_info(stream)).state.messages == n

    await wait_until(stored, 10, what=f"{n} messages stored")


def _seq(msg: Msg) -> int:
    return msg.metadata.sequence.stream


async def _waiting(js: JetStreamContext, stream: str) -> bool:
    """Whether a pull request is waiting on the server for ``DURABLE``."""
    return ((await js.consumer_info(stream, DURABLE)).num_waiting or 0) >= 1


async def test_batches_come_whole_in_stream_order_and_a_short_backlog_does_not_wait_for_expiry(
    nc: NATS, js: JetStreamContext, stream: str, fleet: str
) -> None:
    """2500 stored messages fetched 1024 at a time come as 1024, 1024, 452, in stream order,
    each once; the last, short batch is returned without waiting for the 10 s expiry."""
    await _add_consumer(js, stream)
    await _fill(nc, js, stream, f"t.{fleet}.a", 2500)
    sizes: list[int] = []
    seqs: list[int] = []
    payloads: list[bytes] = []
    async with PullBatches(nc, stream, DURABLE) as pull:
        for _ in range(3):
            started = time.monotonic()
            msgs = await pull.fetch(1024, timeout=10)
            elapsed = time.monotonic() - started
            sizes.append(len(msgs))
            seqs += [_seq(m) for m in msgs]
            payloads += [m.data for m in msgs]
            for m in msgs:
                await m.ack()
    assert sizes == [1024, 1024, 452]
    assert elapsed < 5, f"the short last batch took {elapsed:.2f}s (request expiry is 10 s)"
    assert seqs == sorted(set(seqs))  # increasing, hence distinct
    assert len(seqs) == 2500
    assert payloads == [str(i).encode() for i in range(2500)]


async def test_an_idle_fetch_returns_nothing_at_its_timeout_and_a_lingering_one_gets_a_new_message(
    nc: NATS, js: JetStreamContext, stream: str, fleet: str
) -> None:
    """With nothing stored, fetch returns ``[]`` after about its timeout; a message published
    while a fetch(1, timeout=5) waits on the server is returned by that fetch, well before 5 s."""
    await _add_consumer(js, stream)
    async with PullBatches(nc, stream, DURABLE) as pull:
        started = time.monotonic()
        assert await pull.fetch(10, timeout=0.5) == []
        idle = time.monotonic() - started
        assert 0.4 <= idle < 2.0, f"idle fetch took {idle:.2f}s for a 0.5 s timeout"

        got: list[Msg] = []
        took: list[float] = []

        async def fetch_one() -> None:
            begun = time.monotonic()
            got.extend(await pull.fetch(1, timeout=5))
            took.append(time.monotonic() - begun)

        requests = pull.requests
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch_one)
            # The no_wait request came back empty and the lingering one waits on the server.
            await wait_until(lambda: pull.requests == requests + 2, 5, what="lingering request sent")
            await wait_until(lambda: _waiting(js, stream), 5, what="request waiting on the server")
            await js.publish(f"t.{fleet}.late", b"late")
        assert [m.data for m in got] == [b"late"]
        assert took[0] < 4, f"the lingering fetch took {took[0]:.2f}s to return a new message"
        await got[0].ack()


async def test_close_hands_prefetched_messages_back_at_once_and_none_is_lost(
    nc: NATS, js: JetStreamContext, stream: str, fleet: str
) -> None:
    """Instance A fetches a full batch (so the next one is prefetched into its buffer), acks
    it and closes; instance B on the same durable gets every other message within seconds
    (ack_wait is 30 s), the ones A had buffered among them as redeliveries."""
    total, batch = 300, 100
    await _add_consumer(js, stream, ack_wait=30.0)
    await _fill(nc, js, stream, f"t.{fleet}.a", total)
    async with PullBatches(nc, stream, DURABLE) as a:
        first = await a.fetch(batch, timeout=5)
        assert len(first) == batch
        await wait_until(lambda: a.buffered == batch, 5, what="next batch prefetched into A's buffer")
        buffered = a.buffered
        for m in first:
            await m.ack()
    acked_by_a = {_seq(m) for m in first}
    got_by_b: list[Msg] = []
    async with PullBatches(nc, stream, DURABLE) as b:
        with anyio.fail_after(5):
            while len(got_by_b) < total - batch:
                msgs = await b.fetch(batch, timeout=1)
                got_by_b += msgs
                for m in msgs:
                    await m.ack()
        # Nothing more: every message was either acked by A or handed to B.
        assert await b.fetch(batch, timeout=0.3) == []
    seqs_b = [_seq(m) for m in got_by_b]
    assert len(seqs_b) == len(set(seqs_b)) == total - batch
    assert acked_by_a.isdisjoint(seqs_b)
    assert acked_by_a | set(seqs_b) == set(range(1, total + 1))
    redelivered = [m for m in got_by_b if m.metadata.num_delivered > 1]
    assert len(redelivered) == buffered  # A's buffer came back by nak, not after ack_wait


async def test_a_fetch_on_a_deleted_consumer_raises_consumer_gone(
    nc: NATS, js: JetStreamContext, stream: str, fleet: str
) -> None:
    """A consumer deleted while a fetch waits on it ends that fetch with ``ConsumerGone``
    (409 Consumer Deleted), and a fetch on the consumer gone raises it too (503)."""
    await _add_consumer(js, stream)
    async with PullBatches(nc, stream, DURABLE) as pull:
        errors: list[ConsumerGone] = []

        async def fetch_and_fail() -> None:
            with pytest.raises(ConsumerGone) as caught:
                await pull.fetch(5, timeout=5)
            errors.append(caught.value)

        with anyio.fail_after(4):  # well before the request's own 5 s expiry
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch_and_fail)
                await wait_until(lambda: _waiting(js, stream), 3, what="request waiting on the server")
                await js.delete_consumer(stream, DURABLE)
        assert errors[0].status == "409", errors[0]
        with anyio.fail_after(4), pytest.raises(ConsumerGone) as again:
            await pull.fetch(5, timeout=5)
        assert again.value.status == "503", again.value


def _counters(svc: CloudService) -> dict[str, int]:
    counters: dict[str, int] = svc.statistics().counters
    return counters


def _applied(svc: CloudService, fleet: str) -> int:
    return sum(n.aggregates for (f, _), n in svc.nodes.items() if f == fleet)


def _inferences(svc: CloudService, fleet: str) -> int:
    return sum(n.inferences for (f, _), n in svc.nodes.items() if f == fleet)


async def _publish_all(nc: NATS, aggs: list[TelemetryAggregate]) -> None:
    for agg in aggs:
        await nc.publish(telemetry_subject(agg.fleet, agg.node), encode_telemetry(agg))
    await nc.flush()


async def test_the_service_re_creates_a_deleted_telemetry_consumer_and_counts_each_aggregate_once(
    nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """The telemetry consumer is deleted under a running service: it is re-created (from the
    stream start), aggregates published afterwards are applied, and the replayed ones are
    dropped as duplicates, so every aggregate is counted exactly once."""
    rng = np.random.default_rng(11)
    nodes = [f"{fleet}-n{i}" for i in range(1, 4)]
    before = [make_aggregate(fleet, node, s, 100 + s, rng) for s in range(1, 6) for node in nodes]
    after = [make_aggregate(fleet, node, s, 100 + s, rng) for s in range(6, 11) for node in nodes]
    durable = consumer_name("slmops-cloud", [fleet])
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        await _publish_all(nc, before)
        await wait_until(lambda: _applied(svc, fleet) == len(before), 20, what="first part applied")
        await js.delete_consumer(TELEMETRY_STREAM, durable)
        await _publish_all(nc, after)
        total = len(before) + len(after)
        await wait_until(lambda: _applied(svc, fleet) == total, 20, what="rest applied after re-creation")
        await wait_until(
            lambda: _counters(svc).get("duplicates", 0) >= len(before), 10, what="replays dropped"
        )
        assert _applied(svc, fleet) == total
        assert _counters(svc)["duplicates"] == len(before)
        assert _inferences(svc, fleet) == sum(a.count for a in before + after)
        info = await js.consumer_info(TELEMETRY_STREAM, durable)
        assert info.config.ack_policy == js_api.AckPolicy.ALL


async def test_a_failed_deadletter_copy_under_ack_all_is_retried_until_stored_and_nothing_is_left(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Dead-letter stream missing: good aggregates around a malformed one are applied, the
    malformed one is not counted (nor acked) while its copy keeps failing; once the stream is
    back its copy is stored with the reason, counted once, and the consumer has nothing left."""
    fleet, node = "dl", "dl-n1"
    rng = np.random.default_rng(12)
    good = [make_aggregate(fleet, node, s, 100 + s, rng) for s in (1, 2)]
    bad = b"\xc1 not msgpack"
    durable = consumer_name("slmops-cloud", [fleet])
    nc = await nats.connect(private_server.url, allow_reconnect=False, connect_timeout=5)
    js = nc.jetstream()
    try:
        with capture_logs() as logs:
            async with CloudService(cloud_config(private_server.url, tmp_path, fleet)) as svc:
                await svc.wait_active(20)  # it has provisioned the resources by now
                await js.delete_stream(DEADLETTER_STREAM)
                # One write, so the three land in one batch (the bad one blocks later batches).
                await nc.publish(telemetry_subject(fleet, node), encode_telemetry(good[0]))
                await nc.publish(telemetry_subject(fleet, node), bad)
                await nc.publish(telemetry_subject(fleet, node), encode_telemetry(good[1]))
                await nc.flush()
                await wait_until(lambda: _applied(svc, fleet) == 2, 20, what="good ones applied")
                await wait_until(
                    lambda: sum(e["event"] == "deadletter_failed" for e in logs) >= 2,
                    # A copy to the missing stream can fail by its 5 s publish timeout (not a
                    # quick "no responders"): two tries take 5 + backoff + 5 s.
                    30,
                    what="copy tried twice",
                )
                assert _counters(svc).get("deadlettered", 0) == 0
                info = await js.consumer_info(TELEMETRY_STREAM, durable)
                assert info.num_ack_pending >= 1  # the batch waits: neither acked nor nak'ed
                assert info.num_redelivered == 0

                await ensure_resources(js)
                await wait_until(lambda: _counters(svc).get("deadlettered", 0) == 1, 15, what="stored")
            assert _applied(svc, fleet) == 2
            assert _inferences(svc, fleet) == sum(a.count for a in good)
            assert _counters(svc).get("duplicates", 0) == 0
        dl = await js.stream_info(DEADLETTER_STREAM)
        assert dl.state.messages == 1
        copy = await js.get_msg(DEADLETTER_STREAM, seq=dl.state.first_seq)
        assert copy.data == bad
        assert copy.headers is not None
        assert copy.headers["Slmops-Subject"] == telemetry_subject(fleet, node)
        assert copy.headers["Slmops-Kind"] == "undecodable"
        assert copy.headers["Slmops-Reason"]

        async def nothing_left() -> bool:
            info = await js.consumer_info(TELEMETRY_STREAM, durable)
            return bool(info.num_ack_pending == 0 and info.num_pending == 0)

        await wait_until(nothing_left, 5, what="consumer has nothing pending after the stop")
        info = await js.consumer_info(TELEMETRY_STREAM, durable)
        assert info.num_redelivered == 0
    finally:
        await nc.close()


async def test_close_after_a_cancelled_lingering_fetch_hands_its_messages_back(
    nc: NATS, js: JetStreamContext, stream: str, fleet: str
) -> None:
    """A fetch cancelled while its lingering request (10 s) is still open, e.g. on a lost
    lease: ``close()`` still naks what it buffered, so another instance gets it at once."""
    await _add_consumer(js, stream, ack_wait=30.0)
    a = PullBatches(nc, stream, DURABLE)
    await a.__aenter__()
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.fetch, 10, 10)
        await wait_until(lambda: _waiting(js, stream), 5)
        for i in range(3):
            await js.publish(f"t.{fleet}.a", str(i).encode())
        await wait_until(lambda: a.buffered == 3, 5)
        tg.cancel_scope.cancel()
    await a.close()
    assert a.buffered == 0
    got: list[Msg] = []
    async with PullBatches(nc, stream, DURABLE) as b:
        with anyio.move_on_after(5):
            while len(got) < 3:
                got += await b.fetch(10, timeout=1)
    assert sorted(m.data for m in got) == [b"0", b"1", b"2"]


async def test_a_full_max_ack_pending_holds_the_next_batch_back_without_an_error(
    nc: NATS, js: JetStreamContext, stream: str, fleet: str
) -> None:
    """A consumer with room for one batch only (max_ack_pending = batch): the prefetch and the
    next fetch get nothing (nats-server 2.15 answers 404/408 here), without an error; once
    the first batch is acked, the next one comes."""
    await _add_consumer(js, stream, max_ack_pending=5)
    await _fill(nc, js, stream, f"t.{fleet}.a", 12)
    async with PullBatches(nc, stream, DURABLE) as pull:
        first = await pull.fetch(5, timeout=5)
        assert [m.data for m in first] == [str(i).encode() for i in range(5)]
        assert await pull.fetch(5, timeout=0.5) == []
        for m in first:
            await m.ack()
        second = await pull.fetch(5, timeout=5)
        assert [m.data for m in second] == [str(i).encode() for i in range(5, 10)]


async def test_an_existing_consumer_too_small_for_a_prefetch_is_named_and_still_drained(
    nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """A telemetry consumer made by an older version (max_ack_pending 100, below two batches
    of 64) keeps its config; the service says so in a warning and still counts everything."""
    durable = consumer_name("slmops-cloud", [fleet])
    await js.add_consumer(
        TELEMETRY_STREAM,
        js_api.ConsumerConfig(
            durable_name=durable,
            ack_policy=js_api.AckPolicy.ALL,
            filter_subject=f"slmops.telemetry.{fleet}.>",
            max_ack_pending=100,
        ),
    )
    rng = np.random.default_rng(14)
    aggs = [make_aggregate(fleet, f"{fleet}-n{i}", s, 100, rng) for s in range(1, 41) for i in range(5)]
    with capture_logs() as logs:
        async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
            await svc.wait_active(20)
            await _publish_all(nc, aggs)
            await wait_until(lambda: _applied(svc, fleet) == len(aggs), 30, what="all applied")
    warnings = [e for e in logs if e["event"] == "consumer_max_ack_pending_small"]
    assert warnings
    assert (warnings[0]["max_ack_pending"], warnings[0]["batch"]) == (100, 64)


async def test_the_service_rides_out_a_server_restart_and_counts_each_aggregate_once(
    private_server: EmbeddedServer, tmp_path: Path
) -> None:
    """The NATS server is stopped under a running service (its open pull request dies with
    the server) and started again on the same store: the service reconnects, pulls again and
    counts every aggregate once, those sent before and after the outage alike."""
    fleet = "rs"
    rng = np.random.default_rng(15)
    nodes = [f"{fleet}-n{i}" for i in range(4)]
    before = [make_aggregate(fleet, node, s, 100, rng) for s in range(1, 11) for node in nodes]
    after = [make_aggregate(fleet, node, s, 100, rng) for s in range(11, 21) for node in nodes]
    total = len(before) + len(after)
    with capture_logs() as logs:
        async with CloudService(cloud_config(private_server.url, tmp_path, fleet)) as svc:
            await svc.wait_active(20)
            await _publish_acked(private_server.url, before)
            await wait_until(lambda: _applied(svc, fleet) == len(before), 20, what="first part applied")
            await private_server.stop_async(keep_store=True)
            await anyio.sleep(1.0)  # the service's pulls fail meanwhile; it must keep trying
            await private_server.start_async()
            await _publish_acked(private_server.url, after)
            await wait_until(lambda: _applied(svc, fleet) == total, 40, what="rest applied after restart")
            assert _inferences(svc, fleet) == sum(a.count for a in before + after)
            assert all(
                n.epochs[""].seqs.missing == 0 and n.epochs[""].seqs.high == 20 for n in svc.nodes.values()
            )
    # The outage reached the service (its pull failed, or its lease lapsed and came back).
    assert {"fetch_failed", "lease_lost"} & {e["event"] for e in logs}


async def _publish_acked(url: str, aggs: list[TelemetryAggregate]) -> None:
    """Publish through JetStream, each acked (retried while a restarted server recovers)."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    try:
        js = nc.jetstream()
        for agg in aggs:
            with anyio.fail_after(20):
                while True:
                    try:
                        await publish(js, agg)
                        break
                    except (nats.errors.Error, TimeoutError):
                        await anyio.sleep(0.2)
    finally:
        await nc.close()
