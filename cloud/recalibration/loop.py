"""The closed loop: a confirmed fleet-wide label shift becomes a recalibrated model version.

On a drift event with ``scope="fleet"``, ``signal="class_prior"``, state ``opened``/``updated``
and ``estimated_priors`` — for the version the fleet runs now — the loop fetches that version's
bundles from the object store, builds the recalibrated version of each variant
(``cloud.recalibrate``: output bias += log(π'/π), reference re-derived for π'), signs them with
the cloud's key, pushes them (the registry verifies them like any push), and then, by policy:

* ``auto``: starts a staged rollout of the new version (``cloud.rollout``), whose gates judge
  it like any other version;
* ``suggest``: publishes a follow-up drift event (same ``id``, ``proposed_version`` set,
  ``suggested_action`` the command to run) and leaves the decision to a person;
* ``off``: ignores drift events.

One proposal per (fleet, model, parent version): it is recorded in KV ``slmops_loop`` before
the rollout starts, so repeated or redelivered events do not build or roll out twice.

**The cloud's signing key.** A file holding the Ed25519 private key (``slmops keys new``
writes ``<name>.key`` with mode 0600), given by ``--key`` or ``SLMOPS_CLOUD_KEY``; the file is
refused when group or others can read it. Nodes trust its public key (``<name>.pub``) with
``--trust``. Rotation without a gap: make a new pair; give every node both public keys
(``--trust old.pub --trust new.pub``) and restart them; point the cloud at the new key; once
every version still in use is signed by the new key, drop ``old.pub`` from the nodes.
"""

from __future__ import annotations

import stat
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.kv import KeyValue

from slmops.cloud.config import RolloutConfig
from slmops.cloud.errors import CloudError
from slmops.cloud.recalibration.recalibrate import RecalibrationError, recalibrate_bundle
from slmops.cloud.registry import Registry, RegistryError
from slmops.cloud.rollout.assign import Assigner, start_rollout, variants_of
from slmops.cloud.rollout.state import RolloutError, RolloutStore
from slmops.shared import names
from slmops.shared.bundle import Bundle, TrustStore, load_private_key
from slmops.shared.errors import BundleError, JetStreamRefused, NatsUnavailable
from slmops.shared.jetstream import ensure_kv, nats_errors, url_of
from slmops.shared.kv import kv_get
from slmops.shared.messages import DriftEvent, ModelManifest, decode_json, encode_json
from slmops.shared.vocabulary import DriftKind, DriftSignal

__all__ = [
    "LOOP_CONSUMER",
    "KeyFileError",
    "Policy",
    "Proposal",
    "RecalibrationLoop",
    "is_label_shift",
    "load_cloud_key",
    "run_loop",
]

log = structlog.get_logger(__name__)

#: KV bucket of proposals, key ``<fleet>.<model>.<parent version>``.
Policy = Literal["auto", "suggest", "off"]


