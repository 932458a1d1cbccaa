"""The generation endpoints of the node's HTTP API (routed by ``edge.api``):

- ``POST /v1/generate`` ``{"prompt": "..."}`` or ``{"messages": [...]}``, optional
  ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``model``, ``stream`` →
  ``{"text", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"}, "model"}``; with
  ``"stream": true`` server-sent events ``data: {"text": "..."}`` …, then
  ``data: {"finish_reason", "usage", "model"}`` and ``data: [DONE]``.
- ``POST /v1/chat/completions``: the OpenAI chat completions request and response (and its
  ``chat.completion.chunk`` events with ``"stream": true``), so OpenAI clients work unchanged.
  ``finish_reason`` is "stop" (end of sequence or a stop string) or "length". ``model`` (in
  the request: optional) names the served model as ``GET /v1/models`` lists it,
  ``name:vVERSION`` (the bundle's name and version; the bare name is accepted too), and the
  answer says which one answered. A prompt over the model's token limit is refused (400)
  naming ``messages``, as OpenAI does (``prompt`` on ``/v1/generate`` when given so).
- ``GET /v1/models``: OpenAI's model list ``{"object": "list", "data": [{"id", "object":
  "model", "created", "owned_by", "task"}]}``, generation models first.

The final event (``[DONE]``) is sent only after the answer's telemetry row is committed
(durable answers). A client that goes away mid-stream (its connection closes, or a write
fails, or a write cannot complete within ``WRITE_TIMEOUT_S`` because it stopped reading) ends
the generation at once; it is counted as "cancelled". A failure after the
stream started is sent as ``data: {"error": {...}}`` and the stream ends without ``[DONE]``.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from aiohttp import web

from slmops.edge.errors import InvalidInput
from slmops.edge.generate import Generations, Stream, model_id
from slmops.edge.inference import InferenceFailed

__all__ = ["chat_completions", "generate", "list_models"]

_json = msgspec.json.Encoder()
#: OpenAI's finish reasons for ours.
_OPENAI_REASON = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}


class _ClientGone(Exception):
    pass


def _event(payload: Any) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await resp.prepare(request)
    return resp


#: A write that cannot complete in this many seconds (the client stopped reading: its socket
#: and aiohttp's 64 KiB buffer are full) ends the answer as cancelled, so a client that never
#: reads cannot hold a generation slot.
WRITE_TIMEOUT_S = 10.0


async def _write(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    if _gone(request):
        raise _ClientGone
    try:
        with anyio.move_on_after(WRITE_TIMEOUT_S) as scope:
            await resp.write(data)
    except (ConnectionError, RuntimeError) as exc:  # aiohttp: "Cannot write to closing transport"
        raise _ClientGone from exc
    if scope.cancelled_caught:
        if request.transport is not None:
            request.transport.close()
        raise _ClientGone


async def _pump(
    request: web.Request, resp: web.StreamResponse, stream: Stream, piece_event: Any
) -> tuple[str, bool]:
    """Stream pieces until the model finishes; returns (reason, ok). On a model failure an
    error event is written and ok is False."""
    try:
        while (piece := await stream.next()) is not None:
            if _gone(request):
                raise _ClientGone
            if piece:
                await _write(request, resp, _event(piece_event(piece)))
    except InferenceFailed as exc:
        with contextlib.suppress(_ClientGone):
            await _write(request, resp, _event({"error": {"code": exc.code, "message": str(exc)}}))
        return "error", False
    return await stream.finish(), True


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(name, f"must be true or false, got {str(value)[:32]!r}")
    return value


def _messages_list(body: dict[str, Any]) -> None:
    value = body.get("messages")
    if not isinstance(value, list):
        kind = type(value).__name__
        raise InvalidInput("messages", f"must be a list of {{role, content}} objects, got {kind}")


def _usage(stream: Stream) -> dict[str, int]:
    p, c = stream.prompt_tokens, stream.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _Shape:
    """How one endpoint words its answers: the whole answer, a streamed piece, the events
    before the first piece and the final event (each given the stream or the piece)."""

    def __init__(
        self,
        whole: Callable[[Stream, str], dict[str, Any]],
        piece: Callable[[str], dict[str, Any]],
        final: Callable[[Stream, str], dict[str, Any]],
        opening: dict[str, Any] | None = None,
    ) -> None:
        self.whole, self.piece, self.final, self.opening = whole, piece, final, opening


async def _answer(request: web.Request, stream: Stream, streaming: bool, shape: _Shape) -> web.StreamResponse:
    """Run ``stream`` to its end and answer in ``shape``; records "cancelled" when the client
    went away, always releases the stream's slot."""
    resp: web.StreamResponse | None = None
    try:
        if not streaming:
            while await stream.next() is not None:
                if _gone(request):
                    raise _ClientGone
            reason = await stream.finish()
            return web.Response(
                body=_json.encode(shape.whole(stream, reason)), content_type="application/json"
            )
        resp = await _sse(request)
        if shape.opening is not None:
            await _write(request, resp, _event(shape.opening))
        reason, ok = await _pump(request, resp, stream, shape.piece)
        if ok:
            await _write(request, resp, _event(shape.final(stream, reason)))
            await _write(request, resp, b"data: [DONE]\n\n")
        return resp
    except _ClientGone:  # nobody reads the answer; aiohttp logs nothing for a closed peer
        return resp if resp is not None else web.Response(status=499)
    finally:
        await stream.aclose()


