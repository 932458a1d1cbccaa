"""The node's side of pushed fleet configuration (``shared.fleetconfig``; issue 17).

``resolve`` turns a pushed document into the node's effective ``EdgeConfig``: always from the
node's *local* config (its file and flags), never from the previous pushed one, so every
document is a whole description and a rollback is exact. Rules, in order:

* a key this build does not know: refused, unless the document's ``schema`` is newer than
  ``fc.FLEETCONFIG_SCHEMA`` (then skipped, with a warning listing them);
* a key (or ``safety.x`` / ``refresh.x``) named in the local ``pin`` list: the local value
  stays, with a warning ("local flags win");
* the privacy floors stay on the device: ``min_count`` never below the local one,
  ``dp_epsilon`` never above it (nor off when it is on), ``dp_budget`` never above it (nor
  unlimited when it is limited): such a value is held at the local one, with a warning;
* the result is validated as a local config would be; a bad value refuses the document.

``ConfigFollower`` runs in the node's task group. While online it reads the node's own key
and its fleet's key (``names.fleetconfig_key``) by direct gets, on every (re)connect, on a
wake-up (a core subscription to the keys' ``$KV`` subjects: no consumer) and every
``refresh.poll_interval``; it takes the newest version of the two, verified against the
node's trust store as it is at that moment (``--trust`` keys with the fleet's key list applied:
a key the list adds signs, a retired or compromised one does not), only if it is newer than
every version seen (no replay). Once applied, a version is on *probation* for
``PROBATION_S``: if the node cannot publish a status in that time (it cannot reach NATS)
or its safety monitor rolls a model back meanwhile, the node returns
to its last good configuration on its own, marks the version bad and reports
``config_rolled_back`` with the reason once it can. The last good document is kept in
``<data>/fleetconfig.json`` and applied at the next start before anything connects.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import anyio
import msgspec
import structlog

from slmops.edge.config import EdgeConfig, RefreshTimings, SafetyLimits
from slmops.shared import fleetconfig as fc
from slmops.shared import names
from slmops.shared.atomic import write_atomic
from slmops.shared.bundle import TrustStore
from slmops.shared.config import parse_duration, parse_size
from slmops.shared.connect import Link, LinkState
from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.jetstream import nats_errors
from slmops.shared.kv import kv_get_direct
from slmops.shared.vocabulary import NodeEvent

__all__ = ["PROBATION_S", "ConfigFollower", "Hooks", "Resolved", "resolve"]

log = structlog.get_logger(__name__)

#: Seconds a newly applied version must show the node reaching NATS (a status published) with
#: no safety rollback before it counts as good: several connect attempts (``shared.connect``
#: bounds one at 6 s, first retries after 0.5-1 s) and a few status intervals' worth of
#: inference for the safety monitor.
PROBATION_S = 20.0
_LEVELS = ("debug", "info", "warning", "error")
_TABLES: dict[str, type[msgspec.Struct]] = {"safety": SafetyLimits, "refresh": RefreshTimings}
_NATS_ERRORS = (NatsUnavailable, JetStreamRefused, OSError)


class Resolved(NamedTuple):
    """What a document makes of the node: its config, log level (None: unchanged) and the
    warnings (skipped, pinned and held keys)."""

    config: EdgeConfig
    log_level: str | None
    warnings: list[str]


def _table(local: EdgeConfig, top: str, value: object, schema: int, warnings: list[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fc.ConfigRejected(f"{top} must be a table, got {type(value).__name__}")
    known = _TABLES[top].__struct_fields__
    out = msgspec.structs.asdict(getattr(local, top))
    unknown = []
    for key, sub in value.items():
        name = f"{top}.{key}"
        if key not in known:
            unknown.append(name)
        elif name in local.pin:
            warnings.append(f"{name}: pinned locally, kept {out[key]!r}")
        else:
            out[key] = sub
    if unknown and schema <= fc.FLEETCONFIG_SCHEMA:
        raise fc.ConfigRejected(f"unknown keys {unknown} (schema {schema})")
    if unknown:
        warnings.append(f"unknown keys of schema {schema} skipped: {unknown}")
    return out


def _floors(
    local: EdgeConfig, typed: EdgeConfig, changes: Mapping[str, Any], warnings: list[str]
) -> dict[str, Any]:
    """The privacy settings to hold at the node's own floors (module docstring), judged on
    ``typed``: the document's values as the node would take them (``EdgeConfig.replace``
    converts ``"1000"`` to 1000.0 and ``2.0`` to 2), so a value of another JSON type cannot
    slip past. Returns key -> the local value to keep."""
    held: dict[str, Any] = {}
    if typed.min_count < local.min_count:
        warnings.append(
            f"min_count: {changes.get('min_count')!r} is below this node's floor {local.min_count}; kept it"
        )
        held["min_count"] = local.min_count
    for key in ("dp_epsilon", "dp_budget"):
        mine, pushed = getattr(local, key), getattr(typed, key)
        if mine is not None and (pushed is None or pushed > mine):
            warnings.append(f"{key}: {changes.get(key)!r} is looser than this node's {mine!r}; kept it")
            held[key] = mine
    return held


#: Ranges a *pushed* value must fall in, beyond a local config's own rules: one signed
#: document must not be able to make every node spin (a 1 ns window) or stall (a year's poll).
_PUSH_BOUNDS: dict[str, tuple[float, float]] = {
    "window": (0.1, 86_400.0),
    "publish_timeout": (0.1, 600.0),
    "status_interval": (1.0, 86_400.0),
    "min_count": (1, 1_000_000),
    "outbox_max_bytes": (1024, 1 << 40),
    "refresh.poll_interval": (1.0, 86_400.0),
    "refresh.op_timeout": (0.5, 600.0),
    "refresh.retry_initial": (0.1, 3600.0),
    "safety.interval": (0.1, 3600.0),
}


def _bounds(changes: Mapping[str, Any]) -> None:
    for name, (low, high) in _PUSH_BOUNDS.items():
        top, _, sub = name.partition(".")
        value = changes.get(top)
        if sub:
            value = value.get(sub) if isinstance(value, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise fc.ConfigRejected(
                f"{name} must be a number in [{low:g}, {high:g}] when pushed, got {value!r}"
            )


def _named(name: str, parse: Callable[[str], Any], value: str) -> Any:
    try:
        return parse(value)
    except ValueError as exc:
        raise fc.ConfigRejected(f"{name}: {exc}") from exc


def resolve(local: EdgeConfig, settings: Mapping[str, Any], *, schema: int) -> Resolved:
    """The node's config with ``settings`` (a document's) applied by the module's rules.
    Raises ``fc.ConfigRejected`` with the reason."""
    if not isinstance(settings, Mapping):
        raise fc.ConfigRejected(f"settings must be an object, got {type(settings).__name__}")
    warnings: list[str] = []
    unknown = sorted(str(k) for k in settings if k not in fc.PUSHABLE)
    if unknown and schema <= fc.FLEETCONFIG_SCHEMA:
        raise fc.ConfigRejected(f"unknown keys {unknown} (schema {schema}; pushable: {sorted(fc.PUSHABLE)})")
    if unknown:
        warnings.append(f"unknown keys of schema {schema} skipped: {unknown}")
    changes: dict[str, Any] = {}
    log_level: str | None = None
    for key, value in settings.items():
        if key not in fc.PUSHABLE:
            continue
        if key in local.pin:
            kept = "(unchanged)" if key == "log_level" else repr(getattr(local, key))
            warnings.append(f"{key}: pinned locally, kept {kept}")
            continue
        if key in _TABLES:
            changes[key] = _table(local, key, value, schema, warnings)
        elif key == "log_level":
            if not isinstance(value, str) or value.lower() not in _LEVELS:
                raise fc.ConfigRejected(f"log_level must be one of {list(_LEVELS)}, got {value!r}")
            log_level = value.lower()
        else:
            changes[key] = value
    try:
        for key in ("window", "publish_timeout", "status_interval", "outbox_max_bytes"):
            if isinstance(changes.get(key), str):
                parse = parse_size if key == "outbox_max_bytes" else parse_duration
                changes[key] = _named(key, parse, changes[key])
        for sub, value in list(changes.get("refresh", {}).items()):
            if isinstance(value, str):
                changes["refresh"][sub] = _named(f"refresh.{sub}", parse_duration, value)
        changes.update(_floors(local, local.replace(**changes), changes, warnings))
        _bounds(changes)
        config = local.replace(**changes)
    except (ValueError, TypeError, OverflowError, msgspec.ValidationError) as exc:
        raise fc.ConfigRejected(str(exc)) from exc
    return Resolved(config, log_level, warnings)


class _Saved(msgspec.Struct, kw_only=True):
    """``<data>/fleetconfig.json``."""

    good: str | None = None  #: the last good document, as stored (JSON text)
    highest: int = 0  #: the newest version seen (older ones are never taken again)
    bad: dict[str, str] = {}  #: version -> why it was refused or rolled back


class Hooks(NamedTuple):
    """What the follower calls on the node."""

    #: Put a configuration into effect (``EdgeNode._apply_config``).
    apply: Callable[[Resolved], None]
    #: Publish a status with an event now; returns whether it was sent.
    report: Callable[..., Awaitable[bool]]


class ConfigFollower:
    """See the module docstring. ``startup()`` before the node builds its parts; ``run``
    until cancelled; ``status_fields()`` for each status message."""

    #: Monotonic seconds (the probation's clock); a test may replace it.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(
        self, local: EdgeConfig, trust: Callable[[], TrustStore], hooks: Hooks | None = None
    ) -> None:
        """``trust``: the node's trust store *now* (its ``--trust`` keys with the fleet's key
        list applied, ``edge.keys``), read at every check, so a key the list adds signs
        documents and one it retires or marks compromised no longer does. ``hooks``: how to
        put a configuration into effect and to publish a status (the node's; without them the
        follower only decides)."""
        self.local = local
        self.trust = trust
        #: Set by the node once its link exists (before ``run``).
        self.link: Link
        self.report = hooks.report if hooks else None
        self.apply = hooks.apply if hooks else None
        self._path = local.data_path / "fleetconfig.json"
        self._keys = (names.fleetconfig_key(local.fleet, local.node), names.fleetconfig_key(local.fleet))
        self.saved = self._load()
        self.good: fc.FleetConfigDoc | None = None
        self.current: Resolved = Resolved(local, None, [])
        #: (version, state, reason) of the last version seen: status ``config_*`` fields.
        self.seen: tuple[int | None, str, str | None] = (None, "", None)
        self._probation: int | None = None
        self._tripped: str | None = None
        self._wake: anyio.Event | None = None
        self._reported_bad: set[str] = set()

    # -- persistence ------------------------------------------------------------------------

    def _load(self) -> _Saved:
        try:
            return msgspec.json.decode(self._path.read_bytes(), type=_Saved)
        except FileNotFoundError:
            return _Saved()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("fleetconfig_state_unreadable", path=str(self._path), error=str(exc))
            return _Saved()

    def _save(self) -> None:
        write_atomic(self._path, msgspec.json.encode(self.saved), prefix=".fleetconfig-")

    # -- start ------------------------------------------------------------------------------

    def startup(self) -> Resolved:
        """The configuration to start with: the last good pushed document (checked again),
        else the local config."""
        if self.saved.good is None:
            return self.current
        try:
            doc = fc.verify_config(self.saved.good.encode(), self.trust(), "saved fleet config")
            resolved = resolve(self.local, doc.settings, schema=doc.schema)
        except fc.ConfigRejected as exc:
            log.error("fleetconfig_saved_refused", error=str(exc), note="starting with the local config")
            return self.current
        self.good, self.current = doc, resolved
        self.seen = (doc.version, "applied", None)
        return resolved

    def status_fields(self) -> dict[str, Any]:
        """``NodeStatus`` fields describing the configuration in effect."""
        version, state, reason = self.seen
        in_effect = (
            self._probation if self._probation is not None else (self.good.version if self.good else None)
        )
        return {
            "config_version": in_effect,
            "config_seen": version,
            "config_state": state,
            "config_reason": reason,
            "config_warnings": list(self.current.warnings),
        }

    def safety_tripped(self, why: str) -> None:
        """The safety monitor rolled a model back: a version on probation is undone."""
        if self._probation is not None:
            self._tripped = why

    # -- the service ------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the fleet configuration until cancelled (module docstring)."""
        while True:
            raw = await self._next_document()
            await self._take(raw)

    async def _next_document(self) -> bytes:
        """Wait online for a stored document newer than every version seen."""
        while True:
            await self.link.wait_online()
            try:
                raw = await self._session()
            except _NATS_ERRORS as exc:
                log.info("fleetconfig_session_ended", error=f"{type(exc).__name__}: {exc}")
                raw = None
            if raw is not None:
                return raw
            if self.link.state is LinkState.ONLINE:
                await anyio.sleep(1.0)

    async def _session(self) -> bytes | None:
        lost = anyio.Event()
        unsubscribe = self.link.on_change(lambda s: lost.set() if s is not LinkState.ONLINE else None)
        subs: list[Any] = []
        found: bytes | None = None
        try:
            nc = self.link.nc

            async def wake(_msg: Any) -> None:
                if self._wake is not None:
                    self._wake.set()

            with nats_errors("subscribe", "fleet config", self.link.url):
                for key in self._keys:
                    subs.append(await nc.subscribe(f"$KV.{names.FLEETCONFIG_BUCKET}.{key}", cb=wake))
            async with anyio.create_task_group() as tg:

                async def stop_when_offline() -> None:
                    await lost.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_when_offline)
                while found is None:
                    self._wake = anyio.Event()
                    found = await self._check()
                    if found is None:
                        with anyio.move_on_after(self.current.config.refresh.poll_interval):
                            await self._wake.wait()
                tg.cancel_scope.cancel()
        finally:
            unsubscribe()
            with anyio.move_on_after(1.0, shield=True):
                for sub in subs:
                    try:
                        await sub.unsubscribe()
                    except Exception as exc:  # offline: the server drops it on its own
                        log.debug("fleetconfig_unsubscribe_failed", error=repr(exc))
        return found

    async def _check(self) -> bytes | None:
        """The newest stored document not seen yet, or None. Verifies signatures here, so a
        bad document is reported once and never stops the node following later good ones."""
        js = self.link.js
        best: tuple[int, bytes] | None = None
        for key in self._keys:
            with anyio.fail_after(self.current.config.refresh.op_timeout):
                raw = await kv_get_direct(js, names.FLEETCONFIG_BUCKET, key)
            if raw is None:
                continue
            try:
                doc = fc.verify_config(raw, self.trust(), f"fleet config {key}")
                if doc.fleet != self.local.fleet:
                    raise fc.ConfigRejected(f"fleet config {key}: it is for fleet {doc.fleet!r}", doc.version)
            except fc.ConfigRejected as exc:
                await self._refuse_unreadable(raw, exc)
                continue
            if doc.version > self.saved.highest and (best is None or doc.version > best[0]):
                best = (doc.version, raw)
        return None if best is None else best[1]

    async def _refuse_unreadable(self, raw: bytes, exc: fc.ConfigRejected) -> None:
        """A stored document that does not verify or decode: reported once per content."""
        import hashlib

        digest = hashlib.sha256(raw).hexdigest()
        if digest in self._reported_bad:
            return
        self._reported_bad.add(digest)
        log.error("fleetconfig_rejected", error=str(exc))
        self.seen = (exc.version, "rejected", exc.reason)
        await self._report(NodeEvent.CONFIG_REJECTED)

    async def _report(self, event: str) -> None:
        if self.report is not None:
            try:
                await self.report(event)
            except Exception as exc:  # a status is a snapshot: the next one says it again
                log.warning("fleetconfig_report_failed", error=repr(exc))

    async def _take(self, raw: bytes) -> None:
        try:
            doc = fc.verify_config(raw, self.trust())
        except fc.ConfigRejected as exc:  # verified in _check, but the key list changed since
            await self._refuse_unreadable(raw, exc)
            return
        self.saved.highest = doc.version
        try:
            resolved = resolve(self.local, doc.settings, schema=doc.schema)
        except fc.ConfigRejected as exc:
            self._mark_bad(doc.version, exc.reason)
            log.error("fleetconfig_rejected", version=doc.version, reason=exc.reason)
            self.seen = (doc.version, "rejected", exc.reason)
            await self._report(NodeEvent.CONFIG_REJECTED)
            return
        self._save()
        previous = self.current
        reconnect = resolved.config.nats_url != previous.config.nats_url
        connects = self.link.statistics().connects
        self._apply(resolved)
        self._probation, self._tripped = doc.version, None
        self.seen = (doc.version, "probation", None)
        log.info(
            "fleetconfig_applied", version=doc.version, warnings=resolved.warnings, probation_s=PROBATION_S
        )
        reason = await self._watch_probation(connects if reconnect else None)
        self._probation = None
        if reason is None:
            self.good = doc
            self.saved.good = raw.decode()
            self.seen = (doc.version, "applied", None)
            self._save()
            await self._report(NodeEvent.CONFIG_APPLIED)
            return
        self._apply(previous)
        self._mark_bad(doc.version, reason)
        self.seen = (doc.version, "rolled_back", reason)
        log.error(
            "fleetconfig_rolled_back",
            version=doc.version,
            reason=reason,
            back_to=self.good and self.good.version,
        )
        # Once the old settings let it reach NATS again, say so (retried: offline now).
        with anyio.move_on_after(PROBATION_S * 3):
            while not await self._report_when_online(NodeEvent.CONFIG_ROLLED_BACK):
                await self.link.wait_online()

    async def _report_when_online(self, event: str) -> bool:
        if self.report is None or self.link.state is not LinkState.ONLINE:
            return False
        if await self.report(event):
            return True
        await anyio.sleep(0.5)  # online but the publish failed: do not spin
        return False

    def _apply(self, resolved: Resolved) -> None:
        self.current = resolved
        if self.apply is not None:
            self.apply(resolved)

    def _mark_bad(self, version: int, reason: str) -> None:
        self.saved.bad[str(version)] = reason[:500]
        while len(self.saved.bad) > 32:  # keep the newest few
            self.saved.bad.pop(min(self.saved.bad, key=int))
        self._save()

    def _online(self, connects: int | None) -> bool:
        """Online, and (``connects`` given: the URL changed) on a connection made since."""
        if self.link.state is not LinkState.ONLINE:
            return False
        return connects is None or self.link.statistics().connects > connects

    async def _watch_probation(self, connects: int | None) -> str | None:
        """None when the applied version proved good within ``PROBATION_S``, else why not.
        ``connects``: the link's connect count before a URL change (then only a connection
        made since proves anything)."""
        deadline = self.clock() + PROBATION_S
        reached = False
        while True:
            if self._tripped is not None:
                return f"safety monitor tripped: {self._tripped}"
            if not reached and self._online(connects):
                reached = self.report is None or await self.report(NodeEvent.CONFIG_APPLIED)
            if self.clock() >= deadline:
                break
            await anyio.sleep(0.25)
        if not reached:
            stats = self.link.statistics()
            why = stats.last_error or stats.state.value
            return f"could not reach NATS within {PROBATION_S:g} s of applying ({why})"
        return None