class KeyFileError(CloudError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cloud signing key {path}: {reason}")


def load_cloud_key(path: Path) -> Ed25519PrivateKey:
    """The cloud's private key from ``path``; ``KeyFileError`` when missing, unreadable,
    readable by group/others (it must be 0600 or stricter), or not an Ed25519 key."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as exc:
        raise KeyFileError(str(path), f"cannot read: {exc.strerror}") from exc
    # What the file is comes first: "chmod 600 it" is wrong advice for a public key given here.
    try:
        key = load_private_key(Path(path))
    except (BundleError, ValueError, OSError) as exc:
        raise KeyFileError(str(path), str(exc)) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(str(path), f"mode {stat.S_IMODE(mode):o} lets others read it; chmod 600 it")
    return key


class Proposal(msgspec.Struct, kw_only=True):
    """What the loop did about one label-shift event."""

    fleet: str
    model: str
    parent_version: int
    version: int
    variants: list[str]
    priors: dict[str, float]
    event_id: str
    policy: str
    #: "building" (recorded before the build), "rollout_started", "suggested", or
    #: "rollout_refused: <reason>".
    outcome: str
    rollout: str | None = None
    time: datetime


_proposal_decoder = msgspec.json.Decoder(Proposal)


def is_label_shift(event: DriftEvent) -> bool:
    """A confirmed fleet-wide class-prior shift with an estimate, not one of our follow-ups."""
    return (
        event.kind == DriftKind.DRIFT  # never skew alone, nor a baseline
        and event.scope == "fleet"
        and event.signal == DriftSignal.CLASS_PRIOR
        and event.state in ("opened", "updated")
        and bool(event.estimated_priors)
        and event.proposed_version is None
    )


class RecalibrationLoop:
    """``await on_drift(event)`` for each drift event (see the module docstring)."""

    def __init__(
        self,
        js: JetStreamContext,
        key: Ed25519PrivateKey,
        *,
        policy: Policy = "suggest",
        rollout: RolloutConfig | None = None,
        cooldown: float = 600.0,
        url: str = "<nats>",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if policy not in ("auto", "suggest", "off"):
            raise ValueError(f"policy must be auto, suggest or off, got {policy!r}")
        self._js = js
        self._key = key
        self._trust = TrustStore([key.public_key()])
        self.policy = policy
        self.rollout = rollout or RolloutConfig()
        if not cooldown >= 0:
            raise ValueError(f"cooldown must be >= 0 seconds, got {cooldown!r}")
        #: Seconds after a recalibrated version was proposed during which a drift event on that
        #: version does not start another recalibration: the new version's reference comes
        #: from an estimate, and residual differences must not chain v2 -> v3 -> v4.
        self.cooldown = cooldown
        self._url = url
        self._clock = clock
        self.registry = Registry(js, url=url)
        self.store = RolloutStore(js, url=url)
        self._assigner = Assigner(js, self.registry, url=url)
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            with nats_errors("kv bucket", names.LOOP_BUCKET, self._url), anyio.fail_after(10):
                self._kv = await ensure_kv(self._js, names.LOOP_BUCKET)
        return self._kv

    async def proposal(self, fleet: str, model: str, parent: int) -> Proposal | None:
        """The proposal recorded for ``parent``'s version, if any. Raises ``NatsUnavailable``
        or ``JetStreamRefused``."""
        kv = await self._bucket()
        key = _proposal_key(fleet, model, parent)
        entry = await kv_get(kv, key, self._url)
        if entry is None:
            return None
        try:
            return _proposal_decoder.decode(entry.value or b"")
        except msgspec.DecodeError:
            return None

    async def _record(self, p: Proposal) -> None:
        kv = await self._bucket()
        key = _proposal_key(p.fleet, p.model, p.parent_version)
        with nats_errors("kv key", key, self._url), anyio.fail_after(10):
            await kv.put(key, msgspec.json.encode(p))

    async def on_drift(self, event: DriftEvent) -> Proposal | None:
        """Act on one drift event; None when it is not for the loop (or policy is off).
        Raises ``NatsUnavailable`` (retry later) or ``CloudError`` (this event cannot be acted
        on: no reference priors, the bundle does not recalibrate...); ``JetStreamRefused`` when
        JetStream refuses a read or write (retried later as well)."""
        if self.policy == "off" or not is_label_shift(event):
            return None
        fleet, model, parent = event.fleet, event.model.name, event.model.version
        current = await self._assigner.current(fleet, None)
        if current is None or (current.model, current.version) != (model, parent):
            log.info("recalibration_skipped", fleet=fleet, reason="the fleet no longer runs this version",
                     drift_event=event.id)  # fmt: skip
            return None
        done = await self.proposal(fleet, model, parent)
        if done is None and await self._cooling_down(fleet, model, parent, event.model.variant):
            log.info("recalibration_cooldown", fleet=fleet, version=parent, cooldown_s=self.cooldown,
                     drift_event=event.id)  # fmt: skip
            return None
        if done is not None and done.outcome != "building":
            log.info(
                "recalibration_already_proposed", fleet=fleet, version=done.version, drift_event=event.id
            )
            # Again, in case the first follow-up was lost between the record and the publish
            # (a redelivered event has the same Nats-Msg-Id: the stream drops the duplicate).
            await self._follow_up(event, done)
            return done
        priors = dict(event.estimated_priors or {}) if done is None else done.priors
        if done is None:  # the version is chosen and recorded first: a restart reuses it
            version = await self._next_version(model, parent)
        else:
            version = done.version
        proposal = Proposal(
            fleet=fleet,
            model=model,
            parent_version=parent,
            version=version,
            variants=[],
            priors=priors,
            event_id=event.id,
            policy=self.policy,
            outcome="building",
            time=self._clock(),
        )
        await self._record(proposal)
        variants = await self._build(model, parent, priors, version)
        proposal = msgspec.structs.replace(proposal, variants=variants, outcome="suggested")
        if self.policy == "auto":
            try:
                state = await start_rollout(
                    self._js, self.registry, self.store,
                    fleet=fleet, version=version, model=model, config=self.rollout,
                    extra={"trigger": f"drift {event.id}"},
                )  # fmt: skip
                proposal = msgspec.structs.replace(proposal, outcome="rollout_started", rollout=state.id)
            except RolloutError as exc:
                proposal = msgspec.structs.replace(proposal, outcome=f"rollout_refused: {exc.reason}")
        await self._record(proposal)
        await self._follow_up(event, proposal)
        log.info("recalibration_proposed", fleet=fleet, model=model, parent=parent, version=version,
                 outcome=proposal.outcome, priors=priors)  # fmt: skip
        return proposal

    async def _cooling_down(self, fleet: str, model: str, version: int, variant: str) -> bool:
        """True while ``version`` is a recalibration this loop proposed less than ``cooldown``
        seconds ago."""
        if self.cooldown <= 0:
            return False
        try:
            manifest = await self.registry.manifest(model, version, variant)
        except RegistryError:
            return False
        if manifest is None or manifest.parent_version is None:
            return False
        made = await self.proposal(fleet, model, manifest.parent_version)
        if made is None or made.version != version:
            return False
        return (self._clock() - made.time).total_seconds() < self.cooldown

    async def _manifests(self) -> list[ModelManifest]:
        try:
            return await self.registry.manifests()
        except RegistryError as exc:
            raise NatsUnavailable(self._url, f"list manifests: {exc.reason}") from exc

    async def _next_version(self, model: str, parent: int) -> int:
        version = 1 + max((m.version for m in await self._manifests() if m.name == model), default=parent)
        while await variants_of(self.registry, model, version):  # a short listing: look again
            version += 1
        return version

    async def _build(self, model: str, parent: int, priors: dict[str, float], version: int) -> list[str]:
        """Recalibrate every variant of ``parent`` into ``version`` and push them; variants
        already there (pushed before a restart) are kept."""
        parents = list((await variants_of(self.registry, model, parent)).values())
        if not parents:
            raise RecalibrationError(model, f"version {parent} is not in the registry")
        have = set(await variants_of(self.registry, model, version))
        pushed: list[str] = []
        with tempfile.TemporaryDirectory(prefix="slmops-recal-") as tmp:
            for m in parents:
                if m.variant in have:
                    pushed.append(m.variant)
                    continue
                work = Path(tmp) / m.variant
                bundle = await self._fetch(model, parent, m.variant, work)
                try:
                    new = await anyio.to_thread.run_sync(
                        lambda b=bundle, w=work: recalibrate_bundle(  # type: ignore[misc]
                            b, priors, key=self._key, version=version, out_dir=w / "new"
                        )
                    )
                except (RecalibrationError, ValueError, BundleError) as exc:
                    if m.variant == "fp32" or len(parents) == 1:
                        raise RecalibrationError(model, f"variant {m.variant}: {exc}") from exc
                    log.warning("recalibration_variant_skipped", variant=m.variant, error=str(exc))
                    continue
                await self.registry.push(new, self._trust)
                pushed.append(m.variant)
        return pushed

    async def _fetch(self, model: str, version: int, variant: str, work: Path) -> Bundle:
        try:
            with anyio.fail_after(120):
                return await self.registry.fetch_bundle(model, version, variant, work)
        except TimeoutError as exc:
            raise NatsUnavailable(self._url, f"fetch {model}/{version}/{variant}: timed out") from exc

    async def _follow_up(self, event: DriftEvent, p: Proposal) -> None:
        """The drift event again, naming the proposed version (both policies: the record of
        what the loop did travels where analysts already look)."""
        action = (
            f"rollout {p.rollout} started for version {p.version}"
            if p.rollout is not None
            else f"slmops rollout start --fleet {p.fleet} --model {p.model} --version {p.version}"
        )
        follow = msgspec.structs.replace(
            event, state="updated", proposed_version=p.version, suggested_action=action, time=self._clock()
        )
        subject = names.drift_subject(event.fleet)
        with nats_errors("publish", subject, self._url), anyio.fail_after(10):
            await self._js.publish(
                subject, encode_json(follow), headers={"Nats-Msg-Id": f"{event.id}:proposal:{p.version}"}
            )


def _proposal_key(fleet: str, model: str, parent: int) -> str:
    return (
        f"{names.validate_id(fleet, 'fleet')}.{names.validate_model_name(model).replace('.', '_')}.{parent}"
    )


#: Durable consumer of the loop on ``SLMOPS_DRIFT``; it starts with events published after its
#: creation (old events are history, not orders).
LOOP_CONSUMER = names.LOOP_CONSUMER


async def run_loop(
    js: JetStreamContext,
    loop: RecalibrationLoop,
    *,
    durable: str = LOOP_CONSUMER,
    fetch_timeout: float = 1.0,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Feed ``loop`` every drift event, once: a durable pull consumer, acknowledged after the
    event was acted on. An event that does not decode, or cannot be acted on, is logged and
    terminated; NATS trouble while acting asks for redelivery later."""
    config = js_api.ConsumerConfig(
        durable_name=durable,
        deliver_policy=js_api.DeliverPolicy.NEW,
        ack_policy=js_api.AckPolicy.EXPLICIT,
        ack_wait=300.0,  # a recalibration (fetch, build, verify, push) takes seconds
        max_deliver=20,
        filter_subject=names.DRIFT_ALL,
    )
    with nats_errors("consumer", durable, url_of(js)):
        sub = await js.pull_subscribe(
            names.DRIFT_ALL, durable=durable, stream=names.DRIFT_STREAM, config=config
        )
    task_status.started()
    while True:
        try:
            msgs = await sub.fetch(8, timeout=fetch_timeout)
        except TimeoutError:  # nats-py raises both its own and asyncio's TimeoutError here
            continue
        for msg in msgs:
            try:
                event = decode_json(msg.data, DriftEvent)
            except msgspec.DecodeError as exc:  # ValidationError included
                log.warning("drift_event_undecodable", subject=msg.subject, error=str(exc))
                await msg.term()
                continue
            try:
                await loop.on_drift(event)
            except (NatsUnavailable, JetStreamRefused) as exc:
                log.warning("recalibration_retry", drift_event=event.id, error=str(exc))
                await msg.nak(delay=5.0)
                continue
            except CloudError as exc:
                log.error("recalibration_failed", drift_event=event.id, error=str(exc))
                await msg.term()
                continue
            await msg.ack()
