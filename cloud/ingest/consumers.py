"""Telemetry in: a durable pull consumer on ``SLMOPS_TELEMETRY``, in batches.

Per batch: decode every message (``shared.messages.decode_telemetry``) and check it belongs
to its subject; apply the good ones through ``Applier`` (dedupe by ``(node, seq)``, fleet state,
detectors, one SQLite transaction); then ack them. A message that does not decode, or claims
another node than its subject, is logged with msgspec's error (which names the field path),
copied to ``slmops.deadletter`` with headers saying why and where from, terminated
(``msg.term()``: never redelivered) and counted. If the dead-letter copy cannot be stored the
message is nak'ed with a delay instead (explicit-ack consumers), or the copy is retried until
it is stored (the ack-all telemetry consumer, where a later ack would drop a nak'ed message), so
nothing is lost.

Acks go out only after the commit: a crash in between redelivers the batch, and the stored seq
tracker drops what was already applied. The telemetry consumer uses ack policy "all": one ack
per batch, on its last good message (halves the messages per aggregate; measured by ``slmops
bench ingest``).

Messages come through ``pull.PullBatches`` (the pull protocol over one subscription, with the
next batch prefetched while this one is handled) rather than nats-py's ``fetch``, which costs
about three times as much per message.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, ClassVar

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from slmops.cloud.ingest.apply import Applier
from slmops.cloud.ingest.batches import batch_histogram
from slmops.cloud.ingest.checks import Rejected, check_ranges
from slmops.cloud.ingest.pull import ConsumerGone, PullBatches, PullError
from slmops.shared.backoff import Backoff
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NotFound
from slmops.shared.jetstream import nats_errors, stored_at, url_of
from slmops.shared.messages import TelemetryAggregate, decode_telemetry
from slmops.shared.names import DEADLETTER_SUBJECT, TELEMETRY_STREAM, telemetry_subject, validate_id

__all__ = [
    "Consumer",
    "DeadletterLimiter",
    "PullLoop",
    "TelemetryIngest",
    "consumer_name",
    "deadletter",
    "deadletter_until_stored",
    "ingest_batch",
]

log = structlog.get_logger(__name__)

_DEADLETTER_TIMEOUT = 5.0
_NAK_DELAY = 5.0
_MAX_CONSUMER_NAME = 48
_KNOWN_SUBJECTS = 100_000
#: Defaults of ``CloudConfig.max_clock_skew`` / ``max_window_age`` (see ``checks.py``).
DEFAULT_MAX_CLOCK_SKEW = 600.0
DEFAULT_MAX_WINDOW_AGE = 365 * 86400.0
#: Seconds an abandoned recovery consumer lives on the server before it removes itself.
_RECOVER_INACTIVE = 60.0


def fleet_subjects(kind: str, fleets: Sequence[str]) -> list[str]:
    """Subjects of ``slmops.<kind>.…`` for a fleet selection: one per fleet, or all fleets."""
    return [f"slmops.{kind}.{f}.>" for f in fleets] or [f"slmops.{kind}.>"]


def consumer_name(base: str, fleets: Sequence[str]) -> str:
    """Durable name for a fleet selection: ``base`` for all fleets, else base + the fleets
    (hashed when long), so instances watching different fleets never share a consumer."""
    if not fleets:
        return base
    joined = "-".join(sorted(fleets))
    name = f"{base}-{joined}"
    if len(name) > _MAX_CONSUMER_NAME:
        name = f"{base}-{hashlib.sha256(joined.encode()).hexdigest()[:16]}"
    return name


async def deadletter(
    js: JetStreamContext, msg: Msg, reason: str, kind: str, *, nak_on_failure: bool = True
) -> bool:
    """Copy ``msg`` to the dead-letter subject with headers saying why, then ``term()`` it.
    Returns False if the copy could not be stored (after a nak with a delay, unless
    ``nak_on_failure`` is off)."""
    meta = msg.metadata
    stream_seq = str(meta.sequence.stream) if meta else "?"
    stream = meta.stream if meta else "?"
    headers = {
        "Nats-Msg-Id": f"deadletter:{stream}:{stream_seq}",
        "Slmops-Reason": reason[:1000].replace("\r", " ").replace("\n", " "),
        "Slmops-Kind": kind,
        "Slmops-Subject": msg.subject,
        "Slmops-Stream": stream,
        "Slmops-Stream-Seq": stream_seq,
    }
    try:
        with (
            anyio.fail_after(_DEADLETTER_TIMEOUT),
            nats_errors("stream publish", DEADLETTER_SUBJECT, url_of(js)),
        ):
            await js.publish(DEADLETTER_SUBJECT, msg.data, headers=headers)
    except (NatsUnavailable, JetStreamRefused, TimeoutError) as exc:
        log.error("deadletter_failed", subject=msg.subject, stream_seq=stream_seq, error=repr(exc))
        if nak_on_failure:
            await msg.nak(delay=_NAK_DELAY)
        return False
    await msg.term()
    log.warning("deadlettered", subject=msg.subject, stream_seq=stream_seq, kind=kind, reason=reason)
    return True


async def deadletter_until_stored(js: JetStreamContext, msg: Msg, reason: str, kind: str) -> None:
    """``deadletter`` retried (backing off to 5 s) until the copy is stored. For an ack-all
    consumer: a nak'ed message would be dropped by the next batch's ack, so the batch waits."""
    backoff = Backoff(0.5, _NAK_DELAY)
    while not await deadletter(js, msg, reason, kind, nak_on_failure=False):
        delay = backoff.next()
        await anyio.sleep(delay)


def check_telemetry(
    msg: Msg,
    known: set[str] | None = None,
    *,
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    max_window_age: float = DEFAULT_MAX_WINDOW_AGE,
) -> TelemetryAggregate:
    """Decode and check one telemetry message; ``ValueError``/``msgspec`` errors say why not
    (``checks.Rejected`` for absurd values; any other exception is a message that cannot
    be handled either, and the caller dead-letters it the same way).

    ``known``: subjects whose fleet and node ids were validated already (the caller keeps it,
    bounded); for those, the aggregate only has to name the same fleet and node. Times are
    judged against the message's JetStream timestamp (server time)."""
    agg = decode_telemetry(msg.data)
    subject = msg.subject
    if known is not None and subject in known:
        # Ids of a known subject are dot-free, so equal strings mean equal tokens.
        if subject != telemetry_subject(agg.fleet, agg.node):
            raise ValueError(f"aggregate of {agg.fleet}.{agg.node} published on subject {subject!r}")
    else:
        parts = subject.split(".")
        if len(parts) != 4 or parts[2] != agg.fleet or parts[3] != agg.node:
            raise ValueError(f"aggregate of {agg.fleet}.{agg.node} published on subject {subject!r}")
        validate_id(agg.fleet, "fleet")
        validate_id(agg.node, "node")
        if known is not None:
            if len(known) >= _KNOWN_SUBJECTS:
                known.clear()  # bounded; the live ones come back at the cost of one check each
            known.add(subject)
    check_ranges(agg, server_time(msg), max_clock_skew=max_clock_skew, max_window_age=max_window_age)
    return agg


