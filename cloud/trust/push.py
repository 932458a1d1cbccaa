"""Pushing an account JWT to running servers through the system account (``slmops fleet
revoke``): a request on ``$SYS.REQ.CLAIMS.UPDATE`` with the JWT as its body, sent as the
fleet directory's system user. A server with a full (or memory) resolver stores it when it is
newer than the one it holds, applies it at once (a revoked user's connections are closed,
their next connects refused) and, in a cluster, hands it to the other servers.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from slmops.shared.connect import connect_once, redact_url
from slmops.shared.connopts import ConnectOptions, current_connect_options
from slmops.shared.errors import NatsUnavailable, SlmopsError

__all__ = ["ClaimsRefused", "push_account"]

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"


class ClaimsRefused(SlmopsError):
    """The server answered the claims update with an error (``code``, ``description``)."""

    def __init__(self, url: str, code: int, description: str) -> None:
        self.url, self.code, self.description = url, code, description
        super().__init__(f"server at {url} refused the account JWT: {description} (code {code})")


async def push_account(url: str, sys_creds: Path, account_jwt: str, *, timeout: float = 10.0) -> str:
    """Send ``account_jwt`` to the server(s) at ``url`` as the system user of ``sys_creds``
    (TLS as the command was given: ``shared.connopts.current_connect_options``); return the
    server's message (``"jwt updated"``). Raises ``NatsUnavailable`` (cannot connect, no
    answer within ``timeout`` s: no resolver takes updates there), ``ClaimsRefused`` (the
    server said no: wrong operator, older JWT...), ``ValueError`` for a URL with a user."""
    options = ConnectOptions(nats_creds=sys_creds).merged(current_connect_options())
    where = redact_url(url)
    nc = await connect_once(url, timeout=timeout, name="slmops-fleet-push", options=options)
    try:
        reply = await nc.request(CLAIMS_UPDATE, account_jwt.encode(), timeout=timeout)
    except Exception as exc:  # nats-py's timeout / no responders / connection errors
        raise NatsUnavailable(
            where, f"no answer to the claims update (is the resolver full or memory?): {type(exc).__name__}"
        ) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await nc.close()
    try:
        answer = json.loads(reply.data)
    except ValueError:
        raise ClaimsRefused(where, 0, f"unreadable answer {reply.data[:200]!r}") from None
    error = answer.get("error") if isinstance(answer, dict) else None
    if error:
        raise ClaimsRefused(where, int(error.get("code", 0)), str(error.get("description", error)))
    data = answer.get("data") if isinstance(answer, dict) else None
    return str((data or {}).get("message", "jwt updated"))
