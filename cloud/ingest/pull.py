"""Batches from a durable JetStream pull consumer, by the pull protocol itself (docs/decisions/0002).

Why not nats-py's ``PullSubscription.fetch``: it takes each message of a batch through
``next_msg``, which creates two asyncio tasks and a uuid per message. Measured here (``slmops
bench ingest``'s fleet, 1024-message batches, ack-all): about 60 µs per message through
``fetch`` against about 20 µs through one callback subscription, most of the gap being that
per-message machinery. ``PullBatches`` keeps one core-NATS subscription on a wildcard inbox
and sends the pull requests itself:

* A request goes to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`` with its own reply
  subject ``<inbox>.<n>``, so a status (404, 408, 409) says which request it ends; messages
  carry their stream subject and are counted against the open request.
* ``fetch`` first asks with ``no_wait`` (the server sends what it has, up to the batch, then a
  404 if that was less); only when nothing was there does it send a lingering request that
  expires with the fetch timeout (the server ends it with a 408), and returns when that
  request is full or has ended: under light traffic a fetch takes up to the timeout.
* A full batch is returned at once and the next ``no_wait`` request goes out with it, so the
  server delivers the next batch while the caller handles this one (``prefetch``). At most one
  request is open at any time, and ``max_ack_pending`` must leave room for two batches.
* Messages that arrive for a request already given up on (a reconnect, a late delivery) are
  valid messages and go into the buffer like any other; statuses of old requests are ignored.

``close()`` waits (bounded) for the open request to end and naks whatever was delivered but
not handed out, so another consumer instance gets it at once rather than after ``ack_wait``.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager

import anyio
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.jetstream import nats_errors, url_of

__all__ = ["ConsumerGone", "PullBatches", "PullError"]

log = structlog.get_logger(__name__)

#: Statuses that end a pull request without an error (docs/decisions/0002): no messages (no_wait), request
#: expired, idle heartbeat (never asked for here, ignored if sent).
_NO_MESSAGES = "404"
_EXPIRED = "408"
_HEARTBEAT = "100"
_NO_RESPONDERS = "503"
#: Grace beyond a request's own expiry before the client stops waiting for its answer (the
#: server's 408 normally comes first; a lost connection is the case this covers).
_GRACE = 2.0
_CLOSE_WAIT = 2.0


class PullError(Exception):
    """The server ended a pull request with an error status (e.g. 409 Exceeded MaxWaiting,
    503 no JetStream); the message names the status and its description."""

    def __init__(self, stream: str, durable: str, status: str, description: str) -> None:
        self.status = status
        self.description = description
        super().__init__(f"pull from {stream}/{durable}: status {status} {description}".rstrip())


class ConsumerGone(PullError):
    """Nobody serves the consumer: it was deleted (409 Consumer Deleted), or the request had
    no responders (503: no such consumer or stream, or JetStream not up yet). Bind or create
    it again."""


class PullBatches:
    """``async with PullBatches(nc, stream, durable) as pull: msgs = await pull.fetch(n, t)``."""

    def __init__(self, nc: Client, stream: str, durable: str, *, prefetch: bool = True) -> None:
        self._nc = nc
        self._stream = stream
        self._durable = durable
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._prefetch = prefetch
        self._inbox = ""
        self._sub: Subscription | None = None
        self._buf: list[Msg] = []
        self._seq = 0
        #: The open request: its reply token, and how many messages it may still bring.
        self._open: str | None = None
        self._remaining = 0
        self._deadline = 0.0
        self._want = 0
        self._wake: anyio.Event | None = None
        self._error: PullError | None = None
        self.requests = 0
        self.stale = 0

    async def __aenter__(self) -> PullBatches:
        self._inbox = self._nc.new_inbox()
        with self._errors():
            self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        return self

    def _errors(self) -> AbstractContextManager[None]:
        return nats_errors("consumer", f"{self._stream}/{self._durable}", url_of(self._nc))

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            # A message carries its stream subject, not the reply subject of its request: it
            # is counted against the open request (a late one of an abandoned request can
            # only end the open one early, and a new request then goes out).
            self._buf.append(msg)
            if self._open is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._open = None
                else:
                    # Still delivering: a big batch on a slow link is not overdue.
                    self._deadline = max(self._deadline, time.monotonic() + _GRACE)
            if len(self._buf) >= self._want or self._open is None:
                self._notify()
            return
        if status == _HEARTBEAT or msg.subject != f"{self._inbox}.{self._open}":
            self.stale += 1
            return  # a heartbeat, or the end of a request given up on already
        self._open = None
        if status not in (_NO_MESSAGES, _EXPIRED):
            # nats-py leaves the raw header block in a 503's description: first line only.
            description = (headers.get("Description", "") if headers else "").strip().split("\n")[0]
            gone = status == _NO_RESPONDERS or "consumer deleted" in description.lower()
            kind = ConsumerGone if gone else PullError
            self._error = kind(self._stream, self._durable, status, description)
        self._notify()

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _request(self, batch: int, expires: float | None) -> None:
        self._seq += 1
        token = str(self._seq)
        body: dict[str, object] = {"batch": batch}
        if expires is None:
            body["no_wait"] = True
            self._deadline = time.monotonic() + _GRACE
        else:
            body["expires"] = int(expires * 1e9)
            self._deadline = time.monotonic() + expires + _GRACE
        # Set before publishing: the answer can arrive before publish() returns.
        self._open, self._remaining = token, batch
        self.requests += 1
        try:
            with self._errors():
                await self._nc.publish(self._api, json.dumps(body).encode(), reply=f"{self._inbox}.{token}")
        except BaseException:
            self._open = None
            raise

    async def _wait(self, want: int) -> None:
        """Until ``want`` messages are buffered or the open request has ended (or its answer
        is overdue: then it is given up on)."""
        while len(self._buf) < want and self._open is not None:
            self._want = want
            self._wake = anyio.Event()
            with anyio.move_on_after(max(0.0, self._deadline - time.monotonic())):
                await self._wake.wait()
            self._wake = None
            if self._open is not None and time.monotonic() >= self._deadline:
                log.warning("pull_request_overdue", stream=self._stream, durable=self._durable)
                self._open = None

    def _take(self, batch: int) -> list[Msg]:
        out, self._buf = self._buf[:batch], self._buf[batch:]
        return out

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages; ``[]`` when none came within ``timeout`` seconds.
        Raises ``PullError`` (``ConsumerGone``) when the server refused the request, and
        ``NatsUnavailable`` when the connection is closed."""
        if self._sub is None:
            raise RuntimeError("PullBatches used outside 'async with'")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        if len(self._buf) < batch and self._open is None:
            await self._request(batch - len(self._buf), None)
        await self._wait(batch)
        self._raise_error()
        if not self._buf:
            # Nothing there: one lingering request, answered when messages come or at expiry.
            await self._request(batch, timeout)
            await self._wait(batch)
            self._raise_error()
        out = self._take(batch)
        if self._prefetch and len(out) == batch and self._open is None:
            await self._request(batch, None)
        return out

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is None:
            return
        with anyio.move_on_after(_CLOSE_WAIT, shield=True):
            await self._wait(1 << 30)  # the open request's answer, so nothing is left in flight
        # Separately bounded: a request that outlives the wait above must not cost the naks.
        # (Once its status came, every message before it has been through ``_on_msg``.)
        with anyio.move_on_after(_CLOSE_WAIT, shield=True):
            await self._nak_buffered()
            try:
                with self._errors():
                    await sub.unsubscribe()
            except (NatsUnavailable, JetStreamRefused) as exc:
                log.debug("unsubscribe_failed", error=repr(exc))
            await self._nak_buffered()  # any that came while the naks above went out

    async def _nak_buffered(self) -> None:
        buffered, self._buf = self._buf, []
        for msg in buffered:
            if not msg.is_acked:
                with self._errors():
                    await msg.nak()
