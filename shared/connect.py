"""Connecting to NATS: a background link for services, a fail-fast connect for commands.

nats-py's ``connect`` blocks through its retries (docs/architecture.md §9), so a long-lived service never
awaits it directly: ``Link`` runs the initial attempts in its own task, with exponential
backoff and jitter, and once connected lets nats-py reconnect forever. Callers look at
``state`` or wait with ``wait_online``; ``nc``/``js`` raise ``NatsUnavailable`` while the link
is not online, so nothing is published into nats-py's offline buffer by accident.
"""

from __future__ import annotations

import enum
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from slmops.shared.backoff import Backoff
from slmops.shared.connopts import (
    ConnectOptions,
    current_connect_options,
    explain_tls_error,
    note_permission_denial,
)
from slmops.shared.errors import NatsUnavailable
from slmops.shared.identity import IdentityError, decode_jwt
from slmops.shared.jetstream import is_connection_error, is_nats_error, nats_errors
from slmops.shared.names import inbox_prefix, validate_id

__all__ = [
    "ConnectFactory",
    "ConnectOptions",
    "Link",
    "LinkState",
    "LinkStatistics",
    "check_nats_url",
    "connect_attempt",
    "connect_once",
    "redact_url",
    "split_servers",
]

log = structlog.get_logger(__name__)

#: nats-py buffers up to this many bytes of publishes while reconnecting (default 2 MiB).
#: Link refuses ``nc`` while offline anyway; this bounds what slips in during the moment
#: between a drop and our state change. 1 MiB = the server's default max payload, so one
#: message in flight can still be buffered.
PENDING_SIZE = 1024 * 1024

#: ``await factory(url, **options)`` makes ONE connection attempt and returns a connected
#: client, or raises. Tests inject their own to simulate failures.
ConnectFactory = Callable[..., Awaitable[NATS]]


#: Failed first-connect attempts before a warning (then every ``_WARN_EVERY``): one refused
#: attempt is normal while a server starts, three in a row (~2 s with the default backoff) not.
_WARN_AFTER = 3
_WARN_EVERY = 100


class LinkState(enum.StrEnum):
    OFFLINE = "offline"
    CONNECTING = "connecting"
    ONLINE = "online"


@dataclass(frozen=True, slots=True)
class LinkStatistics:
    """A snapshot of a link's counters (see ``Link.statistics()``)."""

    state: LinkState
    since: float  #: clock() of the last state change
    attempts: int  #: initial-connect attempts that failed, in total
    connects: int  #: connects + reconnects that succeeded
    disconnects: int
    last_error: str | None


async def connect_attempt(url: str, **options: Any) -> NATS:
    """Make one connection attempt with nats-py, then leave reconnecting to it.

    ``options`` go to ``NATS.connect``; their ``max_reconnect_attempts`` and
    ``reconnect_time_wait`` apply after the first successful connect. (nats-py reads both from
    ``nc.options`` on every reconnect, and offers no other way to make its initial connect
    try once: with -1 it would block forever.) ``require_tls=True`` (set with a ``tls``
    context) refuses a server that did not switch to TLS: nats-py would go on in plain text.
    """
    require_tls = bool(options.pop("require_tls", False))
    after_attempts = options.pop("max_reconnect_attempts", -1)
    after_wait = options.pop("reconnect_time_wait", 2)
    servers, auth = split_servers(url)
    if auth and options.get("user_credentials"):
        raise ValueError("the NATS URL carries a user or token and a creds file was given (--creds): use one")
    for key, value in auth.items():
        options.setdefault(key, value)
    if options.get("inbox_prefix", "_INBOX") == "_INBOX" and options.get("user_credentials"):
        options["inbox_prefix"] = own_inbox(str(options["user_credentials"]))
    nc = NATS()
    try:
        # max_reconnect_attempts=1 with no wait: nats-py tries the server twice, at once,
        # then raises NoServersError.
        await nc.connect(servers, max_reconnect_attempts=1, reconnect_time_wait=0, **options)
    except BaseException:
        # After a refused TLS handshake nats-py's close waits on a transport that never
        # finished its handshake (5 s measured): a client that never connected gets 1 s.
        await _close_quietly(nc, timeout=1.0)
        raise
    if require_tls and not tls_in_use(nc):
        await _close_quietly(nc)
        raise NatsUnavailable(redact_url(url), _NO_TLS)
    nc.options["max_reconnect_attempts"] = after_attempts
    nc.options["reconnect_time_wait"] = after_wait
    return nc