def server_time(msg: Msg) -> datetime:
    """When JetStream stored ``msg`` (its metadata timestamp, aware UTC); this host's clock
    for a message without JetStream metadata."""
    ts = stored_at(msg)
    if ts is None:
        return datetime.now(UTC)
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def failure_reason(exc: BaseException) -> tuple[str, str]:
    """``(reason, kind)`` for a message that could not be handled: msgspec's own message
    for decode errors (it names the field path), the exception's type and text otherwise."""
    if isinstance(exc, msgspec.ValidationError):
        return str(exc), "invalid"
    if isinstance(exc, msgspec.DecodeError):
        return str(exc), "undecodable"
    if isinstance(exc, Rejected):
        return str(exc), "rejected"
    if isinstance(exc, RecursionError):
        return "nested too deeply to decode (RecursionError)", "undecodable"
    if isinstance(exc, ValueError | TypeError):
        return str(exc) or type(exc).__name__, "invalid"
    return f"{type(exc).__name__}: {exc}", "failed"


async def ingest_batch(
    applier: Applier,
    js: JetStreamContext,
    msgs: Sequence[Msg],
    known: set[str] | None = None,
    *,
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    max_window_age: float = DEFAULT_MAX_WINDOW_AGE,
) -> tuple[list[Msg], list[tuple[Msg, str, str]]]:
    """The whole ingest path of a batch short of settling it: decode, checks, dedupe, fleet
    state, detectors, one commit. Returns the messages applied (or dropped as duplicates)
    and those to dead-letter as ``(msg, reason, kind)``. A failure of one message never
    escapes: it lands in the second list. Only a failing commit raises (``StateError``:
    the disk, not a message)."""
    good: list[Msg] = []
    aggs: list[TelemetryAggregate] = []
    bad: list[tuple[Msg, str, str]] = []
    for msg in msgs:
        try:
            aggs.append(
                check_telemetry(msg, known, max_clock_skew=max_clock_skew, max_window_age=max_window_age)
            )
            good.append(msg)
        except Exception as exc:  # any failure of one message: dead-letter it, go on
            bad.append((msg, *failure_reason(exc)))
    if aggs:
        stored = [server_time(m) for m in good]
        digests = [hashlib.blake2b(m.data, digest_size=8).hexdigest() for m in good]
        _, rejected = await applier.apply_aggregates(js, aggs, stored, digests)
        if rejected:
            refused = {i for i, _ in rejected}
            bad += [(good[i], reason, "rejected") for i, reason in rejected]
            good = [m for i, m in enumerate(good) if i not in refused]
    return good, bad


