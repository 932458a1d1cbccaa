"""NATS resource names and subject builders: part of the wire contract (docs/architecture.md §3)."""

from __future__ import annotations

import re

__all__ = [
    "ASSIGNED_PREFIX",
    "ASSIGNMENTS_BUCKET",
    "AUDIT_ALL",
    "AUDIT_STREAM",
    "BASELINE_SUBJECT",
    "CHANGE_GLOBAL",
    "CHANGE_SUBJECT",
    "DEADLETTER_STREAM",
    "DEADLETTER_SUBJECT",
    "DRIFT_ALL",
    "DRIFT_STREAM",
    "EVENTS_ALL",
    "EVENTS_STREAM",
    "FLEETCONFIG_BUCKET",
    "FLEET_BUCKET",
    "FLEET_WIDE",
    "KEYS_BUCKET",
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
    "assignment_subjects",
    "audit_subject",
    "bundle_index_key",
    "change_subject",
    "drift_subject",
    "events_subject",
    "file_object_name",
    "fleetconfig_key",
    "inbox_prefix",
    "manifest_key",
    "model_object_name",
    "msg_id",
    "rollout_subject",
    "status_filter",
    "status_subject",
    "telemetry_filter",
    "telemetry_subject",
    "validate_id",
    "validate_model_name",
]

TELEMETRY_STREAM = "SLMOPS_TELEMETRY"
DRIFT_STREAM = "SLMOPS_DRIFT"
STATUS_STREAM = "SLMOPS_STATUS"
ROLLOUT_STREAM = "SLMOPS_ROLLOUT"
DEADLETTER_STREAM = "SLMOPS_DEADLETTER"
EVENTS_STREAM = "SLMOPS_EVENTS"
DEADLETTER_SUBJECT = "slmops.deadletter"
ASSIGNMENTS_BUCKET = "slmops_assignments"
#: Where the assignments bucket republishes each put (headers only): node wake-ups.
ASSIGNED_PREFIX = "slmops.assigned"
MODELS_BUCKET = "slmops_models"
MODELS_MANIFEST_BUCKET = "slmops_manifests"
#: The fleet's root-signed list of bundle-signing keys (``shared.keylist``), key ``keylist``.
KEYS_BUCKET = "slmops_keys"
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
#: Fleet configuration (``shared.fleetconfig``): signed, versioned edge settings. Keys
#: ``<fleet>.<node>`` / ``<fleet>._fleet`` (what nodes read: the newer of the two wins),
#: ``<fleet>._v.<version>`` (every version ever published) and ``<fleet>._rollout`` (a staged
#: rollout's state; the cloud's only).
FLEETCONFIG_BUCKET = "slmops_fleetconfig"
#: Who changed what, when (``shared.audit.AuditRecord``, JSON): ``slmops.audit.<fleet>``, or
#: ``slmops.audit._global`` for changes not tied to one fleet (keys).
AUDIT_STREAM = "SLMOPS_AUDIT"
AUDIT_ALL = "slmops.audit.>"
#: Request/reply subjects of the active cloud's change service (``cloud.audit``), one per
#: fleet (``change_subject``): audited changes are asked for here, so the identity recorded is
#: the one the server authenticated.
CHANGE_SUBJECT = "slmops.cloud.change"
#: The change subject of changes tied to no fleet (the key list: ``keys rotate|revoke``).
CHANGE_GLOBAL = f"{CHANGE_SUBJECT}._global"
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


def status_filter(fleet: str) -> str:
    """Every node's status subject of one fleet (``slmops.status.<fleet>.*``)."""
    return f"slmops.status.{validate_id(fleet, 'fleet')}.*"


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


def fleetconfig_key(fleet: str, node: str | None = None) -> str:
    """KV key (in ``slmops_fleetconfig``) of a node's pushed configuration, or of the
    fleet-wide one when ``node`` is None: ``<fleet>.<node>`` / ``<fleet>._fleet``."""
    token = FLEET_WIDE if node is None else validate_id(node, "node")
    return f"{validate_id(fleet, 'fleet')}.{token}"


def change_subject(fleet: str) -> str:
    """Where changes to ``fleet`` are asked of the cloud serving it."""
    return f"{CHANGE_SUBJECT}.{validate_id(fleet, 'fleet')}"


def audit_subject(fleet: str | None) -> str:
    """Subject of the audit records about ``fleet`` (None: fleet-independent changes)."""
    return f"slmops.audit.{'_global' if fleet is None else validate_id(fleet, 'fleet')}"


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


def assignment_subjects(fleet: str, node: str) -> list[str]:
    """The subjects that wake node ``node`` on a new value of its assignment keys: the
    assignments bucket republishes each put, headers only, from ``$KV.slmops_assignments.<key>``
    to ``slmops.assigned.<key>`` (``shared.provision``; ``$KV.>`` itself never crosses a leaf
    link, measured with nats-server 2.15). Its own key, its fleet's key, and the per-model
    keys under each (``<key>.<model>``). Node credentials may subscribe exactly these
    (deploy/nats, ``cloud.trust.permissions``; issue 13 fault 11)."""
    own = f"{ASSIGNED_PREFIX}.{assignment_key(fleet, node)}"
    fleet_wide = f"{ASSIGNED_PREFIX}.{assignment_key(fleet)}"
    return [own, f"{own}.>", fleet_wide, f"{fleet_wide}.>"]


def inbox_prefix(fleet: str | None = None, node: str | None = None) -> str:
    """A per-client inbox prefix, so permissions can allow each node only its own replies:
    ``_INBOX_<fleet>.<node>`` for a node (ids hold no ``.``, so no two (fleet, node) pairs share
    it; node ids repeat across fleets), ``_INBOX`` for every other client.

    Raises ``ValueError`` for an invalid id, or when only one of ``fleet``/``node`` is given.
    """
    if fleet is None and node is None:
        return "_INBOX"
    if fleet is None or node is None:
        raise ValueError("a node's inbox prefix needs both its fleet and its node id")
    return f"_INBOX_{validate_id(fleet, 'fleet')}.{validate_id(node, 'node')}"
