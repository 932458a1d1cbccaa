"""Serving a generation model on a real node (issue 19): ``POST /v1/generate`` and the
OpenAI-compatible ``POST /v1/chat/completions`` (driven by the official ``openai`` client in
streaming mode), limits (prompt tokens, new tokens, a bounded queue answering 429 with
``Retry-After``), a client that goes away mid-stream counted as cancelled, the telemetry row
committed before ``[DONE]``, aggregates holding only numbers, and hostile requests."""

from __future__ import annotations

import functools
import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from _decoder import make_generation_bundle_for_tests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from _edge_util import Keys, edge_config, read_raw, read_telemetry
from slmops.edge.api import serve_api
from slmops.edge.generate import COMMIT_WAIT_S
from slmops.edge.node import EdgeNode
from slmops.edge.window import merge
from slmops.shared.bundle import Bundle
from slmops.shared.messages import TelemetryAggregate, decode_telemetry
from slmops.shared.server import EmbeddedServer


def _bundle(tiny_decoder: Path, tmp_path: Path, keys: Keys, **kw: Any) -> Bundle:
    return make_generation_bundle_for_tests(tiny_decoder, tmp_path / "chat-bundle", keys.key, **kw)


@asynccontextmanager
async def _serving(
    tiny_decoder: Path,
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    config: dict[str, Any] | None = None,
    **kw: Any,
) -> AsyncIterator[tuple[EdgeNode, str, aiohttp.ClientSession]]:
    """A node serving the tiny decoder's bundle over HTTP (60 s windows): (node, base URL, client)."""
    b = _bundle(tiny_decoder, tmp_path, keys, **kw)
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, model=b.path, http="127.0.0.1:0", window=60.0, **(config or {})
    )
    async with EdgeNode(cfg) as node, serve_api(node) as api, aiohttp.ClientSession() as s:
        yield node, f"http://127.0.0.1:{api.port}", s


async def _aggregate(node: EdgeNode) -> TelemetryAggregate:
    await node.windower.tick()
    aggs = [decode_telemetry(payload) for _, payload in await node.buffer.outbox_take(100)]
    assert aggs
    return functools.reduce(merge, aggs)


