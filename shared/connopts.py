"""How a NATS client proves itself and checks the server, beyond the URL: TLS files and
NATS creds (per-device JWT identities).

``ConnectOptions`` is what every connecting command and service takes besides the URL
(``--tls-ca``, ``--tls-cert``, ``--tls-key``; env ``SLMOPS_TLS_CA``/``_CERT``/``_KEY``).
With any TLS file given the client *requires* TLS, and starts it before any NATS message
(nats-py's ``tls_handshake_first``; the server's ``tls { handshake_first: ... }``, which
``slmops server`` sets): a server that answers in plain text fails the handshake before the
client has sent anything else — no CONNECT, so no URL password or creds signature, reaches it
— and a server certificate that does not verify against the CA is refused with the
certificate problem named. A server without ``handshake_first`` cannot serve these clients
(``explain_tls_error`` says so).

Commands set the default for their run (``with use_connect_options(...)``); library code that is given
no options reads it (``current_connect_options``), so the long tail of one-shot commands
(registry, rollout, fleet status...) connects the same way as the command's flags say.
"""

from __future__ import annotations

import contextvars
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PLAIN_TEXT",
    "ConnectOptions",
    "TlsError",
    "collect_permission_denials",
    "current_connect_options",
    "explain_tls_error",
    "note_permission_denial",
    "permission_denial",
    "use_connect_options",
]


#: How ``explain_tls_error`` starts when a server answered our TLS hello in plain text.
PLAIN_TEXT = "the server answered in plain text, not TLS, but TLS files were given (--tls-ca/--tls-cert)"


class TlsError(ValueError):
    """A TLS file that cannot be used (missing, unreadable, not PEM, key not matching)."""

    def __init__(self, what: str, path: Path | None, reason: str) -> None:
        self.what, self.path, self.reason = what, path, reason
        where = f" {str(path)!r}" if path is not None else ""
        super().__init__(f"{what}{where}: {reason}")


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """TLS settings of one NATS client (all optional; none = plain ``nats://``).

    - ``tls_ca``: PEM file of the CA(s) the server's certificate must chain to; without it
      the system's trust store is used (only when ``tls_cert`` is given or the URL is
      ``tls://``).
    - ``tls_cert`` + ``tls_key``: this client's certificate and private key (PEM), for a
      server that verifies clients (mutual TLS). One without the other is a ``ValueError``.
    - ``nats_creds``: a NATS ``.creds`` file (user JWT + NKey seed; ``slmops fleet enroll``)
      for a server in operator mode (decentralized JWT auth, issue 17). Not together with a
      user or password in the URL (``connect_attempt`` says so).
    """

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    nats_creds: Path | None = None

    def __post_init__(self) -> None:
        for name in ("tls_ca", "tls_cert", "tls_key", "nats_creds"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise ValueError(
                f"{given} (--{given.replace('_', '-')}) needs {missing} (--{missing.replace('_', '-')}) too: "
                "a client certificate and its private key go together"
            )

    @classmethod
    def of(cls, config: object) -> ConnectOptions:
        """The options of a config with ``tls_ca``/``tls_cert``/``tls_key`` (and ``nats_creds``)
        fields (paths as strings or None), as the edge and cloud configs have."""
        names = ("tls_ca", "tls_cert", "tls_key", "nats_creds")
        return cls(**{name: getattr(config, name, None) for name in names})

    @property
    def tls(self) -> bool:
        """True when any TLS file is given: the client then requires TLS."""
        return self.tls_ca is not None or self.tls_cert is not None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the server (against ``tls_ca`` or the system store)
        and presents ``tls_cert`` when given. Raises ``TlsError`` naming the file at fault."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.tls_ca is not None:
            _check_file("--tls-ca", self.tls_ca)
            try:
                ctx.load_verify_locations(cafile=str(self.tls_ca))
            except (ssl.SSLError, ValueError) as exc:
                raise TlsError("--tls-ca", self.tls_ca, f"not a PEM CA certificate ({exc})") from None
        if self.tls_cert is not None and self.tls_key is not None:
            _check_file("--tls-cert", self.tls_cert)
            _check_file("--tls-key", self.tls_key)
            try:
                ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key))
            except ssl.SSLError as exc:
                raise TlsError(
                    "--tls-cert/--tls-key",
                    self.tls_cert,
                    f"certificate and key cannot be used together ({exc.reason or exc})",
                ) from None
        return ctx

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.NATS.connect`` (``{}`` without TLS or creds). Raises
        ``TlsError`` for a TLS file, ``IdentityError`` (a ``ValueError`` naming the file) for
        a creds file that cannot be read or is not one."""
        out: dict[str, Any] = {"tls": self.ssl_context(), "tls_handshake_first": True} if self.tls else {}
        if self.nats_creds is not None:
            from slmops.shared.identity import read_creds

            read_creds(self.nats_creds)  # a broken file is a start-up error, not a retry loop
            out["user_credentials"] = str(self.nats_creds)
        return out

    def merged(self, fallback: ConnectOptions) -> ConnectOptions:
        """These options, with each unset field taken from ``fallback``."""
        return ConnectOptions(
            tls_ca=self.tls_ca or fallback.tls_ca,
            tls_cert=self.tls_cert or fallback.tls_cert,
            tls_key=self.tls_key or fallback.tls_key,
            nats_creds=self.nats_creds or fallback.nats_creds,
        )


def _check_file(what: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024)
    except OSError as exc:
        raise TlsError(what, path, exc.strerror or str(exc)) from None
    if b"-----BEGIN " not in head:
        raise TlsError(what, path, "not a PEM file (no '-----BEGIN' line)")


def explain_tls_error(exc: BaseException, options: ConnectOptions | None) -> str | None:
    """A one-line reason for a failed TLS handshake, naming the certificate problem and the
    option to look at; None when ``exc`` is not a TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        ca = options.tls_ca if options is not None else None
        against = f"--tls-ca {str(ca)!r}" if ca is not None else "the system trust store (give --tls-ca)"
        return f"the server's TLS certificate does not verify against {against}: {detail}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        lowered = reason.lower().replace("_", " ")
        mine = options.tls_cert if options is not None else None
        if "wrong version number" in lowered or "record layer failure" in lowered:
            # Our TLS hello was answered by something that is not TLS: a plain-text server's
            # INFO line. Only the hello was sent (tls_handshake_first): no CONNECT, no password.
            return (
                f"{PLAIN_TEXT} ({reason}); nothing but the TLS hello was sent to it. A nats-server "
                "serving TLS needs `handshake_first` in its tls block (`slmops server` sets it)"
            )
        if "certificate required" in lowered or (mine is None and "handshake failure" in lowered):
            return (
                f"the server requires a client certificate (mutual TLS) and got none ({reason}): "
                "give --tls-cert and --tls-key"
            )
        if any(word in lowered for word in ("unknown ca", "bad certificate", "certificate unknown")):
            return (
                f"the server refused our client certificate --tls-cert {str(mine)!r} ({reason}): "
                "it is not signed by a CA the server trusts, or has expired"
            )
        return f"TLS handshake failed: {reason}"
    return None