async def generate(request: web.Request, gens: Generations, body: dict[str, Any]) -> web.StreamResponse:
    """``POST /v1/generate`` (see the module docstring)."""
    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise InvalidInput("prompt", 'send exactly one of "prompt" (a string) or "messages" (chat messages)')
    if has_prompt and not isinstance(body["prompt"], str):
        raise InvalidInput("prompt", f"must be a string, got {type(body['prompt']).__name__}")
    if has_messages:
        _messages_list(body)
    streaming = _flag(body, "stream")
    stream = await gens.open(body["prompt"] if has_prompt else body["messages"], body, body.get("model"))
    model = msgspec.structs.asdict(stream.active.ref)

    def final(s: Stream, reason: str) -> dict[str, Any]:
        return {"finish_reason": reason, "usage": _usage(s), "model": model}

    return await _answer(
        request,
        stream,
        streaming,
        _Shape(whole=lambda s, r: {"text": s.text, **final(s, r)}, piece=lambda p: {"text": p}, final=final),
    )


async def chat_completions(
    request: web.Request, gens: Generations, body: dict[str, Any]
) -> web.StreamResponse:
    """``POST /v1/chat/completions`` (OpenAI-compatible; see the module docstring)."""
    _messages_list(body)
    n = body.get("n", 1)
    if n != 1:
        raise InvalidInput("n", f"only n=1 is served, got {str(n)[:32]!r}")
    streaming = _flag(body, "stream")
    stream = await gens.open(body["messages"], body, body.get("model"))
    head = {
        "id": "chatcmpl-" + secrets.token_hex(12),
        "created": int(time.time()),
        "model": model_id(stream.active),
    }

    def chunk(delta: dict[str, str], reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": reason}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    def whole(s: Stream, reason: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": s.text}
        choice = {"index": 0, "message": message, "finish_reason": _OPENAI_REASON[reason]}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(s)}

    return await _answer(
        request,
        stream,
        streaming,
        _Shape(
            whole=whole,
            piece=lambda p: chunk({"content": p}, None),
            final=lambda s, r: {**chunk({}, _OPENAI_REASON[r]), "usage": _usage(s)},
            opening=chunk({"role": "assistant", "content": ""}, None),
        ),
    )


def list_models(gens: Generations) -> dict[str, Any]:
    """``GET /v1/models``: every served model in OpenAI's list shape (``created``: the
    bundle's build time, Unix seconds), generation models first (the ones chat can use)."""
    served = sorted(gens.models.all(), key=lambda a: a.manifest.task != "generation")
    data = [
        {"id": model_id(a), "object": "model", "created": int(a.manifest.created.timestamp()),
         "owned_by": "slmops", "task": a.manifest.task}
        for a in served
    ]  # fmt: skip
    return {"object": "list", "data": data}