async def _sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of a server-sent-event response, in order."""
    out = []
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    out.append(line[6:].decode())
    return out


@pytest.mark.anyio
async def test_generate_answers_whole_and_streamed_and_the_aggregate_counts_it(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    async with _serving(tiny_decoder, tmp_path, keys, fleet) as (node, base, s):
        async with s.post(f"{base}/v1/generate", json={"prompt": "tell me about computers"}) as r:
            assert r.status == 200
            whole = await r.json()
        assert whole["text"] == "I am not in Python?" or whole["text"].startswith("I am not in Python?")
        assert whole["usage"]["completion_tokens"] >= 8
        assert whole["model"] == {"name": "chat", "version": 1, "variant": "fp32"}
        body = {"prompt": "tell me about computers", "stream": True, "max_new_tokens": 8}
        async with s.post(f"{base}/v1/generate", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = await _sse(r)
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["finish_reason"] == "length"
        assert final["usage"] == {"prompt_tokens": final["usage"]["prompt_tokens"], "completion_tokens": 8,
                                  "total_tokens": final["usage"]["prompt_tokens"] + 8}  # fmt: skip
        text = "".join(json.loads(e)["text"] for e in events[:-2])
        assert text == "I am not in Python?"
        body = {"prompt": "tell me about computers", "stop": ["Pyth"], "max_new_tokens": 8}
        async with s.post(f"{base}/v1/generate", json=body) as r:
            stopped = await r.json()
        assert (stopped["text"], stopped["finish_reason"]) == ("I am not in ", "stop")
        agg = await _aggregate(node)
    assert (agg.count, agg.errors) == (3, 0)
    gen = agg.generation
    assert gen is not None
    assert gen.stop_reasons["length"] + gen.stop_reasons["eos"] == 2
    assert gen.stop_reasons["stop"] == 1
    assert sum(agg.class_counts.values()) == 3
    assert agg.input_length.total == agg.latency_ms.total == gen.output_tokens.total == 3
    assert gen.tokens_per_s.total == 3
    # loglik_share 0.25 (the manifest's default): sampled requests are counted apart.
    assert agg.confidence.total == gen.loglik_sampled <= 3
    assert gen.refusals["not_able"] == 3  # "I am not ..." is the declared category


@pytest.mark.anyio
async def test_the_openai_client_streams_chat_completions(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    from openai import AsyncOpenAI

    async with _serving(tiny_decoder, tmp_path, keys, fleet) as (node, base, _):
        client = AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        try:
            stream = await client.chat.completions.create(
                model="chat",
                messages=[{"role": "user", "content": "tell me about computers"}],
                stream=True,
                max_tokens=8,
            )
            pieces, reasons = [], []
            async for chunk in stream:
                assert chunk.object == "chat.completion.chunk"
                assert chunk.model == "chat:v1"  # the bundle's name and version (it said "chat")
                choice = chunk.choices[0]
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
            assert "".join(pieces) == "I am not in Python?"
            assert reasons == ["length"]
            models = await client.models.list()
            assert [(m.id, m.object, m.owned_by) for m in models.data] == [("chat:v1", "model", "slmops")]
            whole = await client.chat.completions.create(
                model=models.data[0].id,
                messages=[{"role": "user", "content": "tell me about computers"}],
                max_tokens=8,
            )
            assert whole.model == "chat:v1"
            assert whole.choices[0].message.content == "I am not in Python?"
            assert whole.usage is not None
            assert whole.usage.completion_tokens == 8
            from openai import BadRequestError

            with pytest.raises(BadRequestError) as err:
                await client.chat.completions.create(
                    model="nope", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            assert "not served here (models: ['chat:v1'])" in str(err.value)
            assert err.value.param == "model"
            with pytest.raises(BadRequestError, match="not served here"):  # another version
                await client.chat.completions.create(
                    model="chat:v2", messages=[{"role": "user", "content": "hi"}]
                )
        finally:
            await client.close()
        agg = await _aggregate(node)
    assert agg.count == 2
    assert agg.class_counts.get("length") == 2


@pytest.mark.anyio
async def test_the_telemetry_row_is_committed_before_done(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """Read the node's SQLite file from another connection the moment ``[DONE]`` arrives."""
    async with _serving(tiny_decoder, tmp_path, keys, fleet) as (node, base, s):
        db = node.config.data_path / "telemetry.db"
        for i in range(1, 4):
            body = {"messages": [{"role": "user", "content": f"hello {i}"}], "stream": True}
            async with s.post(f"{base}/v1/chat/completions", json=body) as r:
                buf = b""
                async for chunk in r.content.iter_any():
                    buf += chunk
                    if b"data: [DONE]" in buf:
                        with sqlite3.connect(db) as conn:
                            (n,) = conn.execute("SELECT count(*) FROM events").fetchone()
                        assert n == i
                        break
                else:
                    pytest.fail(f"no [DONE] in {buf[-300:]!r}")
        assert node.generations.statistics().served == 3
        async with s.get(f"{base}/v1/health") as r:
            health = await r.json()
        assert health["generation"] == {
            "running": 0, "waiting": 0, "served": 3, "cancelled": 0, "failed": 0, "refused_busy": 0
        }  # fmt: skip
        async with s.get(f"{base}/metrics") as r:
            text = await r.text()
        assert 'slmops_edge_generations_total{outcome="served"} 3.0' in text
        # The wait for the commit is bounded (it was not): with the buffer's writer stuck (its
        # transaction lock held, as by a long transaction) an answer's cleanup gives up after
        # COMMIT_WAIT_S and says so, instead of holding its caller (or a shutdown) forever.
        held = await node.generations.open("hello")
        async with node.buffer._lock:  # the writer waits for it: no commit completes meanwhile
            with capture_logs() as logs, anyio.fail_after(COMMIT_WAIT_S + 20):
                await held.aclose()
        gave_up = [e for e in logs if e["event"] == "generation_commit_wait_gave_up"]
        assert gave_up == [
            {"event": "generation_commit_wait_gave_up", "log_level": "warning", "waited_s": COMMIT_WAIT_S,
             "reason": "cancelled"}
        ]  # fmt: skip