def own_inbox(creds: str) -> str:
    """The inbox prefix a ``.creds`` file's user must use: ``_INBOX.<its public key>`` when its
    JWT allows it to receive there and nowhere else among inboxes (an analyst,
    ``cloud.trust.permissions``), else ``_INBOX``. A file that cannot be read or parsed gives
    ``_INBOX`` (nats-py then reports the file itself)."""
    try:
        text = Path(creds).expanduser().read_text()
        jwt = text.split("-----BEGIN NATS USER JWT-----", 1)[1].split("---", 1)[0]
        claims = decode_jwt(jwt, verify=False)
    except (OSError, IndexError, IdentityError, UnicodeDecodeError):
        return "_INBOX"
    own = f"_INBOX.{claims.subject}"
    allowed = (claims.nats.get("sub") or {}).get("allow") or []
    return own if isinstance(allowed, list) and f"{own}.>" in allowed else "_INBOX"


#: Why a TLS-configured client refuses a server that answered in plain text.
_NO_TLS = "the server does not offer TLS, but TLS files were given (--tls-ca/--tls-cert): refusing plain text"


def tls_in_use(nc: NATS) -> bool:
    """True when ``nc``'s connection runs over TLS. (nats-py exposes no public flag: the
    transport's stream writer carries the ``ssl_object`` once upgraded.)"""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    get_extra = getattr(writer, "get_extra_info", None)
    return get_extra is not None and get_extra("ssl_object") is not None


async def connect_once(
    url: str,
    timeout: float = 5.0,
    *,
    name: str | None = None,
    fleet: str | None = None,
    node: str | None = None,
    options: ConnectOptions | None = None,
) -> NATS:
    """Connect for a short-lived command; raise ``NatsUnavailable`` naming ``url`` if that
    fails within ``timeout`` seconds. The client does not reconnect: commands fail fast.

    ``options`` (TLS files) default to the command's (``current_connect_options()``); a TLS
    failure's reason names the certificate problem. ``TlsError`` (a ``ValueError``) for a TLS
    file that cannot be read or used."""
    _check_url(url)
    options = options if options is not None else current_connect_options()
    tls = options.nats_options()
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    errors: list[BaseException] = []

    # A refused certificate does not heal within the timeout: stop at once (nats-py itself
    # would sit out the whole timeout after a failed handshake).
    refused = anyio.CancelScope()

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)
        note_permission_denial(exc)  # after the connect, the only place a refusal shows
        if explain_tls_error(exc, options) is not None:
            refused.cancel()

    where = redact_url(url)
    try:
        with anyio.fail_after(timeout), nats_errors("connection", where, where), refused:
            return await connect_attempt(
                url,
                name=name,
                inbox_prefix=inbox_prefix(fleet, node),
                allow_reconnect=False,
                connect_timeout=min(timeout, 2.0),
                pending_size=PENDING_SIZE,
                error_cb=error_cb,
                require_tls=options.tls,
                **tls,
            )
        raise TimeoutError("TLS handshake refused")  # only reached when ``refused`` was cancelled
    except (NatsUnavailable, TimeoutError) as exc:
        # The callback saw the server's own words (auth, TLS); nats-py's final error does not.
        cause = errors[-1] if errors else exc.__cause__ or exc
        if isinstance(exc, NatsUnavailable) and exc.reason == _NO_TLS:
            raise
        # A refused handshake can be followed by a broken pipe: the TLS reason is the news.
        tls_reason = next(filter(None, (explain_tls_error(e, options) for e in errors)), None)
        reason = tls_reason or (f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__)
        if tls_reason is None and options.tls and isinstance(cause, TimeoutError):
            # Handshake first: a server that never answers our TLS hello (plain text that
            # waits for CONNECT, or a TLS server without handshake_first) got nothing else.
            reason += (
                "; no TLS handshake completed: the server may be plain text, or its tls block may lack "
                "handshake_first (nothing but the TLS hello was sent to it)"
            )
        elif tls_reason is None and options.tls and isinstance(cause, ConnectionError):
            # Under TLS 1.3 a server judges the client certificate after the client finished
            # its handshake; its alert may be lost to the closed socket (2 of 15 tries here).
            reason += "; the server closed the connection after the TLS handshake: " + (
                "if it requires a client certificate (mutual TLS), give --tls-cert and --tls-key"
                if options.tls_cert is None
                else f"it may have refused our client certificate --tls-cert {str(options.tls_cert)!r}"
            )
        raise NatsUnavailable(where, reason) from exc


