"""A fleet's NATS identities on disk: ``slmops fleet init|enroll|revoke`` (issue 17).

``FleetDir.init(path)`` makes an operator (with a signing key), the ``SLMOPS`` account (with
a signing key; JetStream enabled, consumers bounded), the ``OPERATOR`` account of the human
operators' tools (with a signing key; no JetStream of its own), the system account ``SYS``
with one user for claim updates, the cloud's creds, ``cloud.toml`` (the cloud's creds and
``audit_accounts = [OPERATOR]``) and the server config fragment ``server.conf`` (operator
JWT, system account, a *full* resolver and the account JWTs preloaded).

Why operators have an account of their own: the audit must name who made a change as the
server authenticated it (``cloud.audit.identity``). ``SLMOPS`` exports the cloud's change
service (``slmops.cloud.change.>``) and ``OPERATOR`` imports it with ``share: true``, so
nats-server writes the ``Nats-Request-Info`` header (account, user, the JWT's name) on every
request that crosses the import, replacing any the client sent. ``SLMOPS`` also exports the
read-only part of its JetStream API (``OPERATOR_JS_READ``: stream and consumer info, direct
and message gets), so an operator's tools read versions, key lists and statuses; they write
nothing there themselves — every change is asked of the cloud and audited.
``enroll`` mints one user (a fresh user NKey, its JWT signed by the account's signing key with
the role's rights from ``cloud.trust.permissions``) and writes its ``.creds``. ``revoke``
adds a user's key to the account JWT's revocation list, re-signs it with the operator's
signing key and rewrites ``server.conf``; pushing it to running servers is
``cloud.trust.push``.

Layout (secrets mode 0600 in 0700 folders)::

    fleet.json               operator/account public keys, every minted user (role, fleet, node)
    operator.jwt             the operator JWT the servers trust
    accounts/SLMOPS.jwt      the account JWT (its revocation list), accounts/OPERATOR.jwt,
                             accounts/SYS.jwt
    keys/*.nk                seeds: operator, operator-signing, SLMOPS, SLMOPS-signing,
                             OPERATOR, OPERATOR-signing, SYS
    creds/cloud.creds        the cloud (account-wide rights), creds/sys.creds (claim updates)
    creds/nodes/<fleet>/<node>.creds, creds/<role>-<name>.creds
    cloud.toml               `slmops cloud --config DIR/cloud.toml`: creds and audit_accounts
    server.conf              include it in nats-server's config (``slmops server --auth DIR``)
    resolver/                the full resolver's JWT store of ``slmops server --auth``
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from slmops.cloud.trust.permissions import ROLES, Role, permissions_for
from slmops.shared import names
from slmops.shared.atomic import write_atomic
from slmops.shared.identity import (
    IdentityError,
    KeyPair,
    decode_jwt,
    encode_jwt,
    new_key,
    read_seed,
    write_creds,
    write_secret,
)

__all__ = [
    "ACCOUNT",
    "OPERATOR_ACCOUNT",
    "OPERATOR_JS_READ",
    "SYSTEM_ACCOUNT",
    "Enrolled",
    "FleetDir",
    "FleetDirError",
    "UserRecord",
]

#: The account of the cloud, the nodes and the analysts (told apart by their rights), the
#: account of the human operators' tools (role ``operator``), and the system account (server
#: events, claim updates).
ACCOUNT, OPERATOR_ACCOUNT, SYSTEM_ACCOUNT = "SLMOPS", "OPERATOR", "SYS"
#: The JetStream API subjects ``SLMOPS`` exports to ``OPERATOR``: reads only (stream and
#: consumer info, direct and message gets; a KV get and a key list read are these). No
#: create, update, delete, purge or consumer creation: an operator changes nothing but
#: through the audited change service.
OPERATOR_JS_READ = (
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.INFO.*.*",
    "$JS.API.CONSUMER.NAMES.*",
    "$JS.API.CONSUMER.LIST.*",
)
#: Consumers in the account (the sum of the streams' own bounds fits: deploy/README.md).
ACCOUNT_MAX_CONSUMERS = 16384


class FleetDirError(ValueError):
    """A fleet directory that is missing, incomplete, already initialised, or asked for
    something it does not hold (an unknown node)."""


class UserRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One minted user, as ``fleet.json`` keeps it."""

    #: The user's NKey public key (``U…``), what a revocation names.
    public: str
    #: ``node``, ``cloud``, ``operator`` or ``analyst`` (``cloud.trust.permissions``).
    role: str
    #: The JWT's name: ``node-<fleet>-<node>`` or ``<role>-<name>``.
    name: str
    #: Unix seconds, the JWT's ``iat``; a revocation at or after it refuses the JWT.
    issued_at: int
    fleet: str | None = None
    node: str | None = None
    #: Unix seconds of the revocation, None while valid.
    revoked_at: int | None = None