class PullLoop:
    """A durable pull consumer fetched in batches, handing each batch to ``handle``."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        stream: str,
        subjects: list[str],
        durable: str,
        batch: int,
        fetch_timeout: float,
        ack_wait: float,
        handle: Callable[[list[Msg]], Awaitable[None]],
        ack_all: bool = False,
    ) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._subjects = subjects
        self._durable = durable
        self.durable = durable
        self._batch = batch
        self._timeout = fetch_timeout
        self._ack_wait = ack_wait
        self._handle = handle
        #: Ack policy "all": one ack per batch (acking a message acks every earlier one). Set
        #: from the consumer actually bound (an existing durable keeps its own policy).
        self.ack_all = ack_all
        self.batches = 0
        self.messages = 0
        self.idle_fetches = 0
        #: Seconds to handle each batch (decode, dedupe, state, drift, commit, ack): a
        #: ``prometheus_client`` histogram kept out of any registry; the cloud's collector
        #: exports it as ``slmops_cloud_ingest_batch_seconds`` (``analyst.metrics``).
        self.batch_seconds = batch_histogram()
        #: Times the range below a batch was re-read from the stream (``_recover``), and the
        #: messages found there that this instance had not been handed.
        self.recoveries = 0
        self.recovered = 0
        #: Ack-all only: the consumer sequence the next delivery must carry for this
        #: instance to have seen every delivery before it; None = unknown, so recover.
        self._next_cseq: int | None = None
        self._stop = False
        self._stopped = anyio.Event()

    def request_stop(self) -> None:
        """Stop after the current fetch and batch: a fetch cut off by cancellation leaves its
        pull request open on the server, and what it then delivers sits unacked for
        ``ack_wait`` (30 s by default) before anyone else may have it."""
        self._stop = True

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _errors(self) -> AbstractContextManager[None]:
        return nats_errors("consumer", f"{self._stream}/{self._durable}", url_of(self._js))

    async def _bind(self) -> None:
        """Bind the durable consumer, creating it when absent (an existing one keeps its own
        config, so its ack policy is read back from the server)."""
        config = js_api.ConsumerConfig(
            durable_name=self._durable,
            ack_policy=js_api.AckPolicy.ALL if self.ack_all else js_api.AckPolicy.EXPLICIT,
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_wait=self._ack_wait,
            # Room for the batch being handled and the one prefetched (``pull.py``).
            max_ack_pending=max(self._batch * 4, 1024),
            max_deliver=-1,
        )
        if len(self._subjects) > 1:
            config.filter_subjects = self._subjects
        else:
            config.filter_subject = self._subjects[0]
        try:
            with self._errors():
                info = await self._js.consumer_info(self._stream, self._durable)
        except NotFound:
            with self._errors():
                info = await self._js.add_consumer(self._stream, config)
        self.ack_all = info.config.ack_policy == js_api.AckPolicy.ALL
        # Deliveries before this bind that nobody acked (a predecessor killed mid-batch):
        # recover them before the first ack, which would cover them.
        pending = info.num_ack_pending or 0
        self._next_cseq = None if pending else (info.delivered.consumer_seq or 0) + 1
        room = info.config.max_ack_pending or 0
        if 0 < room < 2 * self._batch:
            log.warning(
                "consumer_max_ack_pending_small",
                durable=self._durable,
                max_ack_pending=room,
                batch=self._batch,
                hint="the next batch cannot be prefetched; raise it or lower batch_size",
            )
        log.info(
            "consumer_bound",
            stream=self._stream,
            durable=self._durable,
            subjects=self._subjects,
            ack_all=self.ack_all,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self._bind()
        try:
            async with PullBatches(self._nc, self._stream, self._durable) as pull:
                task_status.started()
                await self._consume(pull)
            self._stopped.set()
            await anyio.sleep_forever()  # stopped cleanly: wait to be cancelled with the group
        finally:
            self._stopped.set()

    async def _consume(self, pull: PullBatches) -> None:
        while not self._stop:
            try:
                msgs = await pull.fetch(self._batch, self._timeout)
            except ConsumerGone as exc:
                log.warning("consumer_gone", durable=self._durable, error=str(exc))
                await anyio.sleep(0.5)
                try:
                    await self._bind()
                except (NatsUnavailable, JetStreamRefused) as bind_exc:
                    log.warning("consumer_bind_failed", durable=self._durable, error=repr(bind_exc))
                continue
            except (PullError, NatsUnavailable, JetStreamRefused) as exc:
                # Disconnected or the server is restarting: nats-py reconnects on its own.
                # Deliveries may have been lost on the way: recover before the next ack.
                log.warning("fetch_failed", durable=self._durable, error=repr(exc))
                self._next_cseq = None
                await anyio.sleep(0.5)
                continue
            if not msgs:
                self.idle_fetches += 1
                continue
            self.batches += 1
            self.messages += len(msgs)
            recovered = True
            try:
                if self.ack_all and not self._contiguous(msgs):
                    try:
                        msgs = await self._recover(msgs)
                    except (NatsUnavailable, JetStreamRefused) as exc:
                        # As _recover's docstring says: the batch is nak'ed and fetched again.
                        # It used to escape and stop the whole service (seen at 100,000 nodes
                        # on a loaded machine: CONSUMER.INFO did not answer in time; issue 18).
                        log.warning("recover_failed", durable=self._durable, error=repr(exc))
                        recovered = False
                if recovered:
                    t0 = time.perf_counter()
                    await self._handle(msgs)
                    self.batch_seconds.observe(time.perf_counter() - t0)
            except BaseException:
                # Cancelled (lease lost, shutdown) or failed before acking: hand the rest
                # back at once rather than after ack_wait, so the next holder goes on.
                unacked = [m for m in msgs if not m.is_acked]
                if unacked:
                    with anyio.move_on_after(2, shield=True):
                        for m in unacked:
                            await m.nak()
                raise
            if not recovered:
                with anyio.move_on_after(2, shield=True):
                    for m in msgs:
                        await m.nak()
                self._next_cseq = None
                await anyio.sleep(0.5)

    def _contiguous(self, msgs: list[Msg]) -> bool:
        """True when this batch follows on the deliveries this instance saw (consumer
        sequences run on by one per delivery, redeliveries included). A jump means some
        delivery never reached this instance (a predecessor's batch, a connection lost
        mid-batch): under ack policy "all" our ack would cover it unapplied."""
        expect = self._next_cseq
        ok = expect is not None
        for m in msgs:
            meta = m.metadata
            if meta.sequence.consumer != expect:
                ok = False
            expect = meta.sequence.consumer + 1
        self._next_cseq = expect
        return ok

    async def _recover(self, msgs: list[Msg]) -> list[Msg]:
        """``msgs`` preceded by every message of the consumer's subjects between its ack
        floor and this batch that the batch does not hold, read again from the stream (an
        ephemeral, ack-less consumer). Applying those (dedupe drops the ones applied before)
        makes the batch's ack cover only applied messages. Raises ``NatsUnavailable`` or
        ``JetStreamRefused`` when the stream cannot be read: the batch is then nak'ed and
        fetched again."""
        with self._errors():
            info = await self._js.consumer_info(self._stream, self._durable)
        floor = info.ack_floor.stream_seq or 0
        held = {m.metadata.sequence.stream for m in msgs}
        top = max(held)
        if top <= floor + 1:
            return msgs
        name = f"{self._durable}-recover-{uuid.uuid4().hex[:8]}"
        config = js_api.ConsumerConfig(
            name=name,
            ack_policy=js_api.AckPolicy.NONE,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=floor + 1,
            inactive_threshold=_RECOVER_INACTIVE,
            max_deliver=1,
        )
        if len(self._subjects) > 1:
            config.filter_subjects = self._subjects
        else:
            config.filter_subject = self._subjects[0]
        with nats_errors("consumer", f"{self._stream}/{name}", url_of(self._js)):
            await self._js.add_consumer(self._stream, config)
        found: list[Msg] = []
        try:
            async with PullBatches(self._nc, self._stream, name, prefetch=False) as pull:
                done = False
                while not done:
                    got = await pull.fetch(self._batch, self._timeout)
                    if not got:
                        break
                    for m in got:
                        meta = m.metadata
                        seq = meta.sequence.stream
                        if seq >= top:
                            done = True
                            break
                        if seq not in held:
                            found.append(m)
                        if meta.num_pending == 0:
                            done = True
        finally:
            with anyio.move_on_after(_DEADLETTER_TIMEOUT, shield=True):
                try:
                    with nats_errors("consumer", f"{self._stream}/{name}", url_of(self._js)):
                        await self._js.delete_consumer(self._stream, name)
                except (NatsUnavailable, JetStreamRefused) as exc:
                    log.debug("recover_consumer_delete_failed", name=name, error=repr(exc))
        self.recoveries += 1
        self.recovered += len(found)
        log.warning(
            "ingest_recovered",
            durable=self._durable,
            ack_floor=floor,
            batch_first=min(held),
            batch_last=top,
            reread=len(found),
            note="deliveries this instance never saw, re-read from the stream before acking past them",
        )
        return sorted(found + msgs, key=lambda m: m.metadata.sequence.stream)


class DeadletterLimiter:
    """A token bucket per sender (message subject): ``burst`` dead letters at once, then
    ``rate`` per second. Bounded: past ``max_senders`` buckets the table starts afresh."""

    def __init__(self, rate: float = 0.2, burst: int = 20, max_senders: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max = max_senders
        self._buckets: dict[str, tuple[float, float]] = {}
        self._logged: dict[str, float] = {}

    def allow(self, sender: str, now: float | None = None) -> bool:
        t = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(sender, (float(self.burst), t))
        tokens = min(float(self.burst), tokens + (t - last) * self.rate)
        ok = tokens >= 1.0
        if len(self._buckets) >= self._max and sender not in self._buckets:
            self._buckets.clear()
        self._buckets[sender] = (tokens - 1.0 if ok else tokens, t)
        return ok

    def should_log(self, sender: str, every: float = 60.0) -> bool:
        """At most one log line per sender per ``every`` seconds."""
        t = time.monotonic()
        if t - self._logged.get(sender, -every) < every:
            return False
        if len(self._logged) >= self._max:
            self._logged.clear()
        self._logged[sender] = t
        return True


class Consumer(ABC):
    """A consumer of the active instance: a ``PullLoop`` on ``stream`` for the selected fleets
    (subjects ``slmops.<kind>.<fleet>.>``), handing each batch to ``handle``."""

    stream: ClassVar[str]
    kind: ClassVar[str]
    durable_base: ClassVar[str]
    ack_all: ClassVar[bool] = False

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        applier: Applier,
        *,
        fleets: Sequence[str],
        batch: int,
        fetch_timeout: float,
        ack_wait: float,
    ) -> None:
        self._js = js
        self._applier = applier
        self.limiter = DeadletterLimiter()
        self.deadlettered = 0
        self.suppressed = 0
        self.loop = PullLoop(
            nc,
            js,
            stream=self.stream,
            subjects=fleet_subjects(self.kind, fleets),
            durable=consumer_name(self.durable_base, fleets),
            batch=batch,
            fetch_timeout=fetch_timeout,
            ack_wait=ack_wait,
            handle=self.handle,
            ack_all=self.ack_all,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.loop.run(task_status=task_status)

    @abstractmethod
    async def handle(self, msgs: list[Msg]) -> None:
        """Apply one batch and settle (ack, dead-letter) its messages."""

    async def settle_bad(self, bad: Sequence[tuple[Msg, str, str]], *, until_stored: bool) -> None:
        """Dead-letter each ``(msg, reason, kind)``: a copy with the reason, then ``term()``.
        Copies are rate-limited per sender (subject, ``DeadletterLimiter``): beyond the
        limit a message is terminated without a copy and counted as ``deadletter_suppressed``,
        so a flood of poison cannot fill the dead-letter stream. ``until_stored``: retry a
        failed copy until stored (ack-all consumers) instead of nak'ing it."""
        stored = suppressed = 0
        for msg, reason, kind in bad:
            if not self.limiter.allow(msg.subject):
                await msg.term()
                suppressed += 1
                if self.limiter.should_log(msg.subject):
                    log.warning(
                        "deadletter_suppressed",
                        subject=msg.subject,
                        kind=kind,
                        reason=reason[:200],
                        note=f"over {self.limiter.burst} dead letters from this sender; "
                        "terminated without a copy",
                    )
                continue
            if until_stored:
                await deadletter_until_stored(self._js, msg, reason, kind)
                stored += 1
            else:
                stored += await deadletter(self._js, msg, reason, kind)
        self.deadlettered += stored
        self.suppressed += suppressed
        if stored or suppressed:
            await self._applier.count_deadletters(stored, suppressed)


class TelemetryIngest(Consumer):
    """The telemetry consumer of the active instance."""

    stream = TELEMETRY_STREAM
    kind = "telemetry"
    durable_base = "slmops-cloud"
    ack_all = True

    def __init__(
        self,
        *args: Any,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
        max_window_age: float = DEFAULT_MAX_WINDOW_AGE,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._known: set[str] = set()
        self._skew = max_clock_skew
        self._age = max_window_age

    async def handle(self, msgs: list[Msg]) -> None:
        good, bad = await ingest_batch(
            self._applier, self._js, msgs, self._known, max_clock_skew=self._skew, max_window_age=self._age
        )
        await self.settle_bad(bad, until_stored=self.loop.ack_all)
        if self.loop.ack_all:
            # One ack for the batch: every good message is at or below the last one, and
            # every bad one was copied and terminated above.
            # (Messages re-read by ``PullLoop._recover`` came through another consumer.)
            durable = self.loop.durable
            own = [m for m in good if m.metadata.consumer == durable]
            if own:
                await own[-1].ack()
        else:
            for msg in good:
                await msg.ack()
