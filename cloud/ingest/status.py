"""Node status in: a durable pull consumer on ``SLMOPS_STATUS`` folded into the fleet state.

Status reports (JSON ``NodeStatus``) carry what aggregates do not: device profile, outbox
depth, drop counters, last error. A report stored (JetStream time) before the one applied is
ignored, so redelivery and reordering cannot roll a node's state back; the node's own clock
orders nothing (issue 13 fault 6), its offset to the server is reported as clock skew. Undecodable reports are
dead-lettered like telemetry.
"""

from __future__ import annotations

from nats.aio.msg import Msg

from slmops.cloud.ingest.checks import MAX_COUNT
from slmops.cloud.ingest.consumers import Consumer, failure_reason, server_time
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
                if st.time.tzinfo is None or st.time.utcoffset() is None:
                    raise ValueError(f"$.time must carry a time zone, got {st.time.isoformat()!r}")
                for name in ("outbox_depth", "buffer_bytes", "dropped_inferences",
                             "dropped_aggregates", "served", "last_seq"):  # fmt: skip
                    value = getattr(st, name)
                    if not 0 <= value <= MAX_COUNT:
                        raise ValueError(f"$.{name} must be in 0..{MAX_COUNT}, got {value!r}")
                statuses.append(st)
                good.append(msg)
            except Exception as exc:  # any failure of one message: dead-letter it, go on
                bad.append((msg, failure_reason(exc)[0]))
        if statuses:
            await self._applier.apply_statuses(statuses, [server_time(m) for m in good])
        for msg in good:
            await msg.ack()
        await self.settle_bad([(m, reason, "status_invalid") for m, reason in bad], until_stored=False)
