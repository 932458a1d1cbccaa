"""NATS resource names and subject builders: part of the wire contract (docs/architecture.md §3)."""

from __future__ import annotations

import re

__all__ = [
    "ASSIGNMENTS_BUCKET",
    "BASELINE_SUBJECT",
    "DEADLETTER_STREAM",
    "DEADLETTER_SUBJECT",
    "DRIFT_ALL",
    "DRIFT_STREAM",
    "EVENTS_ALL",
    "EVENTS_STREAM",
    "FLEET_BUCKET",
    "FLEET_WIDE",
    "LEASES_BUCKET",
    "LOOP_BUCKET",
    "LOOP_CONSUMER",
    "MODELS_BUCKET",
    "MODELS_MANIFEST_BUCKET",
    "ROLLOUTS_BUCKET",
    "ROLLOUT_ALL",
    "ROLLOUT_STREAM",
    "STATUS_ALL",
    "STATUS_STREAM",
    "TELEMETRY_ALL",
    "TELEMETRY_STREAM",
    "WEBHOOK_CONSUMER",
    "assignment_key",
    "bundle_index_key",
    "drift_subject",
    "events_subject",
    "file_object_name",
    "inbox_prefix",
    "manifest_key",
    "model_object_name",
    "msg_id",
    "rollout_subject",
    "status_subject",
    "telemetry_filter",
    "telemetry_subject",
    "validate_id",
    "validate_model_name",
    "watch_consumer",
    "watch_inbox",
]

