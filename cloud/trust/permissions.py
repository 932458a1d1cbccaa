"""What each role of a fleet may do on NATS, as the ``nats`` part of a user JWT.

Subjects a permission can judge are the ones in the *subject* of a request, never its body.
So a node reads only by requests whose subject names what is read (docs/architecture.md §9,
issue 13 fault 11):

- its assignment by direct gets **by subject** (``$JS.API.DIRECT.GET.KV_slmops_assignments.
  $KV.slmops_assignments.<fleet>.<node>``, its per-model keys under it, and its fleet's
  ``_fleet`` keys), and the wake-ups of new values by core subscriptions on the subjects the
  bucket republishes those keys' puts to (``names.assignment_subjects``; no consumer, so no
  name and no push target to choose);
- manifests by direct get by subject (every manifest is readable by every node: it is the
  registry);
- model bundles by batched direct gets on the object store's stream
  (``$JS.API.DIRECT.GET.OBJ_slmops_models``, chunk subject in the body: every object in that
  store is a signed bundle every node may download) — again no consumer.

A node creates **no consumer**: no ``$JS.API.CONSUMER.>`` right at all, so it can neither
take the model store's consumer slots nor aim a push consumer at another node's inbox. It
receives only on its own inbox prefix (``_INBOX_<fleet>.<node>``) and its own assignment subjects.

Limits: ``subs`` bounds a node's subscriptions (it needs ~8: inbox, assignment wake-ups,
one per batched download), ``payload`` its largest message (status ≤ 256 KiB, aggregates a few
KiB; 1 MiB = the telemetry stream's own max message).
"""

from __future__ import annotations

from typing import Any, Literal

from slmops.shared import names
from slmops.shared.keylist import KEYLIST_KEY

__all__ = [
    "ANALYST_STREAMS",
    "NODE_PAYLOAD",
    "NODE_SUBS",
    "ROLES",
    "Role",
    "analyst_inbox",
    "permissions_for",
]

Role = Literal["node", "cloud", "operator", "analyst"]
ROLES: tuple[Role, ...] = ("node", "cloud", "operator", "analyst")

#: Subscriptions of one node: its inbox (1), four assignment subjects, a few downloads in flight.
NODE_SUBS = 32
#: Largest message a node may publish: the telemetry stream's max message size.
NODE_PAYLOAD = 1024 * 1024

_A = names.ASSIGNMENTS_BUCKET
_M = names.MODELS_MANIFEST_BUCKET
_O = names.MODELS_BUCKET
_F = names.FLEETCONFIG_BUCKET
_K = names.KEYS_BUCKET


def _node(fleet: str, node: str, js_domain: str | None) -> dict[str, Any]:
    fleet, node = names.validate_id(fleet, "fleet"), names.validate_id(node, "node")
    own, fleet_wide = (f"$KV.{_A}.{names.assignment_key(fleet, n)}" for n in (node, None))
    kv_subjects = [own, f"{own}.>", fleet_wide, f"{fleet_wide}.>"]
    config_subjects = [f"$KV.{_F}.{names.fleetconfig_key(fleet, n)}" for n in (node, None)]
    pub = [
        names.telemetry_subject(fleet, node),
        names.status_subject(fleet, node),
        # Assignment: direct get by subject, its own keys only.
        *(f"$JS.API.DIRECT.GET.KV_{_A}.{s}" for s in kv_subjects),
        # Key names only (never values): how the node finds its per-model keys.
        f"$JS.API.STREAM.INFO.KV_{_A}",
        # Pushed fleet configuration (edge/fleetconfig.py): its own key and its fleet's.
        *(f"$JS.API.DIRECT.GET.KV_{_F}.{s}" for s in config_subjects),
        # The root-signed list of signing keys (edge/keys.py): one key, the same for every node.
        f"$JS.API.DIRECT.GET.KV_{_K}.$KV.{_K}.{KEYLIST_KEY}",
        # Manifests: readable by every node.
        f"$JS.API.STREAM.INFO.KV_{_M}",
        f"$JS.API.DIRECT.GET.KV_{_M}.>",
        # Model store: bind, object info, chunks by batched direct get (body form).
        f"$JS.API.STREAM.INFO.OBJ_{_O}",
        f"$JS.API.STREAM.MSG.GET.OBJ_{_O}",
        f"$JS.API.DIRECT.GET.OBJ_{_O}",
    ]
    if js_domain is not None:
        # At a leaf site the device addresses the hub's JetStream by its domain.
        api = f"$JS.{names.validate_id(js_domain, 'JetStream domain')}.API."
        pub = [s.replace("$JS.API.", api, 1) for s in pub]
    sub = [f"{names.inbox_prefix(fleet, node)}.>", *names.assignment_subjects(fleet, node), *config_subjects]
    return {
        "pub": {"allow": pub},
        "sub": {"allow": sub},
        "subs": NODE_SUBS,
        "payload": NODE_PAYLOAD,
        "data": -1,
    }


