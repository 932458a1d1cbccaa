"""KV ``slmops_fleetconfig`` as the cloud uses it (key layout: ``shared.names``), plus the
nodes of a fleet and their latest status, read from ``SLMOPS_STATUS``."""

from __future__ import annotations

import fnmatch

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from slmops.shared import names
from slmops.shared.errors import NotFound, WrongLastSequence
from slmops.shared.fleetconfig import ConfigRejected, FleetConfigDoc
from slmops.shared.jetstream import nats_errors
from slmops.shared.kv import kv_get, kv_keys
from slmops.shared.messages import NodeStatus, decode_json

__all__ = ["ConfigStore", "decode_doc", "select_nodes"]


def decode_doc(raw: bytes, where: str) -> FleetConfigDoc:
    """The document in ``raw`` (not verified: the nodes verify). Raises ``ConfigRejected``."""
    try:
        doc = msgspec.json.decode(raw, type=FleetConfigDoc)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ConfigRejected(f"{where}: {exc}") from exc
    if doc.signature is None:
        raise ConfigRejected(f"{where}: not signed")
    return doc


def select_nodes(known: list[str], selector: str) -> list[str]:
    """The nodes of ``known`` that ``selector`` names: comma-separated ids or shell-style
    patterns ("till-*"). Raises ``ValueError`` for a selector that names none."""
    parts = [p.strip() for p in selector.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"node selector {selector!r} names no node")
    out = sorted({n for n in known for p in parts if fnmatch.fnmatchcase(n, p)})
    literal = [p for p in parts if not any(c in p for c in "*?[")]
    for p in literal:  # a named node the cloud has not seen yet is still a target
        names.validate_id(p, "node")
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError(f"node selector {selector!r} matches none of the {len(known)} nodes seen")
    return sorted(out)


class ConfigStore:
    """The cloud's reads and writes of fleet configuration. ``await open()`` first."""

    def __init__(self, js: JetStreamContext, *, url: str = "<nats>") -> None:
        self.js = js
        self.url = url
        self._kv: KeyValue | None = None

    async def open(self) -> ConfigStore:
        with nats_errors("kv bucket", names.FLEETCONFIG_BUCKET, self.url):
            self._kv = await self.js.key_value(names.FLEETCONFIG_BUCKET)
        return self

    @property
    def closed(self) -> bool:
        """Whether ``open()`` is still to be called."""
        return self._kv is None

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("ConfigStore.open() first")
        return self._kv

    async def versions(self, fleet: str) -> list[int]:
        """Every version published for ``fleet``, ascending."""
        keys = await kv_keys(self.js, names.FLEETCONFIG_BUCKET, f"{names.validate_id(fleet, 'fleet')}._v.*")
        return sorted(int(k.rsplit(".", 1)[1]) for k in keys if k.rsplit(".", 1)[1].isdigit())

    async def version(self, fleet: str, version: int) -> bytes | None:
        entry = await kv_get(self.kv, f"{fleet}._v.{int(version)}", self.url)
        return None if entry is None else entry.value

    async def record_version(self, fleet: str, version: int, raw: bytes) -> None:
        """Store version ``version`` once. Raises ``ConfigRejected`` when it exists already
        (two operators raced: make a new version)."""
        try:
            with nats_errors("kv key", f"{fleet}._v.{version}", self.url):
                await self.kv.create(f"{fleet}._v.{int(version)}", raw)
        except WrongLastSequence as exc:
            raise ConfigRejected(f"version {version} of fleet {fleet} exists already", version) from exc

    async def write(self, fleet: str, raw: bytes, nodes: list[str] | None) -> None:
        """Make ``raw`` what ``nodes`` read (None: the fleet-wide key)."""
        keys = (
            [names.fleetconfig_key(fleet)]
            if nodes is None
            else [names.fleetconfig_key(fleet, n) for n in nodes]
        )
        for key in keys:
            with nats_errors("kv key", key, self.url):
                await self.kv.put(key, raw)

    async def current(self, fleet: str) -> dict[str, bytes]:
        """Key token (``_fleet`` or a node) -> the document it holds now."""
        out: dict[str, bytes] = {}
        for key in await kv_keys(self.js, names.FLEETCONFIG_BUCKET, f"{fleet}.*"):
            token = key.split(".", 1)[1]
            if token.startswith("_") and token != names.FLEET_WIDE:
                continue
            entry = await kv_get(self.kv, key, self.url)
            if entry is not None and entry.value:
                out[token] = entry.value
        return out

    async def known_nodes(self, fleet: str) -> list[str]:
        """The nodes of ``fleet`` that ever reported a status (still in ``SLMOPS_STATUS``)."""
        wanted = names.status_filter(fleet)
        prefix = wanted.removesuffix("*")
        with nats_errors("stream", names.STATUS_STREAM, self.url):
            info = await self.js.stream_info(names.STATUS_STREAM, subjects_filter=wanted)
        return sorted(s[len(prefix) :] for s in (info.state.subjects or {}))

    async def last_status(self, fleet: str, node: str) -> NodeStatus | None:
        """The node's latest status, or None (none stored, or undecodable)."""
        try:
            with nats_errors("stream", names.STATUS_STREAM, self.url):
                msg = await self.js.get_last_msg(names.STATUS_STREAM, names.status_subject(fleet, node))
        except NotFound:
            return None
        try:
            return decode_json(msg.data or b"", NodeStatus)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