_current: contextvars.ContextVar[ConnectOptions] = contextvars.ContextVar(
    "connect_options",
    default=ConnectOptions(),  # noqa: B039 -- frozen, so one shared default is safe
)


def current_connect_options() -> ConnectOptions:
    """The options the running command was given (``ConnectOptions()`` if none)."""
    return _current.get()


@contextmanager
def use_connect_options(options: ConnectOptions) -> Iterator[None]:
    """Within the block, ``options`` are the default of every connection made in this context
    (tasks and worker threads started inside inherit it); the previous default comes back
    after it, so one command's TLS files never leak into the next (tests run many)."""
    if not isinstance(options, ConnectOptions):
        raise TypeError(f"options must be ConnectOptions, got {options!r}")
    token = _current.set(options)
    try:
        yield
    finally:
        _current.reset(token)


#: nats-py's words for the server's ``-ERR 'Permissions Violation for ...'`` (it lower-cases them).
_VIOLATION = "permissions violation for "

_denials: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "permission_denials", default=None
)


def permission_denial(exc: BaseException) -> str | None:
    """What the server refused, as in ``publish to "$js.api.stream.info.kv_slmops_fleet"``,
    when ``exc`` is a permission violation; else None. nats-py hands these only to the error
    callback (the refused request itself just times out) and lower-cases the server's text, so
    the subject is shown lower-cased."""
    text = str(exc)
    at = text.find(_VIOLATION)
    return text[at + len(_VIOLATION) :].strip() if at >= 0 else None


def note_permission_denial(exc: BaseException) -> None:
    """Record ``exc`` for the enclosing ``collect_permission_denials`` block, if it is a
    permission violation and there is such a block (called by the error callback of
    ``connect.connect_once``'s clients)."""
    denied, what = _denials.get(), permission_denial(exc)
    if denied is not None and what is not None and what not in denied:
        denied.append(what)


@contextmanager
def collect_permission_denials() -> Iterator[list[str]]:
    """A list that collects what the server refused (``permission_denial``) to the clients
    ``connect_once`` makes within the block, in order, each once: a command that then fails on
    a timeout can say "permission denied" instead (``slmops.cli_common.run``)."""
    denied: list[str] = []
    token = _denials.set(denied)
    try:
        yield denied
    finally:
        _denials.reset(token)
