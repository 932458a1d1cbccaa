"""The node's local HTTP API (aiohttp, meant for loopback):

- ``POST /v1/predict`` ``{"text": "..."}`` or ``{"texts": [...]}``, optional ``"model":
  "<name>"`` (a node serves several models side by side; default: its first classifier,
  and for ``/v1/embed`` its first embedding model) → ``{"predictions": [{
  "prediction_id", "label", "confidence", "model": {...}, "durable"}], "model": {name, version,
  variant}, "durable": bool}`` — ``durable`` is false when the node's disk failed and the
  answer's telemetry was counted in the loss receipt instead of stored (``/v1/health``
  ``storage`` is then "degraded")
- ``POST /v1/embed`` (embedding models) ``{"text": "..."}`` or ``{"texts": [...]}`` →
  ``{"embeddings": [[...], ...], "model": {...}, "durable": bool}`` (L2-normalised vectors)
- ``POST /v1/feedback`` ``{"prediction_id": "...", "label": "..."}`` → ``{"ok": true}``
- ``POST /v1/generate`` and the OpenAI-compatible ``POST /v1/chat/completions`` (generation
  models; ``"stream": true`` for server-sent events): see ``edge.chat``; 429 ``busy`` with
  ``Retry-After`` when every generation slot and queue place is taken
- ``GET /v1/models`` → OpenAI's list of models (``edge.chat.list_models``)
- ``GET /v1/health`` → ``EdgeNode.health()``
- ``GET /metrics`` → Prometheus text format

Errors are JSON ``{"error": {"code", "field", "message", "param"}}`` with a 4xx status naming
the field (``param``: the same, OpenAI's name for it); 503 ``no_model`` until a model is
installed. Nothing a client sends can stop the node.

Resources are bounded (issue 13): request bodies in memory share one byte budget
(``http_inflight_bytes``; a request waits for room, small ones fit beside big ones; 503
``busy`` after ``_BUDGET_WAITS`` read timeouts without room). The budget covers all a body
costs while it is held: a request reserves twice its Content-Length (its bytes, read into one
buffer, and its decoded texts side by side while msgspec decodes them — UTF-8 is checked by
that decode, never by decoding the whole body to a str) and gives back the bytes' share once
they are freed; a body with a character beyond Latin-1 reserves its characters at 2 or 4
bytes each (``_char_width``: a str is stored at its widest character's width). Predict,
embed and feedback bodies are decoded straight into their typed Structs, so a value of the
wrong shape fails at its first byte: decoded as any JSON, a 10 MB
body of ``[[],[],...]`` became 212 MB of Python lists; a body holding more strings than its
endpoint takes is refused before decoding (a list of 2-character strings decodes to 12x its
size). Bodies of the generation endpoints are decoded as any JSON: they hold, besides
their bytes, ``_VALUE_COST`` per value their punctuation allows (``_values_at_most``), and
one whose bound exceeds the whole budget is refused before decoding. A client has
``http_read_timeout`` seconds to deliver its body (408 and disconnect) and
``http_head_timeout`` seconds to deliver a request head, counted from when it connected or
got its last answer (slowloris; closed without an answer: aiohttp's keep-alive timer, which
closes a connection whose next request head is incomplete when it fires), aiohttp buffers at
most ``_READ_BUFSIZE`` bytes per connection before the handler reads, JSON nested too
deeply is a 400, and the node runs a big request in slices so a small one is not queued
behind it (``EdgeNode.predict``).

The command serves the API of a running node (``async with EdgeNode(config) as node,
serve_api(node, host, port) as api:``); this module knows the node only through the
``NodeService`` protocol, so it imports nothing of ``edge.node``.
"""

from __future__ import annotations

import codecs
import ctypes
import ctypes.util
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import anyio
import msgspec
import structlog
from aiohttp import web

from slmops.edge.chat import chat_completions, generate, list_models
from slmops.edge.config import EdgeConfig, is_loopback
from slmops.edge.errors import Busy, FeedbackConflict, InvalidInput, NodeClosed, NoModel, UnknownPrediction
from slmops.edge.generate import Generations
from slmops.edge.inference import InferenceFailed
from slmops.edge.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from slmops.edge.metrics import NodeMetrics
from slmops.shared.httpauth import bearer_refusal

