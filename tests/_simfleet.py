"""A fleet of lightweight simulated nodes for rollout tests, on a real NATS server.

Each node follows its assignment the way a real node does (its own key ``<fleet>.<node>``
overrides the fleet-wide key), reports ``NodeStatus`` on the status subject when its model
changes (``model_installed``/``model_rejected``), and publishes a ``TelemetryAggregate`` every
tick whose numbers depend on the version it runs (``Profile``): so a "bad" version has the
latency, errors or class mix the test gives it. Nodes record every version they ever ran.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.abc
import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from _models import EDGES
from slmops.shared import names
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    Assignment,
    DeviceProfile,
    ModelRef,
    NodeStatus,
    Privacy,
    RefreshResult,
    TelemetryAggregate,
    decode_json,
    encode_json,
    encode_telemetry,
)


@dataclass(frozen=True)
class Profile:
    """What a version's traffic looks like on a node, per tick."""

    latency_ms: float = 1.5
    error_rate: float = 0.0
    mix: dict[str, float] = field(default_factory=lambda: {"alpha": 0.4, "beta": 0.35, "gamma": 0.25})
    confidence: float = 0.85
    #: Share of the answers the apps' feedback marks right (every answer gets feedback).
    accuracy: float = 0.9
    #: The node refuses to install this version (status model_rejected, smoke_failed).
    reject: bool = False


@dataclass
class SimNode:
    name: str
    memory_mb: int
    model: ModelRef | None = None
    previous: ModelRef | None = None
    seq: int = 0
    history: list[ModelRef] = field(default_factory=list)
    rejected: set[int] = field(default_factory=set)
    own: Assignment | None = None
    #: Versions this node alone refuses to install (its smoke test fails here).
    refuse: set[int] = field(default_factory=set)
    #: Versions this node installs, then leaves on its own (local safety rollback).
    abandon: set[int] = field(default_factory=set)


