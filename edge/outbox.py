"""Store-and-forward: publish the outbox to JetStream while the link is online (docs/architecture.md §5).

Each aggregate goes out with ``Nats-Msg-Id = <fleet>/<node>/<install>:<seq>``
(``shared.names.msg_id``; the fleet keeps two fleets' ``n1`` apart in the one stream, the
install id a wiped database's new ``seq`` 1 apart from the old one; a legacy database without
an install id publishes ``<fleet>/<node>:<seq>``) and leaves the outbox only after
its PubAck. Rows are marked "attempted" (committed) before the first send, so compaction never
renumbers a ``seq`` the server may already hold (a ghost write of a timed-out publish).

Up to ``max_in_flight`` publishes are pending at once, each with its own timeout (nats-py's
futures may never resolve on a server error, docs/architecture.md §9). They are started in
``seq`` order on one connection, so the server receives them in order. When one fails the round stops, acked
rows are deleted, and the rest are retried after a backoff — the server drops the repeats by
``Nats-Msg-Id`` within its duplicate window, and the cloud by ``(install, seq)`` after that.
Nothing is published while the link is not online.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import anyio
import structlog

from slmops.edge.buffer import Buffer
from slmops.edge.errors import StoreError
from slmops.shared.backoff import Backoff
from slmops.shared.connect import Link
from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.jetstream import nats_errors
from slmops.shared.names import msg_id

__all__ = ["Publisher"]

log = structlog.get_logger(__name__)

#: How often an idle publisher looks at the outbox even without a signal.
_IDLE_POLL = 1.0


class Publisher:
    """Publishes the outbox; ``run`` until cancelled. ``statistics`` for health/metrics."""

    def __init__(
        self,
        buffer: Buffer,
        link: Link,
        *,
        subject: str,
        fleet: str,
        node: str,
        max_in_flight: int,
        timeout: float,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        rng: random.Random | None = None,
        backoff: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        self.buffer = buffer
        self.link = link
        self.subject = subject
        self.fleet = fleet
        self.node = node
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self._sleep = sleep
        self._retry = Backoff(*backoff, jitter=True, rng=rng if rng is not None else random.Random())
        self.published = 0
        self.duplicates = 0
        self.failures = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        failures = 0
        while True:
            await self.link.wait_online()
            changed = self.buffer.outbox_changed
            acked: list[int] = []
            rows: list[tuple[int, bytes]] = []
            try:
                rows = await self.buffer.outbox_take(self.max_in_flight)
                if not rows:
                    with anyio.move_on_after(_IDLE_POLL):
                        await changed.wait()
                    continue
                acked, error = await self._round(rows)
                if acked:
                    # On a failing disk the acked rows stay and go out again later: the
                    # server (msg id) and the cloud (install, seq) drop the repeats.
                    await self.buffer.outbox_done(acked)
            except StoreError as exc:
                error = f"outbox: {exc}"
            if error is None:
                failures = 0
                continue
            failures += 1
            self.failures += 1
            self.last_error = error
            delay = self._retry.delay(failures)
            log.warning(
                "publish_failed",
                error=error,
                acked=len(acked),
                pending=len(rows) - len(acked),
                retry_in=round(delay, 3),
            )
            await self._sleep(delay)

    async def _round(self, rows: list[tuple[int, bytes]]) -> tuple[list[int], str | None]:
        """Publish ``rows`` concurrently (in order); returns the acked seqs and the first error."""
        results: dict[int, str | None] = {}
        async with anyio.create_task_group() as tg:
            for seq, payload in rows:
                tg.start_soon(self._one, seq, payload, results)
        acked = [seq for seq, _ in rows if results.get(seq, "not sent") is None]
        errors = [results[seq] for seq, _ in rows if results.get(seq) is not None]
        return acked, errors[0] if errors else None

    def _msg_id(self, seq: int) -> str:
        return msg_id(self.node, seq, fleet=self.fleet, install=self.buffer.install)

    async def _one(self, seq: int, payload: bytes, results: dict[int, str | None]) -> None:
        try:
            js = self.link.js
            with (
                anyio.fail_after(self.timeout + 1.0),
                nats_errors("stream publish", self.subject, self.link.url),
            ):
                ack = await js.publish(
                    self.subject,
                    payload,
                    timeout=self.timeout,
                    headers={"Nats-Msg-Id": self._msg_id(seq)},
                )
        except (NatsUnavailable, JetStreamRefused, TimeoutError) as exc:
            results[seq] = f"seq {seq}: {type(exc).__name__}: {exc}"
            return
        results[seq] = None
        self.published += 1
        if getattr(ack, "duplicate", False):
            self.duplicates += 1