@pytest.mark.anyio
async def test_a_client_that_goes_away_mid_stream_is_counted_as_cancelled(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    async with _serving(tiny_decoder, tmp_path, keys, fleet, max_new_tokens=512) as (node, base, _):
        port = int(base.rsplit(":", 1)[1])
        # A raw socket: read the first event, then close without reading the rest.
        body = json.dumps({"prompt": "tell me about computers", "stream": True, "max_new_tokens": 512})
        request = (
            f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        for _ in range(3):
            sock = await anyio.connect_tcp("127.0.0.1", port)
            await sock.send(request)
            got = b""
            with anyio.fail_after(30):
                while b"data: " not in got:
                    got += await sock.receive()
            await sock.aclose()
        with anyio.fail_after(30):
            while node.generations.statistics().cancelled < 3:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.05)
        stats = node.generations.statistics()
        assert (stats.running, stats.cancelled, stats.served) == (0, 3, 0)
        agg = await _aggregate(node)
    assert agg.count == 3
    assert agg.class_counts == {"cancelled": 3}
    assert agg.generation is not None
    assert agg.generation.stop_reasons["cancelled"] == 3
    assert agg.generation.output_tokens.total == 3


@pytest.mark.anyio
async def test_an_answer_that_reaches_the_model_context_ends_with_length_not_a_failure(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    """The model's limit of 1,020 new tokens plus the prompt passes its 1,024-token context
    (GenAI refuses such a max_length: it was a 500); the answer stops at the context."""
    async with _serving(tiny_decoder, tmp_path, keys, fleet, max_new_tokens=1020) as (node, base, s):
        async with s.post(f"{base}/v1/generate", json={"prompt": "23 skiddoo!"}) as r:
            assert r.status == 200, await r.text()
            got = await r.json()
        assert got["finish_reason"] == "length"
        assert got["usage"]["prompt_tokens"] + got["usage"]["completion_tokens"] == 1024
        assert node.generations.statistics().served == 1


@pytest.mark.anyio
async def test_limits_prompt_tokens_new_tokens_and_a_full_queue(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    limits = {"generation": {"max_concurrent": 1, "max_queue": 1}}
    async with _serving(tiny_decoder, tmp_path, keys, fleet, limits, max_new_tokens=512) as (node, base, s):

        async def post(body: dict[str, Any]) -> tuple[int, Any, Any]:
            async with s.post(f"{base}/v1/generate", json=body) as r:
                return r.status, await r.json(content_type=None), r.headers

        # Named by the field that held it (it was "messages" for a "prompt"), as OpenAI names it.
        status, err, _ = await post({"prompt": "word " * 600})
        assert (status, err["error"]["field"], err["error"]["param"]) == (400, "prompt", "prompt")
        assert "more than the limit 512" in err["error"]["message"]
        status, err, _ = await post({"messages": [{"role": "user", "content": "word " * 600}]})
        assert (status, err["error"]["field"]) == (400, "messages")
        status, err, _ = await post({"prompt": "hi", "max_new_tokens": 513})
        assert (status, err["error"]["field"]) == (400, "max_new_tokens")
        # One running (opened through the Python API and not stepped: it holds its slot), one
        # waiting for it: an HTTP request is then refused at once with Retry-After.
        gens = node.generations
        held = await gens.open("tell me about computers")
        async with anyio.create_task_group() as tg:
            opened: list[Any] = []

            async def wait_for_slot() -> None:
                opened.append(await gens.open("hello"))

            tg.start_soon(wait_for_slot)
            with anyio.fail_after(30):
                while gens.statistics().waiting < 1:  # noqa: ASYNC110 - no event for a queued caller
                    await anyio.sleep(0.01)
            status, err, headers = await post({"prompt": "hi"})
            assert status == 429
            assert err["error"]["code"] == "busy"
            assert "1 generations running and 1 waiting" in err["error"]["message"]
            assert int(headers["Retry-After"]) >= 1
            await held.aclose()
        await opened[0].aclose()
        assert (gens.statistics().running, gens.statistics().cancelled) == (0, 2)
        status, _, _ = await post({"prompt": "hi", "max_new_tokens": 2})
        assert status == 200
        assert node.generations.statistics().refused_busy == 1


HOSTILE_BODIES: list[Any] = [
    {},
    {"prompt": 3},
    {"prompt": ""},
    {"prompt": "   "},
    {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    {"messages": "hello"},
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": ["x"]}]},
    {"messages": [{"role": "user", "content": "x"}] * 65},
    {"prompt": "x", "max_new_tokens": 0},
    {"prompt": "x", "max_new_tokens": True},
    {"prompt": "x", "max_new_tokens": 10**30},
    {"prompt": "x", "temperature": -1},
    {"prompt": "x", "temperature": "hot"},
    {"prompt": "x", "top_p": 2},
    {"prompt": "x", "stop": ["a"] * 9},
    {"prompt": "x", "stop": [3]},
    {"prompt": "x", "stream": "yes"},
    {"prompt": "x", "seed": -1},
    {"prompt": "x", "model": ["chat"]},
    {"prompt": "x", "model": "other"},
    {"prompt": "x" * 40_000},
]


@pytest.mark.anyio
async def test_hostile_requests_get_a_4xx_naming_the_field_and_the_node_keeps_serving(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str
) -> None:
    async with _serving(tiny_decoder, tmp_path, keys, fleet) as (node, base, s):
        for path in ("/v1/generate", "/v1/chat/completions"):
            for body in HOSTILE_BODIES:
                if path.endswith("completions") and "prompt" in body:
                    body = {**{k: v for k, v in body.items() if k != "prompt"}, "messages": body["prompt"]}
                async with s.post(base + path, json=body) as r:
                    got = await r.json(content_type=None)
                    assert 400 <= r.status < 500, (path, body, r.status, got)
                    assert got["error"]["message"], (path, body)
            for raw in (b"", b"{", b"[1]", b'{"prompt": "\xff"}', b"{" * 10_000 + b"}" * 10_000):
                async with s.post(base + path, data=raw, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400, (path, raw[:20])
        async with s.post(f"{base}/v1/generate", json={"prompt": "hello", "max_new_tokens": 3}) as r:
            assert r.status == 200
        for path in ("/v1/predict", "/v1/embed"):  # the wrong endpoint names the right one
            async with s.post(base + path, json={"text": "hello"}) as r:
                got = await r.json()
            assert (r.status, got["error"]["field"]) == (400, "model")
            assert "use /v1/generate or /v1/chat/completions" in got["error"]["message"]
        stats = node.generations.statistics()
        assert (stats.running, stats.waiting) == (0, 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=12,
    )
    | st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "x"]), "content": st.text(max_size=80)}
                ),
                max_size=3,
            )
        },
        optional={
            "max_new_tokens": st.integers(-5, 40),
            "stop": st.lists(st.text(max_size=5), max_size=3),
            "temperature": st.floats(-1, 3),
            "stream": st.booleans(),
        },
    )
)
def test_fuzzed_bodies_never_make_a_5xx(chat_node: tuple[str, EdgeNode], body: Any) -> None:
    """Any JSON body gets a 2xx or a 4xx from the chat endpoint, never a 5xx or a hang."""
    base, _ = chat_node

    async def one() -> None:
        with anyio.fail_after(30):
            async with aiohttp.ClientSession() as s, s.post(f"{base}/v1/chat/completions", json=body) as r:
                await r.read()
                assert r.status < 500, (body, r.status)

    anyio.run(one)


