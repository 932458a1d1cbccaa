"""Who sent a request, as the NATS server says — never as the request says.

When a request crosses a service import marked ``share: true`` (from an operator's account
into the cloud's), nats-server writes a ``Nats-Request-Info`` header with the requester's
account, user and, for a JWT user, the name in its JWT (``name_tag``); it *replaces* any such
header the client sent (server/client.go ``processServiceImport`` → ``setHeader``, which
removes the old value). A request from inside the cloud's own account crosses no import, so
the server adds nothing there and a header present was written by the client. Hence the
rule (``IdentityReader.of``):

* no authentication on the server (``$SYS.REQ.USER.INFO`` answers account ``$G``, no user):
  ``"unauthenticated"``, whatever headers say;
* authentication on, a header naming one of the configured ``audit_accounts`` (the operator
  accounts that import the change service with ``share: true``), not the cloud's own, on a
  request whose reply subject is the server's service-import reply (``_R_.…``): that
  identity (``name_tag``, else ``user``);
* anything else (no header; the cloud's own account; an account not configured; a reply
  subject the server did not make for an import): ``"unauthenticated"``.

Why an allow-list and not "any other account": a client inside the cloud's own account can
publish the change subject directly with a header naming any account it likes, and the server
leaves that header alone (no import crossed). Only for an account that reaches the subject
through the import is the header the server's. ``slmops fleet init`` makes that layout: its
``OPERATOR`` account imports the service, its ``cloud.toml`` lists it, and in ``SLMOPS`` only
the cloud's own users may publish on the change subjects (nodes and analysts may not).

Why the reply subject too: a request that crosses a service import reaches the service with
the reply subject the server mapped it to (``_R_.<random>.<random>``); a message published
inside the cloud's account with a made-up header normally carries the client's own inbox,
and a message JetStream delivers (a push consumer aimed at the change subject, replaying a
stored message whose headers a node wrote) carries ``$JS.ACK.…``. Neither is believed. A
holder of the cloud's own creds can still choose ``_R_.`` as its reply: those creds are the
cloud itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, NamedTuple

import anyio
import structlog
from nats.aio.client import Client as NATS

from slmops.shared.audit import UNAUTHENTICATED

__all__ = ["REQUEST_INFO", "Identity", "IdentityReader"]

log = structlog.get_logger(__name__)

REQUEST_INFO = "Nats-Request-Info"
#: How nats-server names the reply subject of a request that crossed a service import.
IMPORT_REPLY_PREFIX = "_R_."
#: The account of every client of a server without accounts or authentication.
_GLOBAL = "$G"


class Identity(NamedTuple):
    who: str
    account: str | None = None
    user: str | None = None


class IdentityReader:
    """Reads requesters' identities for one connection of the cloud (``await start()``
    first)."""

    def __init__(self, nc: NATS, accounts: Iterable[str] = ()) -> None:
        self._nc = nc
        #: The operator accounts whose server-written header is believed (module docstring).
        self.accounts = frozenset(accounts)
        self.own_account: str | None = None
        self.auth = False

    async def start(self) -> None:
        """Learn whether the server authenticates (its INFO's ``auth_required``) and, if it
        does, which account this connection is in (``$SYS.REQ.USER.INFO``: the cloud user
        needs the right to publish it). A server that does not answer leaves the own
        account unknown: then no header is trusted (every record says "unauthenticated")."""
        info = getattr(self._nc, "_server_info", None) or {}  # nats-py keeps INFO there
        if not info.get("auth_required"):
            self.auth, self.own_account = False, _GLOBAL
            log.info("audit_identity", account=self.own_account, auth=False)
            return
        try:
            with anyio.fail_after(5.0):
                msg = await self._nc.request("$SYS.REQ.USER.INFO", b"", timeout=5.0)
            data: dict[str, Any] = json.loads(msg.data).get("data") or {}
        except Exception as exc:  # no responders, timeout, not JSON: trust no header
            log.warning("audit_identity_unknown", error=repr(exc))
            self.auth, self.own_account = True, None
            return
        self.own_account = str(data.get("account") or "") or None
        self.auth = bool(data.get("user")) or self.own_account not in (None, _GLOBAL)
        log.info("audit_identity", account=self.own_account, auth=self.auth)

    def of(self, headers: dict[str, str] | None, reply: str | None = None) -> Identity:
        """The requester of a message with ``headers`` and reply subject ``reply`` (module
        docstring)."""
        if not self.auth or self.own_account is None:
            return Identity(UNAUTHENTICATED)
        raw = (headers or {}).get(REQUEST_INFO)
        if not raw:
            return Identity(UNAUTHENTICATED, self.own_account)
        if not (reply or "").startswith(IMPORT_REPLY_PREFIX):
            # Not a request that crossed an import: whoever sent it wrote the header.
            return Identity(UNAUTHENTICATED)
        try:
            info = json.loads(raw)
        except ValueError:
            return Identity(UNAUTHENTICATED)
        if not isinstance(info, dict):
            return Identity(UNAUTHENTICATED)
        account = info.get("acc")
        if not isinstance(account, str) or not account or account == self.own_account:
            return Identity(UNAUTHENTICATED, self.own_account)
        if account not in self.accounts:
            return Identity(UNAUTHENTICATED, account)
        user = info.get("user") if isinstance(info.get("user"), str) else None
        tag = info.get("name_tag") if isinstance(info.get("name_tag"), str) else None
        who = tag or user
        if not who:
            return Identity(UNAUTHENTICATED, account)
        return Identity(who, account, user if user != who else None)
