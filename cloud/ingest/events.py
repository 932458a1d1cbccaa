"""Drift events out: JSON on ``slmops.drift.<fleet>`` (stream ``SLMOPS_DRIFT``).

Events enter the SQLite outbox in the same transaction as the state change that caused them
(``state.StateStore.commit``); ``EventPublisher`` then publishes each with
``Nats-Msg-Id = event.id``. The id is deterministic (fleet, scope, node, model, signal,
episode, state), so a publish retried after a timeout or a crash is stored once by JetStream
within its duplicate window, and the outbox row is deleted only after the PubAck.
"""

from __future__ import annotations

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from slmops.cloud.ingest.state import StateStore
from slmops.shared.backoff import Backoff
from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.jetstream import nats_errors, url_of
from slmops.shared.messages import DriftEvent, encode_json
from slmops.shared.names import drift_subject

__all__ = ["EventPublisher", "encode_event"]

log = structlog.get_logger(__name__)

_PUBLISH_TIMEOUT = 5.0
_RETRY = (0.5, 10.0)


def encode_event(event: DriftEvent) -> tuple[str, str, bytes]:
    """The outbox row of an event: ``(id, subject, json)``."""
    return event.id, drift_subject(event.fleet), encode_json(event)


class EventPublisher:
    """Drains the event outbox to JetStream. ``wake()`` after a commit that added events."""

    def __init__(
        self, js: JetStreamContext, store: StateStore, pending: list[tuple[str, str, bytes]]
    ) -> None:
        self._js = js
        self._store = store
        self._pending = list(pending)
        self._wake = anyio.Event()
        self.published = 0
        if self._pending:
            self._wake.set()

    def add(self, rows: list[tuple[str, str, bytes]]) -> None:
        """Queue committed outbox rows for publishing."""
        if rows:
            self._pending.extend(rows)
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = Backoff(*_RETRY)
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._pending:
                event_id, subject, data = self._pending[0]
                try:
                    with (
                        anyio.fail_after(_PUBLISH_TIMEOUT),
                        nats_errors("stream publish", subject, url_of(self._js)),
                    ):
                        await self._js.publish(subject, data, headers={"Nats-Msg-Id": event_id})
                except (NatsUnavailable, JetStreamRefused, TimeoutError) as exc:
                    delay = backoff.next()
                    log.warning("drift_event_publish_failed", id=event_id, error=repr(exc), retry_in=delay)
                    await anyio.sleep(delay)
                    continue
                backoff.reset()
                await self._store.outbox_done([event_id])
                self._pending.pop(0)
                self.published += 1
                log.info("drift_event_published", id=event_id, subject=subject)