@pytest.fixture
def chat_node(tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str) -> Any:
    """A node serving the tiny decoder in a thread of its own (for the synchronous fuzz test)."""
    import threading

    b = _bundle(tiny_decoder, tmp_path, keys, max_new_tokens=8)
    port = _free_port()
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=b.path, http=f"127.0.0.1:{port}", window=60.0)
    ready = threading.Event()
    stop: dict[str, Any] = {}

    async def serve() -> None:
        async with EdgeNode(cfg) as node, serve_api(node):
            stop["event"] = anyio.Event()
            stop["node"] = node
            stop["token"] = anyio.lowlevel.current_token()
            ready.set()
            await stop["event"].wait()

    thread = threading.Thread(target=anyio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield f"http://127.0.0.1:{port}", stop["node"]
    anyio.from_thread.run_sync(stop["event"].set, token=stop["token"])
    thread.join(30)
    assert not thread.is_alive()


@pytest.mark.anyio
async def test_no_prompt_or_answer_text_reaches_disk_or_the_server(
    tiny_decoder: Path, tmp_path: Path, keys: Keys, fleet: str, nats_server: EmbeddedServer, js: Any
) -> None:
    """Canaries in prompts, and the answers' own text, appear in no byte of the telemetry
    database (-wal, -shm) and in no message on the server. (The model cache holds the
    tokenizer, whose vocabulary has the answers' pieces, so the answers are looked for in the
    databases and on the wire; the prompts' canaries everywhere in the data directory.)"""
    from test_edge_node import CANARIES, all_bytes

    b = _bundle(tiny_decoder, tmp_path, keys)
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=b.path)
    answers: set[str] = set()
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(timeout=10)
        for i in range(6):
            for c in CANARIES:
                out = await node.generations.generate(
                    [{"role": "system", "content": c}, {"role": "user", "content": f"{c} tell me {i}"}],
                    {"max_new_tokens": 12},
                )
                answers.add(out.text)
        with anyio.fail_after(30):
            while (await node.buffer.pending_events()) or node.buffer.statistics().outbox_depth:
                await node.windower.tick()
                await anyio.sleep(0.2)
        while_running = all_bytes(cfg.data_path)
        dbs = b"".join(p.read_bytes() for p in cfg.data_path.glob("telemetry.db*"))
    after = all_bytes(cfg.data_path)
    aggs = await read_telemetry(js, fleet)
    assert sum(a.count for a in aggs) == 6 * len(CANARIES)
    wire = b"".join(await read_raw(js, f"slmops.telemetry.{fleet}.>", "SLMOPS_TELEMETRY"))
    wire += b"".join(await read_raw(js, f"slmops.status.{fleet}.>", "SLMOPS_STATUS"))
    long_answers = [a for a in answers if len(a) >= 8]
    assert long_answers
    for canary in CANARIES:
        for blob, where in ((while_running, "data dir (running)"), (after, "data dir"), (wire, "server")):
            for form in (canary, canary.lower(), canary.upper()):
                assert form.encode() not in blob, f"{form!r} found in {where}"
    for answer in long_answers:
        for blob, where in ((dbs, "telemetry database"), (wire, "server")):
            assert answer.encode() not in blob, f"answer {answer!r} found in {where}"
