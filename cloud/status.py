"""Node status in: a durable pull consumer on ``SLMOPS_STATUS`` folded into the fleet state.

Status reports (JSON ``NodeStatus``) carry what aggregates do not: device profile, outbox
depth, drop counters, last error. A report older than the one applied is ignored, so
redelivery and reordering cannot roll a node's state back. Undecodable reports are
dead-lettered like telemetry.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.messages import NodeStatus, decode_json
from shared.names import STATUS_STREAM

from .apply import Applier
from .ingest import PullLoop, consumer_name, deadletter, fleet_subjects

__all__ = ["StatusIngest"]


class StatusIngest:
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
        self.loop = PullLoop(
            nc,
            js,
            stream=STATUS_STREAM,
            subjects=fleet_subjects("status", fleets),
            durable=consumer_name("slmops-cloud-status", fleets),
            batch=batch,
            fetch_timeout=fetch_timeout,
            ack_wait=ack_wait,
            handle=self.handle,
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        await self.loop.run(task_status=task_status)

    async def handle(self, msgs: list[Msg]) -> None:
        good: list[Msg] = []
        statuses: list[NodeStatus] = []
        bad: list[tuple[Msg, str]] = []
        for msg in msgs:
            try:
                st = decode_json(msg.data, NodeStatus)
                parts = msg.subject.split(".")
                if len(parts) != 4 or parts[2] != st.fleet or parts[3] != st.node:
                    raise ValueError(f"status of {st.fleet}.{st.node} on subject {msg.subject!r}")
                statuses.append(st)
                good.append(msg)
            except (msgspec.DecodeError, ValueError) as exc:
                bad.append((msg, str(exc)))
        if statuses:
            await self._applier.apply_statuses(statuses)
        for msg in good:
            await msg.ack()
        stored = 0
        for msg, reason in bad:
            stored += await deadletter(self._js, msg, reason, "status_invalid")
        if stored:
            await self._applier.count_deadletters(stored)
