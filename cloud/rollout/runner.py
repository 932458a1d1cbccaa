"""Feeds a ``RolloutController`` from NATS and steps it: the rollout service.

It runs its own consumers rather than hooking into the ingest path: an ordered consumer on
``SLMOPS_STATUS`` starting with the last status of every node, and an ordered consumer on
``SLMOPS_TELEMETRY`` starting at the creation of the oldest active rollout (live only, when
none is active). Both are ephemeral: after a restart the controller re-reads what it needs
from the streams, and the metrics count each ``(node, seq)`` once, so nothing durable has to
be acknowledged and nothing is counted twice. Rollout state itself lives in KV.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import anyio
import anyio.abc
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api

from slmops.cloud.registry import Registry
from slmops.cloud.rollout.assign import Assigner
from slmops.cloud.rollout.controller import RolloutController
from slmops.cloud.rollout.state import RolloutStore
from slmops.shared import names
from slmops.shared.backoff import Backoff
from slmops.shared.config import positive
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, SlmopsError
from slmops.shared.jetstream import nats_errors
from slmops.shared.messages import NodeStatus, RolloutEvent, decode_json, decode_telemetry, encode_json

__all__ = ["RolloutRunner"]

log = structlog.get_logger(__name__)

#: Longest wait for the status replay before the first step.
_SYNC_TIMEOUT = 5.0


class RolloutRunner:
    """``await tg.start(runner.run)``: consumers + a step every ``interval`` seconds, until
    cancelled. ``controller`` is public for inspection."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        url: str = "<nats>",
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        node_ttl_s: float = 900.0,
        fleets: Sequence[str] = (),
    ) -> None:
        """``fleets``: advance only these fleets' rollouts (empty: all)."""
        self.interval = positive("interval", interval)
        self._js = js
        self._url = url
        self._clock = clock
        self.store = RolloutStore(js, url=url)
        self.registry = Registry(js, url=url)
        self.controller = RolloutController(
            Assigner(js, self.registry, url=url),
            self.store,
            self._publish,
            node_ttl_s=node_ttl_s,
            fleets=fleets,
        )
        self.bad_messages = 0
        self.skipped = 0
        self._synced = anyio.Event()

    async def _publish(self, fleet: str, event: RolloutEvent, msg_id: str) -> None:
        subject = names.rollout_subject(fleet)
        try:
            with anyio.fail_after(10), nats_errors("stream publish", subject, self._url):
                await self._js.publish(subject, encode_json(event), headers={"Nats-Msg-Id": msg_id})
        except TimeoutError as exc:  # ours; JetStream's refusals and nats-py's errors are mapped
            raise NatsUnavailable(self._url, f"publish rollout event {msg_id}: timed out") from exc

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        states = [s for s, _ in await self.store.all() if s.active or s.phase != "done"]
        self.controller.load(states)
        start = min((s.created for s in states), default=None)
        if start is None:
            tele_config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW)
        else:
            tele_config = js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
                opt_start_time=datetime.fromtimestamp(start - 1, UTC),
            )
        self._synced = anyio.Event()
        try:
            with anyio.fail_after(30), nats_errors("rollout consumers", names.STATUS_STREAM, self._url):
                status_sub = await self._js.subscribe(
                    names.STATUS_ALL,
                    ordered_consumer=True,
                    config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT),
                )
                tele_sub = await self._js.subscribe(
                    names.TELEMETRY_ALL, ordered_consumer=True, config=tele_config
                )
                info = await self._js.stream_info(names.STATUS_STREAM)
        except TimeoutError as exc:  # ours, as above
            raise NatsUnavailable(self._url, "rollout consumers: not created within 30 s") from exc
        if not info.state.messages:
            self._synced.set()
        log.info("rollout_runner_started", active=len(states), replay_from=start)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._statuses, status_sub, name="rollout-status")
                tg.start_soon(self._telemetry, tele_sub, name="rollout-telemetry")
                tg.start_soon(self._stepper, name="rollout-step")
                task_status.started()
        finally:
            with anyio.move_on_after(2, shield=True):
                for sub in (status_sub, tele_sub):
                    # The connection may already be gone.
                    with (
                        contextlib.suppress(NatsUnavailable, JetStreamRefused),
                        nats_errors("subscription", str(sub.subject), self._url),
                    ):
                        await sub.unsubscribe()

    async def _statuses(self, sub: object) -> None:
        async for msg in sub.messages:  # type: ignore[attr-defined]
            try:
                self.controller.observe_status(
                    decode_json(msg.data, NodeStatus), msg.metadata.timestamp.timestamp()
                )
            except msgspec.DecodeError as exc:
                self.bad_messages += 1
                log.warning("status_undecodable", subject=msg.subject, error=str(exc))
            if msg.metadata.num_pending == 0:
                self._synced.set()

    async def _telemetry(self, sub: object) -> None:
        async for msg in sub.messages:  # type: ignore[attr-defined]
            # slmops.telemetry.<fleet>.<node>: most fleets have no rollout most of the time.
            parts = msg.subject.split(".")
            if len(parts) != 4 or not self.controller.wants(parts[2]):
                self.skipped += 1
                continue
            try:
                self.controller.observe_aggregate(decode_telemetry(msg.data))
            except msgspec.DecodeError as exc:
                self.bad_messages += 1
                log.warning("telemetry_undecodable", subject=msg.subject, error=str(exc))

    async def _stepper(self) -> None:
        # The first step waits for the nodes' last statuses (bounded: a stream that only
        # holds other subjects never says it is done), so a restarted controller does not
        # judge a stage on a fleet it has not re-read yet.
        with anyio.move_on_after(_SYNC_TIMEOUT):
            await self._synced.wait()
        crashes = Backoff(self.interval, max(self.interval, 60.0))
        while True:
            delay = self.interval
            try:
                await self.controller.step(self._clock())
                crashes.reset()
            except SlmopsError as exc:  # NATS down for a moment: try again next step
                log.warning("rollout_step_unavailable", error=str(exc))
            except Exception:
                # A bug must not take the cloud service down with it: log it with its
                # traceback and try again, backing off so it does not flood the log.
                delay = crashes.next()
                log.exception("rollout_step_crashed", retry_in=delay)
            await anyio.sleep(delay)