class _Index(msgspec.Struct, forbid_unknown_fields=True):
    operator: str
    account: str
    system_account: str
    users: list[UserRecord] = msgspec.field(default_factory=list)
    #: The ``OPERATOR`` account's public key; None in a directory made before it existed
    #: (its operator users then live in ``SLMOPS``, and their changes are "unauthenticated").
    operator_account: str | None = None


@dataclass(frozen=True, slots=True)
class Enrolled:
    """What ``enroll`` made: the user's record and where its creds file is."""

    record: UserRecord
    creds: Path


def _now_after(previous: int) -> int:
    """Seconds now, but later than ``previous``: a resolver keeps the newer of two JWTs of an
    account by ``iat``, so a re-signed account JWT must never carry the same second."""
    return max(int(time.time()), previous + 1)


class FleetDir:
    """An initialised fleet directory (see the module docstring). ``FleetDirError`` when
    ``path`` is not one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        index = self.path / "fleet.json"
        if not index.is_file():
            raise FleetDirError(
                f"{self.path}: not a fleet directory (no fleet.json; run `slmops fleet init`)"
            )
        try:
            self._index = msgspec.json.decode(index.read_bytes(), type=_Index)
        except (OSError, msgspec.DecodeError) as exc:
            raise FleetDirError(f"{index}: unreadable ({exc})") from None

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def init(cls, path: Path, *, operator_name: str = "slmops") -> FleetDir:
        """Create the operator, the accounts, the system user, the cloud's creds and
        ``server.conf`` in ``path`` (created; must be empty or absent)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FleetDirError(f"{path}: exists and is not an empty directory; refusing to overwrite keys")
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        operator, operator_signing = new_key("operator"), new_key("operator")
        account, account_signing = new_key("account"), new_key("account")
        ops, ops_signing = new_key("account"), new_key("account")
        system = new_key("account")
        for name, key in (
            ("operator", operator),
            ("operator-signing", operator_signing),
            (ACCOUNT, account),
            (f"{ACCOUNT}-signing", account_signing),
            (OPERATOR_ACCOUNT, ops),
            (f"{OPERATOR_ACCOUNT}-signing", ops_signing),
            (SYSTEM_ACCOUNT, system),
        ):
            write_secret(path / "keys" / f"{name}.nk", key.seed + "\n")
        os.chmod(path / "keys", 0o700)
        operator_jwt = encode_jwt(
            "operator",
            operator.public,
            operator_name,
            {"signing_keys": [operator_signing.public], "system_account": system.public},
            operator,
        )
        (path / "operator.jwt").write_text(operator_jwt + "\n")
        index = _Index(
            operator=operator.public,
            account=account.public,
            system_account=system.public,
            operator_account=ops.public,
        )
        _write_index(path, index)
        self = cls(path)
        self._write_account_jwt(SYSTEM_ACCOUNT, self._system_claims(), issued_at=int(time.time()))
        self._write_account_jwt(ACCOUNT, self._account_claims({}), issued_at=int(time.time()))
        self._write_account_jwt(
            OPERATOR_ACCOUNT, self._operator_account_claims({}), issued_at=int(time.time())
        )
        # The system user signs claim updates (revocations); the system account signs it itself.
        sys_user = new_key("user")
        unlimited = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        sys_jwt = encode_jwt("user", sys_user.public, "sys", unlimited, system)
        write_creds(path / "creds" / "sys.creds", sys_jwt, sys_user)
        os.chmod(path / "creds", 0o700)
        self.enroll("cloud", name="cloud", out=path / "creds" / "cloud.creds")
        self.write_server_conf()
        self.write_cloud_toml()
        return self

    # -- users ------------------------------------------------------------------------------

    def enroll(
        self,
        role: Role,
        *,
        fleet: str | None = None,
        node: str | None = None,
        name: str | None = None,
        out: Path | None = None,
        js_domain: str | None = None,
        force: bool = False,
    ) -> Enrolled:
        """Mint a user of ``role`` (a fresh user NKey) and write its creds file: for a node
        ``creds/nodes/<fleet>/<node>.creds``, else ``creds/<role>-<name>.creds``, or ``out``.
        Earlier creds of the same node stay valid until revoked. ``js_domain``: a node at a
        leaf site reaching the hub's JetStream by that domain. ``FleetDirError`` when the creds
        file exists, unless ``force`` or it is the default file of a user whose keys are all
        revoked (a node enrolled again after ``fleet revoke``)."""
        if role not in ROLES:
            raise FleetDirError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "node":
            if fleet is None or node is None:
                raise FleetDirError("a node is enrolled with --fleet and --node")
            fleet, node = names.validate_id(fleet, "fleet"), names.validate_id(node, "node")
            label = f"node-{fleet}-{node}"
        else:
            if node is not None:
                raise FleetDirError(f"--node is for role node, not {role}")
            if fleet is not None:
                fleet = names.validate_id(fleet, "fleet")
            label = f"{role}-{names.validate_id(name or role, 'name')}"
        default = (
            self.path / "creds" / "nodes" / str(fleet) / f"{node}.creds"
            if role == "node"
            else self.path / "creds" / f"{label}.creds"
        )
        out = default if out is None else out
        if out.exists() and not force:
            self._refuse_overwrite(out, default, label)
        user = new_key("user")  # first: an analyst's rights name its own inbox by this key
        claims = permissions_for(role, fleet=fleet, node=node, js_domain=js_domain, user=user.public)
        which = self._account_of(role)
        signing = self._key(f"{which}-signing", "account")
        issued = int(time.time())
        token = encode_jwt(
            "user", user.public, label, {**claims, "issuer_account": self._public_of(which)}, signing,
            issued_at=issued,
        )  # fmt: skip
        record = UserRecord(
            public=user.public, role=role, name=label, issued_at=issued, fleet=fleet, node=node
        )
        # The index first: a crash before the creds file is written leaves a known key that
        # `fleet revoke` finds, never a working credential the index does not know.
        self._index.users.append(record)
        try:
            _write_index(self.path, self._index)
        except BaseException:
            self._index.users.pop()
            raise
        write_creds(out, token, user)
        return Enrolled(record, out)

    def _refuse_overwrite(self, out: Path, default: Path, label: str) -> None:
        """``FleetDirError`` for an existing creds file ``out``, unless it is the default file
        of ``label`` whose keys are all revoked (its creds are dead: enrolling again is fine)."""
        live = [u for u in self._index.users if u.name == label and u.revoked_at is None]
        if not live and out == default:
            return
        u = live[0] if live else None
        revoke = (
            "`slmops fleet revoke`"
            if u is None
            else f"`slmops fleet revoke --fleet {u.fleet} --node {u.node}`"
            if u.role == "node"
            else f"`slmops fleet revoke --user {u.public}`"
        )
        why = f"{label} is enrolled already" if live else "not written by this enrollment"
        raise FleetDirError(
            f"{out} exists ({why}): --force mints a new key and overwrites the file; "
            f"the old creds stay valid until {revoke}"
        )

    def users(self) -> list[UserRecord]:
        return list(self._index.users)

    def revoke(
        self, *, fleet: str | None = None, node: str | None = None, public: str | None = None
    ) -> list[UserRecord]:
        """Revoke every key enrolled for ``fleet``/``node`` (or the one user key ``public``):
        each goes into the account JWT's revocation list (JWTs of that key issued up to now
        are refused), the account JWT is re-signed and ``server.conf`` rewritten. Returns the
        users revoked now. ``FleetDirError`` when nothing matches. Push the new account JWT
        with ``cloud.trust.push.push_account``."""
        if public is None:
            if fleet is None or node is None:
                raise FleetDirError("revoke needs --fleet and --node (or a user key)")
            fleet, node = names.validate_id(fleet, "fleet"), names.validate_id(node, "node")
            hits = [u for u in self._index.users if u.role == "node" and u.fleet == fleet and u.node == node]
            what = f"node {node!r} of fleet {fleet!r}"
        else:
            hits = [u for u in self._index.users if u.public == public]
            what = f"user key {public!r}"
        if not hits:
            raise FleetDirError(f"{what} was never enrolled in {self.path}")
        now = int(time.time())
        for u in hits:
            if u.revoked_at is None:
                u.revoked_at = max(now, u.issued_at)
        # The index (source of truth) first: a crash before the account JWT is written keeps
        # revoked_at, and the next revoke re-signs the JWT from it, never dropping a key.
        _write_index(self.path, self._index)
        for which in sorted({self._account_of(u.role) for u in hits}):  # type: ignore[arg-type]
            revocations = {
                u.public: u.revoked_at
                for u in self._index.users
                if u.revoked_at is not None and self._account_of(u.role) == which  # type: ignore[arg-type]
            }
            previous = decode_jwt(self.account_jwt(which)).issued_at
            claims = (
                self._account_claims(revocations)
                if which == ACCOUNT
                else self._operator_account_claims(revocations)
            )
            self._write_account_jwt(which, claims, issued_at=_now_after(previous))
        self.write_server_conf()
        return hits

    def accounts_of(self, users: list[UserRecord]) -> list[str]:
        """The accounts (``SLMOPS``, ``OPERATOR``) whose JWTs hold ``users``' revocations:
        the ones ``fleet revoke`` pushes."""
        return sorted({self._account_of(u.role) for u in users})  # type: ignore[arg-type]

    # -- files ------------------------------------------------------------------------------

    @property
    def operator_public(self) -> str:
        return self._index.operator

    @property
    def account_public(self) -> str:
        return self._index.account

    @property
    def system_account_public(self) -> str:
        return self._index.system_account

    @property
    def operator_account_public(self) -> str | None:
        """The ``OPERATOR`` account's public key (None in a directory older than it)."""
        return self._index.operator_account

    @property
    def cloud_toml(self) -> Path:
        return self.path / "cloud.toml"

    def account_jwt(self, which: str = ACCOUNT) -> str:
        return (self.path / "accounts" / f"{which}.jwt").read_text().strip()

    @property
    def operator_jwt_path(self) -> Path:
        return self.path / "operator.jwt"

    @property
    def sys_creds(self) -> Path:
        return self.path / "creds" / "sys.creds"

    @property
    def cloud_creds(self) -> Path:
        return self.path / "creds" / "cloud.creds"

    @property
    def server_conf(self) -> Path:
        return self.path / "server.conf"

    def server_conf_text(self, resolver_dir: Path | str, *, leaf_site: bool = False) -> str:
        """The operator-mode part of a nats-server config, self-contained (the operator JWT
        inline), with the full resolver's JWT store at ``resolver_dir`` (one per server).
        ``leaf_site``: also the variables ``$SLMOPS_ACCOUNT`` / ``$SLMOPS_SYSTEM_ACCOUNT`` a
        site's leafnodes remotes name (nats-server refuses them where unused)."""
        return (
            "# slmops fleet identities (operator mode, JWT). Written by `slmops fleet init`;\n"
            "# `slmops fleet revoke` rewrites the preload. Include this in a server's config.\n"
            f"operator: {self.operator_jwt_path.read_text().strip()}\n"
            f"system_account: {self.system_account_public}\n"
            + (
                "# The two accounts' public keys, for the leafnodes remotes of a site\n"
                "# (deploy/nats/jwt/leaf/site.conf).\n"
                f'SLMOPS_ACCOUNT: "{self.account_public}"\n'
                f'SLMOPS_SYSTEM_ACCOUNT: "{self.system_account_public}"\n'
                if leaf_site
                else ""
            )
            + "resolver: {\n"
            "  type: full\n"
            f'  dir: "{resolver_dir}"\n'
            "  # Accounts are never deleted through the system account.\n"
            "  allow_delete: false\n"
            "  # How often servers of a cluster compare their JWT stores.\n"
            '  interval: "2m"\n'
            '  timeout: "1.9s"\n'
            "}\n"
            "# The account JWTs at the time of writing; a newer one pushed through\n"
            "# $SYS.REQ.CLAIMS.UPDATE (slmops fleet revoke) wins by its issue time.\n"
            "resolver_preload: {\n"
            f"  {self.system_account_public}: {self.account_jwt(SYSTEM_ACCOUNT)}\n"
            f"  {self.account_public}: {self.account_jwt(ACCOUNT)}\n"
            + (
                f"  {self.operator_account_public}: {self.account_jwt(OPERATOR_ACCOUNT)}\n"
                if self.operator_account_public
                else ""
            )
            + "}\n"
        )

    def write_server_conf(self) -> Path:
        resolver = self.path / "resolver"
        resolver.mkdir(exist_ok=True)
        self.server_conf.write_text(self.server_conf_text(resolver.resolve()))
        return self.server_conf

    def cloud_toml_text(self) -> str:
        """A cloud config (``slmops cloud --config``) with the cloud's creds and, in
        ``audit_accounts``, the ``OPERATOR`` account: the only account whose server-written
        identity the audit believes (``cloud.audit.identity``). Other settings are defaults."""
        accounts = [self.operator_account_public] if self.operator_account_public else []
        return (
            "# Written by `slmops fleet init`: slmops cloud --config THIS [--nats URL] [--state DIR]\n"
            f"creds = {json.dumps(str(self.cloud_creds.resolve()))}\n"
            "# Changes asked through the OPERATOR account's import of the change service (share:\n"
            "# true) are audited with the identity the server authenticated.\n"
            f"audit_accounts = {json.dumps(accounts)}\n"
        )

    def write_cloud_toml(self) -> Path:
        self.cloud_toml.write_text(self.cloud_toml_text())
        return self.cloud_toml

    # -- internals --------------------------------------------------------------------------

    def _key(self, name: str, kind: str) -> KeyPair:
        path = self.path / "keys" / f"{name}.nk"
        try:
            return read_seed(path, kind)  # type: ignore[arg-type]
        except IdentityError as exc:
            raise FleetDirError(str(exc)) from None

    def _account_of(self, role: Role) -> str:
        """The account a user of ``role`` is minted in: ``OPERATOR`` for operators (when the
        directory has it), else ``SLMOPS``."""
        return OPERATOR_ACCOUNT if role == "operator" and self._index.operator_account else ACCOUNT

    def _public_of(self, which: str) -> str:
        if which == OPERATOR_ACCOUNT and self._index.operator_account:
            return self._index.operator_account
        if which == SYSTEM_ACCOUNT:
            return self._index.system_account
        return self._index.account

    def _account_claims(self, revocations: dict[str, int]) -> dict[str, Any]:
        signing = self._key(f"{ACCOUNT}-signing", "account")
        claims: dict[str, Any] = {
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                "conn": -1, "leaf": -1,
                # JetStream on (storage != 0); consumers bounded for the whole account (fault 11).
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": ACCOUNT_MAX_CONSUMERS,
            },
            "signing_keys": [signing.public],
            "default_permissions": {"pub": {}, "sub": {}},
        }  # fmt: skip
        if self._index.operator_account:
            claims["exports"] = [
                # The change service: the server adds the requester's identity on the import.
                {"name": "change", "subject": f"{names.CHANGE_SUBJECT}.>", "type": "service",
                 "response_type": "Singleton"},
                *({"name": f"js-read-{i}", "subject": s, "type": "service", "response_type": "Stream"}
                  for i, s in enumerate(OPERATOR_JS_READ)),
            ]  # fmt: skip
        if revocations:
            claims["revocations"] = dict(sorted(revocations.items()))
        return claims

    def _operator_account_claims(self, revocations: dict[str, int]) -> dict[str, Any]:
        signing = self._key(f"{OPERATOR_ACCOUNT}-signing", "account")
        imports = [
            {"name": "change", "subject": f"{names.CHANGE_SUBJECT}.>", "account": self._index.account,
             "type": "service", "share": True},
            *({"name": f"js-read-{i}", "subject": s, "account": self._index.account, "type": "service"}
              for i, s in enumerate(OPERATOR_JS_READ)),
        ]  # fmt: skip
        claims: dict[str, Any] = {
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
                "conn": -1, "leaf": -1,
                # No JetStream of its own: it reads SLMOPS's through the imports above.
                "mem_storage": 0, "disk_storage": 0, "streams": 0, "consumer": 0,
            },
            "signing_keys": [signing.public],
            "imports": imports,
            "default_permissions": {"pub": {}, "sub": {}},
        }  # fmt: skip
        if revocations:
            claims["revocations"] = dict(sorted(revocations.items()))
        return claims

    def _system_claims(self) -> dict[str, Any]:
        return {
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                       "wildcards": True, "conn": -1, "leaf": -1},
            "default_permissions": {"pub": {}, "sub": {}},
        }  # fmt: skip

    def _write_account_jwt(self, which: str, claims: dict[str, Any], *, issued_at: int) -> None:
        subject = self._public_of(which)
        token = encode_jwt(
            "account", subject, which, claims, self._key("operator-signing", "operator"), issued_at=issued_at
        )
        # A signed public document (the server and `fleet push` read it), not a secret.
        write_atomic(self.path / "accounts" / f"{which}.jwt", (token + "\n").encode(), mode=0o644)


def _write_index(path: Path, index: _Index) -> None:
    data = json.loads(msgspec.json.encode(index))
    write_secret(path / "fleet.json", json.dumps(data, indent=1) + "\n")