__all__ = ["ApiServer", "NodeService", "build_app", "serve_api"]


class _Counters(Protocol):
    @property
    def served(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def batches(self) -> int: ...
    @property
    def model_seconds(self) -> float: ...
    @property
    def published(self) -> int: ...


class NodeService(Protocol):
    """What the API needs of a node (``edge.node.EdgeNode`` is one)."""

    @property
    def config(self) -> EdgeConfig: ...
    @property
    def log(self) -> Any: ...
    def texts(self, value: object, field: str = "texts", *, one: bool | None = None) -> Sequence[str]: ...
    async def predict(self, texts: Sequence[str], model: str | None = None) -> Sequence[Any]: ...
    async def embed(self, texts: Sequence[str], model: str | None = None) -> Any: ...
    async def feedback(self, prediction_id: str, label: str) -> None: ...
    def health(self) -> dict[str, Any]: ...
    def statistics(self) -> _Counters: ...
    @property
    def generations(self) -> Generations: ...


_NODE: web.AppKey[NodeService] = web.AppKey("node")
_COUNTS: web.AppKey[dict[tuple[str, int], int]] = web.AppKey("counts")
_METRICS: web.AppKey[NodeMetrics] = web.AppKey("metrics")
_LIMIT: web.AppKey[int] = web.AppKey("body_limit")
_BUDGET: web.AppKey[ByteBudget] = web.AppKey("byte_budget")
#: After serving a body this big, hand freed heap back to the OS (see ``_trim``).
_TRIM_AFTER = 1024 * 1024
#: A request waits at most this many read timeouts for room in the byte budget (then 503):
#: a queue of big bodies is served in turn rather than refused at the first read timeout.
_BUDGET_WAITS = 3


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc only: AttributeError elsewhere)
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to trim or pin
        return None


def _malloc_trim() -> Callable[[], object] | None:
    libc = _glibc()
    return None if libc is None else cast("Callable[[], object]", lambda: libc.malloc_trim(0))


_trimmer = _malloc_trim()
#: glibc's ``M_MMAP_THRESHOLD`` (malloc.h) and the value it starts at (128 KiB).
_M_MMAP_THRESHOLD, _MMAP_THRESHOLD = -3, 128 * 1024


def _pin_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its 128 KiB start, so a body's buffer and its bigger
    decoded texts are always their own mappings, handed back to the OS when freed. glibc
    otherwise raises the threshold to the size of each freed mapping (up to 32 MiB), and
    later bodies land in the heap, where freed pages stay resident until ``malloc_trim``:
    16 concurrent 10 MB bodies then took RSS 8-9 MiB beyond the byte budget (+41.6 and +42.6
    MiB for a 32 MiB budget; +32.7 with the threshold pinned), measured with a sampler thread
    in the node (RSS from /proc, tracemalloc for what Python holds). Setting it turns off
    glibc's adjustment for the whole process (``mallopt(3)``). False where it is not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


def _trim() -> None:
    """glibc keeps the heap a big request's texts were decoded into (after a freed 10 MB
    buffer its mmap threshold rises, so later big buffers land in the heap too): RSS then
    grew with every 10 MB request served (+224 MB after 16, 3 at a time). ``malloc_trim``
    returns the free pages; ~1 ms, once per big request."""
    if _trimmer is not None:
        _trimmer()


#: Bytes aiohttp reads ahead per connection before the handler asks (its default is 64 KiB,
#: paused at twice that): 1,000 half-sent bodies then hold ~32 MiB, not ~130 MiB.
_READ_BUFSIZE = 16 * 1024
_json = msgspec.json.Encoder()
_decode_any = msgspec.json.Decoder(dict[str, Any])
#: What one decoded string costs beyond its characters: the str header (49-80 bytes) and the
#: list slot (8), rounded up; the decoded-size bound of a typed body (``_decoded_bound``).
_STR_COST = 96


