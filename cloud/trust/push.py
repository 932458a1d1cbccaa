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
import nats
from nats.aio.client import Client as NATS

from slmops.shared.connect import check_nats_url, redact_url, split_servers
from slmops.shared.errors import NatsUnavailable, SlmopsError

__all__ = ["ClaimsRefused", "push_account"]

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"


class ClaimsRefused(SlmopsError):
    """The server answered the claims update with an error (``code``, ``description``)."""

    def __init__(self, url: str, code: int, description: str) -> None:
        self.url, self.code, self.description = url, code, description
        super().__init__(f"server at {url} refused the account JWT: {description} (code {code})")


async def push_account(url: str, sys_creds: Path, account_jwt: str, *, timeout: float = 10.0) -> str:
    """Send ``account_jwt`` to the server(s) at ``url`` as the system user of ``sys_creds``;
    return the server's message (``"jwt updated"``). Raises ``NatsUnavailable`` (cannot
    connect, no answer within ``timeout`` s: no resolver takes updates there),
    ``ClaimsRefused`` (the server said no: wrong operator, older JWT...)."""
    check_nats_url(url)
    servers, auth = split_servers(url)
    if auth:
        raise ValueError("give the URL without user or password: the system user's creds are used")
    where = redact_url(url)
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}")

    nc: NATS | None = None
    try:
        with anyio.fail_after(timeout):
            nc = await nats.connect(
                servers, user_credentials=str(sys_creds), allow_reconnect=False,
                max_reconnect_attempts=1, connect_timeout=min(timeout, 2.0), error_cb=error_cb,
            )  # fmt: skip
            reply = await nc.request(CLAIMS_UPDATE, account_jwt.encode(), timeout=timeout)
    except TimeoutError as exc:
        raise NatsUnavailable(
            where, "no answer to the claims update (is the resolver full or memory?)"
        ) from exc
    except Exception as exc:  # nats-py's connect and request errors
        reason = errors[-1] if errors else f"{type(exc).__name__}: {exc}"
        raise NatsUnavailable(where, reason) from exc
    finally:
        if nc is not None:
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
