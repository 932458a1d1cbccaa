"""Which nodes a view of the fleet shows, and which of them are online: one rule for
``slmops fleet status`` / ``slmops status`` (``overview``), the console's ``/api/fleet`` and
``/metrics`` (``cloud.analyst``).

Online: the node's last message is at most ``ONLINE_WITHIN_S`` old. The command line judges
it by the NATS server's clock (``overview.server_time``); the cloud service by its own.

Forgotten: ``slmops fleet forget`` (``overview.forget_node``) writes
``_forgotten.<fleet>.<node>`` in KV ``slmops_fleet`` with the node's ``last_seen`` at that
moment. Views hide a node while its ``last_seen`` is not newer than that (``is_hidden``);
nothing in the cloud's state is touched, so its dedupe state (per-install seq high-water
marks, install ids, counts) stays, and a forgotten node that sends again reappears, its
messages counted exactly once. Fleet ids start with a letter or digit, so these keys never
collide with a node's ``<fleet>.<node>`` key.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from nats.js import JetStreamContext

from slmops.shared import names
from slmops.shared.errors import NotFound
from slmops.shared.jetstream import nats_errors
from slmops.shared.kv import kv_values

__all__ = ["FORGOTTEN_PREFIX", "ONLINE_WITHIN_S", "Forgotten", "forgotten", "is_hidden", "is_online"]

#: A node heard from within this many seconds is online (four default status periods of 30 s).
ONLINE_WITHIN_S = 120.0
FORGOTTEN_PREFIX = "_forgotten"


class Forgotten(msgspec.Struct, kw_only=True):
    """KV ``slmops_fleet`` value of ``_forgotten.<fleet>.<node>``."""

    fleet: str
    node: str
    #: The node's last_seen (server time) when it was forgotten: a newer one brings it back.
    last_seen: datetime | None
    #: Server time of the forget.
    at: datetime


async def forgotten(js: JetStreamContext, fleet: str | None = None) -> dict[tuple[str, str], Forgotten]:
    """The forget records (of ``fleet``), by (fleet, node); undecodable ones are left out, and
    a missing bucket (the cloud never ran) holds none. Raises ``NatsUnavailable``."""
    key_filter = f"{FORGOTTEN_PREFIX}.{fleet}.*" if fleet else f"{FORGOTTEN_PREFIX}.>"
    try:
        with nats_errors("kv bucket", names.FLEET_BUCKET):
            values = await kv_values(js, names.FLEET_BUCKET, key_filter)
    except NotFound:
        return {}
    out = {}
    for value in values.values():
        try:
            f = msgspec.json.decode(value, type=Forgotten)
        except msgspec.DecodeError:
            continue
        out[(f.fleet, f.node)] = f
    return out


def is_hidden(last_seen: datetime | None, record: Forgotten | None) -> bool:
    """Whether a node last heard at ``last_seen`` is hidden by its forget ``record``: it has
    not sent anything since it was forgotten."""
    if record is None:
        return False
    return last_seen is None or (record.last_seen is not None and last_seen <= record.last_seen)


def is_online(last_seen: datetime | None, now: datetime) -> bool:
    """Whether a node last heard at ``last_seen`` is online at ``now`` (same clock)."""
    return last_seen is not None and (now - last_seen).total_seconds() <= ONLINE_WITHIN_S