class ByteBudget:
    """Bytes of request bodies held at once, over all connections. ``acquire(n)`` waits until
    ``n`` more fit (a request larger than the whole budget waits until it is alone), so a
    small request gets in while big ones wait; ``release(n)`` gives them back."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = anyio.Event()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)
        while self.used + n > self.capacity:
            changed = self._changed
            await changed.wait()
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


class _Hold:
    """The bytes of the budget one request holds; ``keep(n)`` gives back all but ``n``."""

    def __init__(self, budget: ByteBudget, held: int) -> None:
        self.budget, self.held = budget, held

    def keep(self, n: int) -> None:
        if n < self.held:
            self.budget.release(self.held - n)
            self.held = n

    async def grow(self, n: int, timeout: float) -> None:
        """Hold ``n`` more; raises ``_TooSlow`` (503) when no room came within ``timeout``."""
        got = 0
        with anyio.move_on_after(timeout):
            got = await self.budget.acquire(n)
        if not got:
            raise _TooSlow(503, "busy", f"no room to decode the body within {timeout:g} s; retry")
        self.held += got


_HOLD: web.RequestKey[_Hold] = web.RequestKey("budget_hold", _Hold)


class _PredictBody(msgspec.Struct, forbid_unknown_fields=True):
    text: str | None = None
    texts: list[str] | None = None
    model: str | None = None


class _FeedbackBody(msgspec.Struct, forbid_unknown_fields=True):
    prediction_id: str | None = None
    label: str | None = None


#: Typed decoders: a value of the wrong type is refused where it starts, never built.
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    _PredictBody: msgspec.json.Decoder(_PredictBody),
    _FeedbackBody: msgspec.json.Decoder(_FeedbackBody),
}
#: Strings a body may hold beyond its texts (keys and the model name), for ``_strings_at_least``.
_OTHER_STRINGS = 8


def _strings_at_least(raw: bytes | bytearray) -> int:
    """A lower bound on the JSON strings in ``raw``, in two C-speed scans: every real quote
    mark is one not escaped, and every escaped one follows a backslash."""
    return (raw.count(b'"') - raw.count(b'\\"')) // 2


#: What one decoded JSON value of any kind costs at most beyond its characters: an object
#: (dict 64-232 bytes, list 56, str 49-80, int 28, float 24) and its slot in its container
#: (a list's pointer, a dict's entry), rounded up.
_VALUE_COST = 128


def _values_at_most(raw: bytes | bytearray) -> int:
    """An upper bound on the JSON values (keys included) in ``raw``: each value but the first
    of its container follows a comma, each key precedes a colon, each container opens with a
    bracket; those bytes inside strings only raise the bound."""
    return sum(raw.count(c) for c in (b",", b":", b"[", b"{")) + 1


#: Bytes that make a decoded str wider than Latin-1: a UTF-8 lead byte of U+0100 or above
#: (UCS-2), of an astral character (UCS-4), and ``\\u`` escapes (a surrogate pair: UCS-4).
_UCS2_BYTE = re.compile(rb"[\xc4-\xff]")
_UCS4_BYTE = re.compile(rb"[\xf0-\xff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abAB]")


def _char_width(raw: bytes | bytearray) -> int:
    """Bytes per character a str decoded from ``raw`` can be stored at (1, 2 or 4): CPython
    stores a whole str at the width of its widest character, so one emoji makes each ASCII
    character of its string 4 bytes. Judged over the whole body (C-speed scans, no copy)."""
    if _UCS4_BYTE.search(raw) or _SURROGATE_ESCAPE.search(raw):
        return 4
    if _UCS2_BYTE.search(raw) or b"\\u" in raw:
        return 2
    return 1


#: UTF-8 continuation bytes (0x80-0xBF): every other byte starts a character.
_CONTINUATION = bytes(range(0x80, 0xC0))


def _chars_at_most(raw: bytes | bytearray, width: int) -> int:
    """An upper bound on the characters ``raw``'s strings decode to: its bytes for a body of
    width 1, else the bytes that start a UTF-8 character (counted in 64 KiB steps)."""
    if width == 1:
        return len(raw)
    step = 1 << 16
    return sum(len(raw[i : i + step].translate(None, _CONTINUATION)) for i in range(0, len(raw), step))


def _decoded_bound(raw: bytes | bytearray, width: int | None = None) -> int:
    """Bytes a typed body's decoded values can hold at most: its characters
    (``_chars_at_most``), each stored at ``_char_width`` bytes (a 2,000,016-byte body of
    2,000,000 ``a`` and one emoji decodes to an 8,000,080-byte str; a body of emoji only, to
    about its length), plus ``_STR_COST`` per string (``width``: ``_char_width(raw)`` when
    already known)."""
    width = width or _char_width(raw)
    return width * _chars_at_most(raw, width) + _STR_COST * (raw.count(b'"') // 2 + 1)


def _invalid(exc: msgspec.ValidationError) -> InvalidInput:
    """The field a msgspec validation error names (``$.texts[1]`` -> ``texts[1]``; an
    unknown field by its name; the whole document -> ``body``)."""
    text = str(exc)
    if " - at `$" in text:
        path = text.rsplit(" - at `$", 1)[1].rstrip("`").lstrip(".")
        return InvalidInput(path or "body", text)
    unknown = text.startswith("Object contains unknown field `")
    return InvalidInput(text.split("`")[1] if unknown else "body", text)


def _error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    # "param" is OpenAI's name for "field" (its clients read it, e.g. BadRequestError.param).
    body = {"error": {"code": code, "field": field, "message": message, "param": field}}
    return web.Response(status=status, body=_json.encode(body), content_type="application/json")


def _ok(payload: Any) -> web.Response:
    return web.Response(body=_json.encode(payload), content_type="application/json")


async def _body(request: web.Request, type_: type[Any]) -> Any:
    """Decode the request body as JSON into ``type_``; raises ``InvalidInput``."""
    if request.content_type not in ("application/json", "", "application/octet-stream", "text/plain"):
        raise InvalidInput(
            "body",
            f"content type {request.content_type!r} is not application/json "
            "(with curl: -H 'Content-Type: application/json')",
        )
    raw = await _read(request)
    if not raw or raw.isspace():  # (strip() would copy a bytearray)
        raise InvalidInput("body", "is empty; send a JSON object")
    typed = _DECODERS.get(type_)
    if typed is not None:
        most = _OTHER_STRINGS + (request.app[_NODE].config.max_texts if type_ is _PredictBody else 0)
        if _strings_at_least(raw) > most:
            raise InvalidInput(
                "body", f"holds more than {most} JSON strings (more texts than one request takes)"
            )
    width = _char_width(raw)
    hold = request.get(_HOLD)
    need = 0
    bound = _decoded_bound(raw, width) if typed is not None else 0
    if typed is None and hold is not None:  # any JSON: each value may be an object of its own
        values = _values_at_most(raw)
        bound = width * _chars_at_most(raw, width) + _VALUE_COST * values
        need = len(raw) + len(raw) // 8 + bound  # the bytes and their values at once
        if need > hold.budget.capacity:
            raise InvalidInput(
                "body",
                f"holds up to {values} JSON values: with them decoded it could take {need} bytes, "
                f"more than the node's {hold.budget.capacity}-byte budget for request bodies",
            )
    elif hold is not None and width > 1:
        # wider than Latin-1: the decoded texts can take up to 4x the bytes (ASCII bodies
        # keep the 2.125x their read reserved)
        need = len(raw) + bound
        if need > hold.budget.capacity:
            raise InvalidInput(
                "body",
                f"its texts decoded could take {need} bytes (one character beyond Latin-1 stores "
                f"a whole string at 2 or 4 bytes a character), more than the node's "
                f"{hold.budget.capacity}-byte budget for request bodies",
            )
    if hold is not None and need > hold.held:
        await hold.grow(need - hold.held, _BUDGET_WAITS * request.app[_NODE].config.http_read_timeout)
    try:
        # checks UTF-8 itself: no decoded copy of the body
        data = typed.decode(raw) if typed is not None else _decode_any.decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from exc
    except msgspec.DecodeError as exc:
        bad = _bad_utf8(raw)
        if bad is not None:
            raise InvalidInput("body", f"is not valid UTF-8 (byte {bad})") from exc
        lone = _lone_surrogate(raw)
        if lone is not None:  # msgspec calls a lone high one "Input data was truncated"
            raise InvalidInput(
                "body",
                f"is not valid JSON: lone UTF-16 surrogate escape {lone[1]} at byte {lone[0]} "
                r"(\uD800-\uDBFF must be followed by \uDC00-\uDFFF; send the character as UTF-8)",
            ) from exc
        raise InvalidInput("body", f"is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidInput("body", "is nested too deeply (send a flat JSON object)") from exc
    del raw  # the bytes' share of the budget goes back: the decoded values keep theirs
    if hold is not None:
        hold.keep(bound)
    return data


def _bad_utf8(raw: bytes | bytearray) -> int | None:
    """The offset of the first byte of ``raw`` that is not valid UTF-8, or None; decoded in
    64 KiB steps (decoding a 10 MB body at once peaked at ~5x its size: UCS-4 worst case)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    step = 1 << 16
    for i in range(0, len(raw), step):
        held = len(decoder.getstate()[0])  # bytes of a character split across steps
        try:
            decoder.decode(raw[i : i + step], final=i + step >= len(raw))
        except UnicodeDecodeError as exc:
            return i - held + exc.start
    return None