TELEMETRY_STREAM = "SLMOPS_TELEMETRY"
DRIFT_STREAM = "SLMOPS_DRIFT"
STATUS_STREAM = "SLMOPS_STATUS"
ROLLOUT_STREAM = "SLMOPS_ROLLOUT"
DEADLETTER_STREAM = "SLMOPS_DEADLETTER"
EVENTS_STREAM = "SLMOPS_EVENTS"
DEADLETTER_SUBJECT = "slmops.deadletter"
ASSIGNMENTS_BUCKET = "slmops_assignments"
MODELS_BUCKET = "slmops_models"
MODELS_MANIFEST_BUCKET = "slmops_manifests"
#: The cloud's own buckets: single-active leases, the fleet snapshot read by ``fleet status``,
#: rollout states, and the recalibration loop's proposals.
LEASES_BUCKET = "slmops_leases"
FLEET_BUCKET = "slmops_fleet"
ROLLOUTS_BUCKET = "slmops_rollouts"
LOOP_BUCKET = "slmops_loop"
#: Durable consumer of the recalibration loop on ``DRIFT_STREAM``.
LOOP_CONSUMER = "slmops_loop"
#: Durable consumer (name base) of the drift webhook on ``DRIFT_STREAM``.
WEBHOOK_CONSUMER = "slmops_webhook"
#: Subject filters: every message of one kind, of every fleet.
TELEMETRY_ALL = "slmops.telemetry.>"
STATUS_ALL = "slmops.status.>"
DRIFT_ALL = "slmops.drift.>"
ROLLOUT_ALL = "slmops.rollout.>"
EVENTS_ALL = "slmops.events.>"
#: Request/reply subject on which the active cloud sets a drift baseline for an analyst.
BASELINE_SUBJECT = "slmops.cloud.baseline"
#: The assignment key token that applies to every node of a fleet without a key of its own.
#: Node ids may not start with "_", so it cannot collide with a node.
FLEET_WIDE = "_fleet"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid fleet or node id, else raise ``ValueError``.

    An id is one NATS subject token: 1-64 characters of ``[A-Za-z0-9_-]``, starting with a
    letter or digit (a leading ``_`` is reserved for slmops' own keys).
    """
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    if not _ID.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ -, "
            "starting with a letter or digit (it becomes one NATS subject token)"
        )
    return value


def validate_model_name(value: object) -> str:
    """Return ``value`` if it is a valid model name (letters, digits, ``_ . -``)."""
    if not isinstance(value, str) or not _MODEL.fullmatch(value):
        raise ValueError(f"model name {value!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def telemetry_subject(fleet: str, node: str) -> str:
    return f"slmops.telemetry.{validate_id(fleet, 'fleet')}.{validate_id(node, 'node')}"


def status_subject(fleet: str, node: str) -> str:
    return f"slmops.status.{validate_id(fleet, 'fleet')}.{validate_id(node, 'node')}"


def telemetry_filter(fleet: str) -> str:
    """Every node's telemetry subject of one fleet."""
    return f"slmops.telemetry.{validate_id(fleet, 'fleet')}.>"


def drift_subject(fleet: str) -> str:
    return f"slmops.drift.{validate_id(fleet, 'fleet')}"


def events_subject(fleet: str) -> str:
    """Subject of the cloud's operational events (``OpsEvent``) about a fleet."""
    return f"slmops.events.{validate_id(fleet, 'fleet')}"


def rollout_subject(fleet: str) -> str:
    return f"slmops.rollout.{validate_id(fleet, 'fleet')}"


def assignment_key(fleet: str, node: str | None = None, model: str | None = None) -> str:
    """KV key of a node's assignment, or of the fleet-wide default when ``node`` is None:
    ``<fleet>.<node>`` / ``<fleet>._fleet`` name the node's default model (the only keys a
    single-model node reads); with ``model``, ``<fleet>.<node>.<model>`` /
    ``<fleet>._fleet.<model>`` assign that model beside the others (issue 11: a node serves
    several models, assignments are keyed by node and model name; a model name may hold dots,
    so it is the rest of the key)."""
    token = FLEET_WIDE if node is None else validate_id(node, "node")
    key = f"{validate_id(fleet, 'fleet')}.{token}"
    return key if model is None else f"{key}.{validate_model_name(model)}"


def model_object_name(model: str, version: int, variant: str) -> str:
    """Object-store name of one bundle archive: ``<model>/<version>/<variant>``."""
    return f"{validate_model_name(model)}/{int(version)}/{validate_id(variant, 'variant')}"


def manifest_key(model: str, version: int, variant: str) -> str:
    """KV key (in ``slmops_manifests``) of one bundle's manifest: ``<model>.<version>.<variant>``."""
    name = validate_model_name(model).replace(".", "_")
    return f"{name}.{int(version)}.{validate_id(variant, 'variant')}"


def file_object_name(sha256: str) -> str:
    """Object-store name of one bundle file (or raw manifest), content-addressed:
    ``files/<sha256>``; the same bytes are stored once whatever bundles list them."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"files/{sha256}"


def bundle_index_key(model: str, version: int, variant: str) -> str:
    """KV key (in ``slmops_manifests``) of a bundle's small index (``BundleIndex``):
    ``_files.<manifest_key>``. Model names start with a letter or digit, so no manifest key
    starts with "_" and listing manifests skips these."""
    return f"_files.{manifest_key(model, version, variant)}"


def msg_id(node: str, seq: int, fleet: str | None = None, install: str = "") -> str:
    """The ``Nats-Msg-Id`` of a telemetry aggregate: ``<node>:<seq>``, with ``fleet``
    ``<fleet>/<node>:<seq>``, and with ``install`` too ``<fleet>/<node>/<install>:<seq>``.
    Nodes publish the fleet form: the server dedupes per stream, and SLMOPS_TELEMETRY holds
    every fleet, so two fleets' ``n1:1`` inside the duplicate window would otherwise make the
    server drop the second as a duplicate. The install id keeps a new install's ``seq`` 1
    (a wiped or quarantined database) apart from the old install's."""
    if fleet is None:
        return f"{node}/{install}:{seq}" if install else f"{node}:{seq}"
    return f"{fleet}/{node}/{install}:{seq}" if install else f"{fleet}/{node}:{seq}"


def _watch_kind(own: bool, models: bool) -> str:
    return ("own" if own else "fleet") + ("-models" if models else "")


def watch_consumer(fleet: str, node: str, *, own: bool, models: bool = False) -> str:
    """The name of node ``node``'s consumer watching, on ``KV_slmops_assignments``, its own
    assignment key (``own``) or its fleet's key, or with ``models`` the per-model keys under
    it (``<key>.>``, models served side by side, issue 11):
    ``w~<fleet>~<node>~own|fleet|own-models|fleet-models``. Node credentials may create
    exactly these four consumers (deploy/nats), so one node holds at most four there (issue
    13 fault 11); ``~`` is in no id, so two fleets' names never meet."""
    kind = _watch_kind(own, models)
    return f"w~{validate_id(fleet, 'fleet')}~{validate_id(node, 'node')}~{kind}"


def watch_filter(fleet: str, node: str, *, own: bool, models: bool = False) -> str:
    """The one subject the watch ``watch_consumer`` filters on: the key's KV subject, or with
    ``models`` every per-model key under it (``$KV.<bucket>.<key>.>``)."""
    key = assignment_key(fleet, validate_id(node, "node") if own else None)
    return f"$KV.{ASSIGNMENTS_BUCKET}.{key}" + (".>" if models else "")


def watch_inbox(node: str, *, own: bool, models: bool = False) -> str:
    """The fixed subject the watch ``watch_consumer`` delivers to, under the node's inbox
    prefix: a restarted node re-creates its watch with the same config (so the server keeps
    the one it has) and listens there again."""
    return f"{inbox_prefix(node)}.watch.{_watch_kind(own, models)}"


def inbox_prefix(node: str | None) -> str:
    """A per-client inbox prefix, so permissions can allow each node only its own replies."""
    return "_INBOX" if node is None else f"_INBOX_{validate_id(node, 'node')}"