class SimFleet:
    """``await tg.start(fleet.run)``; ``nodes`` by name; ``ran(version)`` who ever ran it."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        fleet: str,
        *,
        n: int,
        model: str,
        profiles: dict[int, Profile],
        start: ModelRef,
        tick: float = 0.05,
        per_tick: int = 40,
        small_every: int = 2,
    ) -> None:
        self.nc, self.js, self.fleet, self.model = nc, js, fleet, model
        self.profiles = profiles
        self.tick, self.per_tick = tick, per_tick
        # Node ids carry the fleet, so tests sharing a server never mix up their nodes (and the
        # stream's duplicate window keeps them apart whichever Nats-Msg-Id form is used).
        self.nodes = {
            name: SimNode(name, memory_mb=128 if i % small_every == 0 else 4096, model=start)
            for i, name in ((i, f"{fleet}-n{i:02d}") for i in range(n))
        }
        for node in self.nodes.values():
            node.history.append(start)
        self.fleet_wide: Assignment | None = None
        self.lost = 0

    def ran(self, version: int) -> set[str]:
        return {n.name for n in self.nodes.values() if any(r.version == version for r in n.history)}

    def running(self, version: int) -> set[str]:
        return {n.name for n in self.nodes.values() if n.model is not None and n.model.version == version}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        kv = await self.js.key_value(names.ASSIGNMENTS_BUCKET)
        watcher = await kv.watch(f"{self.fleet}.>")
        for node in self.nodes.values():
            await self._status(node, "connect")
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._follow, watcher)
            tg.start_soon(self._telemetry)
            task_status.started()

    async def _follow(self, watcher: object) -> None:
        while True:
            entry = await watcher.updates(timeout=None)  # type: ignore[attr-defined]
            if entry is None:  # end of the initial values
                continue
            token = entry.key.split(".", 1)[1]
            gone = entry.operation in ("DEL", "PURGE")
            value = None if gone else decode_json(entry.value, Assignment)
            if token == names.FLEET_WIDE:
                self.fleet_wide = value
                targets = [n for n in self.nodes.values() if n.own is None]
            elif token in self.nodes:
                self.nodes[token].own = value
                targets = [self.nodes[token]]
            else:
                continue
            for node in targets:
                await self._apply(node)

    async def _apply(self, node: SimNode) -> None:
        a = node.own or self.fleet_wide
        if a is None or a.model != self.model:
            return
        variant = a.variant or ("int8" if node.memory_mb < 256 and "int8" in a.variants else "fp32")
        ref = ModelRef(name=a.model, version=a.version, variant=variant)
        if node.model == ref:
            return
        if node.previous == ref and a.version in node.abandon:
            return  # abandoned here already: a real node's block list keeps it off
        if self.profiles.get(a.version, Profile()).reject or a.version in node.refuse:
            if a.version not in node.rejected:
                node.rejected.add(a.version)
                await self._status(
                    node,
                    "model_rejected",
                    refresh=RefreshResult(
                        model=ref, ok=False, code="smoke_failed", reason="smoke test 0 differs"
                    ),
                )
            return
        node.previous, node.model = node.model, ref
        node.history.append(ref)
        await self._status(node, "model_installed", refresh=RefreshResult(model=ref, ok=True))
        if a.version in node.abandon:
            node.previous, node.model = node.model, node.previous
            node.history.append(node.model)  # type: ignore[arg-type]
            await self._status(node, "rollback", last_error=f"safety rollback from version {a.version}")

    async def _status(self, node: SimNode, event: str, **fields: object) -> None:
        status = NodeStatus(
            fleet=self.fleet,
            node=node.name,
            time=datetime.now(UTC),
            event=event,
            device=DeviceProfile(memory_mb=node.memory_mb, cores=2),
            model=node.model,
            previous_model=node.previous,
        )
        if fields:
            status = msgspec.structs.replace(status, **fields)
        await self._send(names.status_subject(self.fleet, node.name), encode_json(status))

    async def _telemetry(self) -> None:
        for _ in itertools.count():
            for node in self.nodes.values():
                if node.model is not None:
                    agg = self.aggregate(node)
                    await self._send(
                        names.telemetry_subject(self.fleet, node.name),
                        encode_telemetry(agg),
                        {"Nats-Msg-Id": names.msg_id(node.name, agg.seq)},
                    )
            await anyio.sleep(self.tick)

    async def _send(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish, or drop it while the server is away (a real node would keep it in its
        outbox; for the rollout the next window carries the same picture)."""
        try:
            await self.js.publish(subject, data, headers=headers, timeout=2)
        except (TimeoutError, nats.errors.Error, OSError):
            self.lost += 1

    def window(self, node: SimNode, **stats: Any) -> TelemetryAggregate:
        """The next aggregate of ``node``: its seq advanced, a window ending now, k = 1, and
        the statistics ``stats`` (the fields of ``TelemetryAggregate`` past its identity)."""
        assert node.model is not None
        node.seq += 1
        now = datetime.now(UTC)
        return TelemetryAggregate(
            fleet=self.fleet,
            node=node.name,
            model=node.model,
            seq=node.seq,
            window_start=now,
            window_end=now,
            privacy=Privacy(k=1),
            **stats,
        )

    def aggregate(self, node: SimNode) -> TelemetryAggregate:
        assert node.model is not None
        p = self.profiles.get(node.model.version, Profile())
        n = self.per_tick
        counts = {label: round(share * n) for label, share in p.mix.items()}
        conf = Histogram.empty(EDGES.confidence)
        conf.add(p.confidence, n)
        lat = Histogram.empty(EDGES.latency_ms)
        lat.add(p.latency_ms, n)
        length = Histogram.empty(EDGES.input_length)
        length.add(5, n)
        right = round(p.accuracy * n)
        feedback = {"alpha": {"alpha": right, "beta": n - right}}
        return self.window(
            node,
            count=n,
            errors=round(p.error_rate * n),
            class_counts=counts,
            confidence=conf,
            input_length=length,
            latency_ms=lat,
            feedback=feedback,
        )