#: The streams an analyst reads (README: drift, rollout, status, events; and the audit) and
#: the KV buckets behind ``rollout status``, ``fleet status`` and ``status`` (rollout state,
#: node records, assignments, the cloud's lease).
ANALYST_STREAMS = (
    names.DRIFT_STREAM, names.ROLLOUT_STREAM, names.STATUS_STREAM, names.EVENTS_STREAM, names.AUDIT_STREAM,
    *(f"KV_{b}" for b in (names.ROLLOUTS_BUCKET, names.FLEET_BUCKET, names.ASSIGNMENTS_BUCKET,
                          names.LEASES_BUCKET)),
)  # fmt: skip


def analyst_inbox(user: str) -> str:
    """The inbox prefix of the analyst whose user public key is ``user`` (``_INBOX.U…``): no
    other client's inbox matches it (nats-py's own are ``_INBOX.<22-character nuid>``, a node's
    ``_INBOX_<fleet>.<node>``), so an analyst receives only the replies to its own requests."""
    if not (user.startswith("U") and len(user) == 56 and user.isalnum()):
        raise ValueError(f"not a user public key: {user!r}")
    return f"_INBOX.{user}"


def _analyst(fleet: str | None, user: str | None) -> dict[str, Any]:
    if fleet is None:
        sub = [names.DRIFT_ALL, names.ROLLOUT_ALL, names.STATUS_ALL, names.EVENTS_ALL]
    else:
        sub = [names.drift_subject(fleet), names.rollout_subject(fleet), names.status_filter(fleet),
               names.events_subject(fleet)]  # fmt: skip
    if user is None or fleet is not None:
        # One fleet's analyst: live messages only. Stored reads would not stay in its fleet (a
        # consumer's filter and a KV listing are in the request body, which rights cannot judge).
        return {"pub": {"deny": [">"]}, "sub": {"allow": sub}, "subs": 64, "payload": -1, "data": -1}
    # Stored reads (replays, key listings): stream info, message and direct gets on the read
    # streams; replies on its own inbox only. No consumer at all, ephemeral or durable: its
    # delivery subject is in the request body, which rights cannot judge (nats-server#8274), so
    # a push consumer could deliver into node inboxes, the change subject or a subject a stream
    # stores (nodes are denied consumers for the same reason). Readers use message gets
    # (``shared.jetstream.consumerless``). No stream or KV write, no publish anywhere else.
    pub = [
        *(f"$JS.API.STREAM.INFO.{s}" for s in ANALYST_STREAMS),
        *(f"$JS.API.STREAM.MSG.GET.{s}" for s in ANALYST_STREAMS),
        *(f"$JS.API.DIRECT.GET.{s}.>" for s in ANALYST_STREAMS),
    ]
    sub = [*sub, f"{analyst_inbox(user)}.>"]
    return {"pub": {"allow": pub}, "sub": {"allow": sub}, "subs": 64, "payload": 64 * 1024, "data": -1}


def _cloud() -> dict[str, Any]:
    # The cloud (and a human operator's tools) run the whole SLMOPS account: ingest, registry,
    # rollouts, provisioning. Limits are the account's.
    return {"pub": {"allow": [">"]}, "sub": {"allow": [">"]}, "subs": -1, "payload": -1, "data": -1}


def permissions_for(
    role: Role,
    *,
    fleet: str | None = None,
    node: str | None = None,
    js_domain: str | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """The ``nats`` claims (``pub``, ``sub``, limits) of a user of ``role``.

    ``node`` needs ``fleet`` and ``node`` (``js_domain``: its JetStream rights under the hub's
    domain, for a device at a leaf site, deploy/nats/jwt/leaf); ``analyst`` may be limited to
    one ``fleet`` (reads live drift, rollout, status and event messages; an analyst of every
    fleet with ``user``, its user public key, also the stored ones of ``ANALYST_STREAMS``
    through its own inbox ``analyst_inbox(user)`` — message and direct gets, no consumer, no
    writes);
    ``cloud`` and
    ``operator`` hold the account. ``ValueError`` for an unknown role or a missing id.
    """
    if role == "node":
        if fleet is None or node is None:
            raise ValueError("a node user needs --fleet and --node")
        return _node(fleet, node, js_domain)
    if role == "analyst":
        return _analyst(fleet, user)
    if role in ("cloud", "operator"):
        return _cloud()
    raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