#: A ``\uXXXX`` escape preceded by an even number of backslashes (so a real escape), high or
#: low surrogate.
_SURROGATE = re.compile(rb"(?<!\\)(?:\\\\)*(\\u[dD][89a-fA-F][0-9a-fA-F]{2})")
_LOW = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _lone_surrogate(raw: bytes | bytearray) -> tuple[int, str] | None:
    """The byte offset and text of the first surrogate escape in ``raw`` that is not half of
    a high+low pair, or None. Only called on a body msgspec refused (it scans the body once)."""
    pos = 0
    while (m := _SURROGATE.search(raw, pos)) is not None:
        start, escape = m.start(1), m.group(1)
        if escape[2:3] in b"dD" and escape[3:4].lower() in b"89ab":  # high: needs a low next
            if _LOW.match(raw, m.end(1)) is None:
                return start, escape.decode()
            pos = m.end(1) + 6
        else:  # a low one not after a high
            return start, escape.decode()
    return None


class _TooSlow(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


async def _read(request: web.Request) -> bytes | bytearray:
    """The body within the read timeout; raises ``_TooSlow``. A body with a Content-Length
    is gathered in one bytearray, returned as it is: aiohttp's ``read()`` copies its
    bytearray into bytes and keeps those on the request until it is answered (2x the body
    held, 3x at its peak). Not preallocated: a stalled client holds only what it sent."""
    timeout = request.app[_NODE].config.http_read_timeout
    with anyio.move_on_after(timeout) as reading:
        size = request.content_length
        if size is None:
            raw: bytes | bytearray = await request.read()
        else:
            raw = bytearray()
            async for chunk in request.content.iter_any():
                raw += chunk[: size - len(raw)]
    if reading.cancelled_caught:
        raise _TooSlow(408, "request_timeout", f"the body did not arrive within {timeout:g} s")
    return raw


@asynccontextmanager
async def _budgeted(request: web.Request) -> AsyncIterator[None]:
    """Hold twice the request's declared body size (Content-Length, else the body limit) of
    the byte budget while it is read and decoded (its bytes and its decoded values), what its
    decoded values still hold while it is served (``_body`` gives back the rest); raises
    ``_TooSlow`` (503) when no room came within the read timeout."""
    if request.method != "POST":
        yield
        return
    budget = request.app[_BUDGET]
    timeout = request.app[_NODE].config.http_read_timeout
    limit = request.app[_LIMIT]
    want = request.content_length if request.content_length is not None else limit
    if want > limit:  # refused before a byte is read or budgeted
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=want)
    held = 0
    with anyio.move_on_after(_BUDGET_WAITS * timeout):
        held = await budget.acquire(max(1, 2 * want + want // 8))
    if not held:
        raise _TooSlow(
            503, "busy", f"no room for a {want}-byte body within {_BUDGET_WAITS * timeout:g} s; retry"
        )
    hold = request[_HOLD] = _Hold(budget, held)
    try:
        yield
    finally:
        budget.release(hold.held)
        if held >= _TRIM_AFTER:
            _trim()


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _hostname(value: str) -> str:
    """The host part of a Host header or an Origin (``http://h:p``), lower-cased."""
    value = value.split("://", 1)[-1].split("/", 1)[0].lower()
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _foreign(request: web.Request) -> str | None:
    """Why a request to a loopback-bound API did not come from this device's own software,
    or None. A web page in a browser on the device can send "simple" cross-origin POSTs
    (``text/plain``, no preflight) and, by DNS rebinding, reach 127.0.0.1 under its own host
    name; browsers always send ``Origin`` on such POSTs and the page's name as ``Host``."""
    address = request.app[_NODE].config.http_address
    if address is None or not is_loopback(address[0]):
        return None  # bound to a LAN address on purpose: the operator chose who may reach it
    for header, what in (("Host", "a loopback name"), ("Origin", "a page on this device")):
        value = request.headers.get(header)
        if value is not None:
            name = _hostname(value)
            if name not in _LOOPBACK_NAMES and not name.startswith("127."):
                return f"{header} {value!r} is not {what}"
    return None


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    node = request.app[_NODE]
    why = _foreign(request)
    if why is not None:
        return _error(403, "forbidden_origin", f"{why}: the API answers only this device's own clients")
    try:
        async with _budgeted(request):
            response: web.StreamResponse = await handler(request)
    except InvalidInput as exc:
        response = _error(400, "invalid_input", exc.reason, exc.field)
    except _TooSlow as exc:
        response = _error(exc.status, exc.code, str(exc), "body")
        response.force_close()  # the rest of a stalled body is never read
    except UnknownPrediction as exc:
        response = _error(404, "unknown_prediction", str(exc), "prediction_id")
    except FeedbackConflict as exc:
        response = _error(409, "feedback_exists", str(exc), "prediction_id")
    except NoModel as exc:
        response = _error(503, "no_model", str(exc))
    except Busy as exc:
        response = _error(429, "busy", str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
    except NodeClosed as exc:
        response = _error(503, "shutting_down", str(exc))
    except InferenceFailed as exc:
        response = _error(500, exc.code, str(exc))
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[_LIMIT]
        response = _error(413, "too_large", f"body is larger than {limit} bytes", "body")
    except web.HTTPNotFound:
        response = _error(404, "not_found", f"no endpoint {request.path!r}")
    except web.HTTPMethodNotAllowed as exc:
        response = _error(
            405, "method_not_allowed", f"{request.method} not allowed; use {sorted(exc.allowed_methods)}"
        )
    except web.HTTPException as exc:
        response = _error(exc.status, "http_error", exc.reason)
    except ConnectionResetError as exc:
        # The client went away mid-request (aiohttp: "Connection lost" while its body was read,
        # or a closed transport while a stream was written): nobody to answer, nothing broken.
        node.log.info("client_disconnected", path=request.path, error=str(exc))
        response = _error(499, "client_disconnected", "the client closed the connection")  # nginx's 499
        response.force_close()
    except Exception as exc:  # a bug must answer 500, not kill the node
        node.log.exception("api_handler_failed", path=request.path)
        response = _error(500, "internal", f"{type(exc).__name__}")
    counts = request.app[_COUNTS]
    key = (request.path if request.path in _ROUTES else "other", response.status)
    counts[key] = counts.get(key, 0) + 1
    return response


async def _texts(request: web.Request) -> tuple[Sequence[str], str | None]:
    """The validated texts of a ``{"text": ...}`` or ``{"texts": [...]}`` body, and its
    optional ``"model"`` (a model name; None = the node's default for the endpoint)."""
    node = request.app[_NODE]
    body: _PredictBody = await _body(request, _PredictBody)
    if body.model is not None and not isinstance(body.model, str):
        raise InvalidInput("model", f"must be a model name (a string), got {type(body.model).__name__}")
    if (body.text is None) == (body.texts is None):
        raise InvalidInput("text", 'send exactly one of "text" (a string) or "texts" (a list of strings)')
    if body.text is not None:
        return node.texts(body.text, "text", one=True), body.model
    return node.texts(body.texts, "texts", one=False), body.model


async def _predict(request: web.Request) -> web.Response:
    texts, model = await _texts(request)
    with request.app[_METRICS].predict_seconds.time():
        preds = await request.app[_NODE].predict(texts, model)
    durable = all(getattr(p, "durable", True) for p in preds)
    return _ok({"predictions": preds, "model": preds[0].model if preds else None, "durable": durable})


async def _embed(request: web.Request) -> web.Response:
    texts, model = await _texts(request)
    with request.app[_METRICS].predict_seconds.time():
        answer = await request.app[_NODE].embed(texts, model)
    return _ok(answer)


async def _feedback(request: web.Request) -> web.Response:
    node = request.app[_NODE]
    body: _FeedbackBody = await _body(request, _FeedbackBody)
    if not isinstance(body.prediction_id, str) or not body.prediction_id:
        raise InvalidInput("prediction_id", "must be a non-empty string")
    if not isinstance(body.label, str) or not body.label:
        raise InvalidInput("label", "must be a non-empty string")
    await node.feedback(body.prediction_id, body.label)
    return _ok({"ok": True})


async def _generate(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await _body(request, dict)
    return await generate(request, request.app[_NODE].generations, body)


async def _chat(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await _body(request, dict)
    return await chat_completions(request, request.app[_NODE].generations, body)


async def _models(request: web.Request) -> web.Response:
    return _ok(list_models(request.app[_NODE].generations))


async def _health(request: web.Request) -> web.Response:
    return _ok(request.app[_NODE].health())


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


_ROUTES = {
    "/v1/predict",
    "/v1/embed",
    "/v1/feedback",
    "/v1/generate",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/health",
    "/metrics",
}


def _bearer(token: str) -> Any:
    """Middleware: every request must carry ``Authorization: Bearer <token>`` (401 otherwise,
    before its body is read), on every route: predict, embed, feedback, generate, chat,
    models, health and metrics."""

    @web.middleware
    async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
        why = bearer_refusal(request.headers.get("Authorization"), token)
        if why is not None:
            response = _error(401, "unauthorized", why)
            response.headers["WWW-Authenticate"] = 'Bearer realm="slmops-edge"'
            return response
        result: web.StreamResponse = await handler(request)
        return result

    return auth


def build_app(node: NodeService, token: str | None = None) -> web.Application:
    """The aiohttp application for ``node``; with ``token`` every request needs it as a
    bearer token. Bodies above what ``max_texts`` texts of ``max_text_chars`` need are
    refused with 413 before they are read."""
    cfg = node.config
    limit = 1024 + cfg.max_texts * (cfg.max_text_chars * 4 + 16)
    middlewares = [_errors] if token is None else [_bearer(token), _errors]
    app = web.Application(middlewares=middlewares, client_max_size=limit)
    app[_NODE] = node
    counts: dict[tuple[str, int], int] = {}
    app[_COUNTS] = counts
    app[_METRICS] = NodeMetrics(node, lambda: counts)
    app[_LIMIT] = limit
    app[_BUDGET] = ByteBudget(cfg.http_inflight_bytes)
    app.router.add_post("/v1/predict", _predict)
    app.router.add_post("/v1/embed", _embed)
    app.router.add_post("/v1/feedback", _feedback)
    app.router.add_post("/v1/generate", _generate)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


@dataclass(frozen=True)
class ApiServer:
    """A listening API: where it listens (``port`` is the real one, also with port 0)."""

    host: str
    port: int


@asynccontextmanager
async def serve_api(node: NodeService) -> AsyncIterator[ApiServer]:
    """Serve ``node``'s API on its ``config.http`` address until the block ends. Raises
    ``ValueError`` when the config has no address (``http = "off"``) and ``OSError`` when the
    address cannot be bound (e.g. ``errno.EADDRINUSE``), before serving anything."""
    address = node.config.http_address
    if address is None:
        raise ValueError("the node's config has no HTTP address (http is off)")
    host, port = address
    log = structlog.get_logger("edge.api")
    token = node.config.api_token()
    if token is None and not is_loopback(host):  # EdgeConfig refuses this; a hand-made config too
        raise ValueError(f"API address {host!r} is not loopback and has no bearer token (--http-token-file)")
    app = build_app(node, token)
    _pin_mmap_threshold()
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        read_bufsize=_READ_BUFSIZE,
        # The only timer aiohttp has between connecting (or answering) and a complete
        # request head; its default (3,630 s) let a client dripping header bytes hold a
        # connection for an hour. It also closes idle kept-alive connections then.
        keepalive_timeout=node.config.http_head_timeout,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        addresses = runner.addresses
        bound = int(addresses[0][1]) if addresses else port
        log.info("http_listening", host=host, port=bound, token=token is not None)
        yield ApiServer(host, bound)
    finally:
        await runner.cleanup()
