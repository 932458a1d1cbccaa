"""Node status in: a durable pull consumer on ``SLMOPS_STATUS`` folded into the fleet state.

Status reports (JSON ``NodeStatus``) carry what aggregates do not: device profile, outbox
depth, drop counters, last error. A report older than the one applied is ignored, so
redelivery and reordering cannot roll a node's state back. Undecodable reports are
dead-lettered like telemetry.
"""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg

from slmops.cloud.ingest.consumers import Consumer, deadletter
from slmops.shared.messages import NodeStatus, decode_json
from slmops.shared.names import STATUS_STREAM

__all__ = ["StatusIngest"]


class StatusIngest(Consumer):
    """The node-status consumer of the active instance."""

    stream = STATUS_STREAM
    kind = "status"
    durable_base = "slmops-cloud-status"

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