class Link:
    """A NATS connection that is made, and kept, in the background.

    ``async with Link(url, name="edge-n1", fleet="f1", node="n1") as link:`` returns at once, whatever the
    network does. ``state`` goes ``offline`` → ``connecting`` → ``online``; after a drop it is
    ``offline`` while nats-py reconnects, and ``online`` again when it has. Leaving the block
    closes the connection (flushing what was published).
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        fleet: str | None = None,
        node: str | None = None,
        connect: ConnectFactory = connect_attempt,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
        rng: random.Random | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 2.0,
        reconnect_time_wait: float = 2.0,
        pending_size: int = PENDING_SIZE,
        options: ConnectOptions | None = None,
        js_domain: str | None = None,
    ) -> None:
        _check_url(url)
        if js_domain is not None:
            validate_id(js_domain, "JetStream domain")
        self._js_domain = js_domain
        self._conn_options = options if options is not None else current_connect_options()
        # Built once, now: a missing or broken TLS file is a start-up error, not a retry loop.
        self._tls = self._conn_options.nats_options()
        self._prefix = inbox_prefix(fleet, node)  # validates both ids
        for what, value in (
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
            ("connect_timeout", connect_timeout),
            ("reconnect_time_wait", reconnect_time_wait),
        ):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        if backoff_max < backoff_initial:
            raise ValueError(
                f"backoff_max {backoff_max!r} must not be below backoff_initial {backoff_initial!r}"
            )
        if isinstance(pending_size, bool) or not isinstance(pending_size, int) or pending_size < 0:
            raise ValueError(f"pending_size must be an int >= 0, got {pending_size!r}")
        self._url = url
        self._shown_url = redact_url(url)
        self._name = name
        self._connect = connect
        self._clock = clock
        self._sleep = sleep
        self._backoff = Backoff(
            float(backoff_initial),
            float(backoff_max),
            jitter=True,
            rng=rng if rng is not None else random.Random(),
        )
        self._connect_timeout = connect_timeout
        self._reconnect_time_wait = reconnect_time_wait
        self._pending_size = pending_size

        self._state = LinkState.OFFLINE
        self._since = clock()
        self._subscribers: list[Callable[[LinkState], object]] = []
        self._changed: anyio.Event | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._attempts = 0
        self._connects = 0
        self._disconnects = 0
        self._last_error: str | None = None

    # -- public -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._shown_url

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def nc(self) -> NATS:
        """The connected client; raises ``NatsUnavailable`` unless the link is online."""
        if self._state is not LinkState.ONLINE or self._nc is None:
            raise NatsUnavailable(self._shown_url, f"link is {self._state.value}")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """JetStream on the connected client; raises ``NatsUnavailable`` unless online."""
        nc = self.nc
        if self._js is None:
            # A device at a leaf site reaches the hub's JetStream by its domain (deploy/nats/jwt).
            self._js = nc.jetstream(domain=self._js_domain)
        return self._js

    def set_url(self, url: str) -> None:
        """Connect to ``url`` from now on (pushed fleet configuration): the current
        connection, if any, is closed and the link reconnects in the background, as after a
        drop. Raises ``ValueError`` for a URL ``check_nats_url`` refuses."""
        _check_url(url)
        if url == self._url:
            return
        log.info("link_url_changed", old=self._shown_url, new=redact_url(url))
        self._url, self._shown_url = url, redact_url(url)
        nc = self._nc
        if nc is not None and self._tg is not None:
            self._tg.start_soon(_close_quietly, nc)

    def statistics(self) -> LinkStatistics:
        return LinkStatistics(
            self._state,
            self._since,
            self._attempts,
            self._connects,
            self._disconnects,
            self._last_error,
        )

    def on_change(self, callback: Callable[[LinkState], object]) -> Callable[[], None]:
        """Call ``callback(new_state)`` on every state change; returns an unsubscribe function.

        Callbacks run synchronously in the event loop and must not block; an exception in
        one is logged and does not affect the link or the other callbacks.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def wait_state(self, state: LinkState, timeout: float | None = None) -> None:
        """Return once the link is in ``state``; ``NatsUnavailable`` after ``timeout`` s."""
        state = LinkState(state)
        with anyio.move_on_after(timeout):
            while self._state is not state:
                await self._event().wait()
            return
        raise NatsUnavailable(
            self._shown_url,
            f"not {state.value} within {timeout}s (state {self._state.value}, last error {self._last_error})",
        )

    async def wait_online(self, timeout: float | None = None) -> None:
        """Return once online; raise ``NatsUnavailable`` after ``timeout`` seconds."""
        await self.wait_state(LinkState.ONLINE, timeout)

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("this Link is already open")
        self._changed = anyio.Event()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._run, name=f"nats-link {self._shown_url}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg, self._tg = self._tg, None
        if tg is None:
            raise RuntimeError("this Link is not open")
        tg.cancel_scope.cancel()
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            nc, self._nc, self._js = self._nc, None, None
            if nc is not None:
                await _close_quietly(nc)
            self._set_state(LinkState.OFFLINE)

    # -- internals --------------------------------------------------------------------------

    def _event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _set_state(self, state: LinkState) -> None:
        if state is self._state:
            return
        old, self._state, self._since = self._state, state, self._clock()
        log.info("link_state", url=self._shown_url, old=old.value, new=state.value)
        event, self._changed = self._changed, anyio.Event()
        if event is not None:
            event.set()
        for callback in list(self._subscribers):
            try:
                callback(state)
            except Exception:
                log.exception("link_subscriber_failed", callback=repr(callback))

    def _delay(self, failures: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random."""
        return self._backoff.delay(failures)

    async def _run(self) -> None:
        failures = 0
        while True:
            session = _Session()
            self._set_state(LinkState.CONNECTING)
            try:
                # nats-py bounds each try by connect_timeout and tries twice; this bounds an
                # injected factory too.
                with anyio.fail_after(self._connect_timeout * 3):
                    nc = await self._connect(self._url, **self._options(session))
            except Exception as exc:  # any failed attempt, even a surprising one, backs off
                failures += 1
                self._attempts += 1
                tls_reason = explain_tls_error(session.tls_error or exc, self._conn_options)
                self._last_error = tls_reason or f"{type(exc).__name__}: {exc}"
                self._set_state(LinkState.OFFLINE)
                delay = self._delay(failures)
                expected = is_nats_error(exc)  # the connection is gone or not there yet
                if tls_reason is not None and failures == 1:
                    # A certificate problem does not heal by waiting: say so at once.
                    log.warning("nats_tls_refused", url=self._shown_url, error=tls_reason)
                if failures == _WARN_AFTER or failures % _WARN_EVERY == 0:
                    # Said once at the default log level, then rarely: the retries go on.
                    log.warning(
                        "nats_unreachable",
                        url=self._shown_url,
                        failures=failures,
                        error=self._last_error,
                        note="still retrying; check the NATS URL and that the server runs",
                    )
                (log.info if expected else log.warning)(
                    "link_connect_failed",
                    url=self._shown_url,
                    failures=failures,
                    retry_in=round(delay, 3),
                    error=self._last_error,
                    exc_info=None if expected else exc,
                )
                await self._sleep(delay)
                continue
            failures = 0
            self._nc, self._js = nc, None
            session.current = True
            self._connects += 1
            self._set_state(LinkState.ONLINE)
            await session.closed.wait()
            # nats-py gave up on this client (e.g. the server refused our credentials):
            # start over with a new one.
            session.current = False
            self._nc, self._js = None, None
            self._set_state(LinkState.OFFLINE)
            await _close_quietly(nc)

    def _options(self, session: _Session) -> dict[str, Any]:
        async def error_cb(exc: Exception) -> None:
            if is_connection_error(exc):
                # A drop or a failed (re)connect: the state change and the backoff loop
                # already say so.
                log.debug("nats_error", url=self._shown_url, error=repr(exc))
            else:
                # Permission violations and other server errors only ever arrive here.
                log.warning("nats_error", url=self._shown_url, error=repr(exc))
            if session.tls_error is None and explain_tls_error(exc, self._conn_options) is not None:
                session.tls_error = exc
            if session.current:
                self._last_error = f"{type(exc).__name__}: {exc}"

        async def disconnected_cb() -> None:
            # nats-py calls this on the drop and again on close; count the drop once.
            if session.current and self._state is LinkState.ONLINE:
                self._disconnects += 1
                self._set_state(LinkState.OFFLINE)

        async def reconnected_cb() -> None:
            nc = self._nc
            if session.current and self._conn_options.tls and nc is not None and not tls_in_use(nc):
                # A server (or something in between) answered the reconnect in plain text.
                log.error("nats_tls_missing", url=self._shown_url, error=_NO_TLS)
                self._last_error = _NO_TLS
                await _close_quietly(nc)
                return
            if session.current:
                self._connects += 1
                self._set_state(LinkState.ONLINE)

        async def closed_cb() -> None:
            session.closed.set()

        return {
            "name": self._name,
            "inbox_prefix": self._prefix,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": self._reconnect_time_wait,
            "connect_timeout": self._connect_timeout,
            "pending_size": self._pending_size,
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "closed_cb": closed_cb,
            "require_tls": self._conn_options.tls,
            **self._tls,
        }


class _Session:
    """One nats-py client's lifetime, so a stale client cannot move the link's state."""

    def __init__(self) -> None:
        self.current = False
        self.closed = anyio.Event()
        self.tls_error: BaseException | None = None  #: the first TLS refusal seen


async def _close_quietly(nc: NATS, timeout: float = 5.0) -> None:
    """Close a client, shielded and bounded by ``timeout`` seconds; errors of an already broken
    client are logged."""
    with anyio.move_on_after(timeout, shield=True):
        try:
            await nc.close()
        except Exception as exc:  # a half-connected client can fail to close cleanly
            log.debug("nats_close_failed", error=repr(exc))


def redact_url(url: str) -> str:
    """``url`` with any password or token replaced by ``***``: what logs and errors show."""

    def hide(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"  # a bare user is a token

    return re.sub(r"(://)([^/@,]+)@", hide, url)


def split_servers(url: str) -> tuple[list[str], dict[str, str]]:
    """``"nats://u:p@a:4222,nats://u:p@b:4222"`` → ``(["nats://a:4222", "nats://b:4222"],
    {"user": "u", "password": "p"})``; a user without a password is a token.

    nats-py takes several servers only as a list, and applies credentials written in a URL to
    that URL alone — not to the cluster members it discovers and fails over to — so they
    become connect options, which apply to every server. Raises ``ValueError`` for an empty
    entry or for URLs with different credentials (the message never shows a password).
    """
    servers: list[str] = []
    creds: set[tuple[str, str | None]] = set()
    for raw in url.split(","):
        part = raw.strip()
        scheme, sep, rest = part.partition("://")
        if not sep:
            scheme, rest = "nats", part
        userinfo, at, hostport = rest.rpartition("@")
        if not hostport:
            raise ValueError(f"url has an empty server entry: {', '.join(servers) or '(first)'}")
        if at:
            user, colon, password = userinfo.partition(":")
            creds.add((unquote(user), unquote(password) if colon else None))
        servers.append(f"{scheme}://{hostport}")
    if len(creds) > 1:
        raise ValueError(f"the servers {servers} carry different credentials; use one user for all")
    if not creds:
        return servers, {}
    user, secret = creds.pop()
    return servers, ({"token": user} if secret is None else {"user": user, "password": secret})


#: URL schemes nats-py connects with.
_SCHEMES = ("nats", "tls", "ws", "wss")


def check_nats_url(url: object) -> str:
    """``url`` if each of its comma-separated servers is ``scheme://[user[:password]@]host[:port]``
    with a scheme of ``_SCHEMES``, or ``host:port`` (meaning ``nats://``); else ``ValueError``
    saying what is wrong in one line (never showing a password). ``http://`` is refused: it
    is the server's monitoring port, not the client protocol."""
    if not isinstance(url, str) or ":" not in url:
        raise ValueError(f"url must be a NATS URL like 'nats://host:4222', got {url!r}")
    for raw in url.split(","):
        part = raw.strip()
        shown = redact_url(part)
        if ":" not in part:
            raise ValueError(f"url must be a NATS URL like 'nats://host:4222', got {shown!r}")
        parts = urlsplit(part if "://" in part else f"nats://{part}")
        if parts.scheme in ("http", "https"):
            raise ValueError(
                f"{shown!r} is an HTTP URL; NATS clients connect with nats://host:4222 "
                "(HTTP is only the server's monitoring port)"
            )
        if parts.scheme not in _SCHEMES:
            raise ValueError(f"{shown!r}: scheme {parts.scheme!r} is not one of nats, tls, ws, wss")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{shown!r} has no valid port: use host:4222") from None
        if not parts.hostname or (":" in parts.netloc.rpartition("@")[2] and port is None):
            raise ValueError(f"{shown!r} is not a NATS URL like nats://host:4222")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{shown!r} has a path or query; a NATS URL is nats://host:4222")
    return url


def _check_url(url: object) -> None:
    check_nats_url(url)
