"""The node's HTTP API and Python API on a real node (real ORT, real SQLite, no NATS
reachable): answers, 503 without a model, and a clear 4xx for every kind of bad input."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from structlog.testing import capture_logs

from _edge_util import Keys, edge_config
from slmops.edge.api import ApiServer, serve_api
from slmops.edge.errors import InvalidInput, NoModel
from slmops.edge.node import EdgeNode
from slmops.shared.messages import decode_telemetry


@pytest.fixture
async def served(tmp_path: Path, keys: Keys, fleet: str) -> AsyncIterator[tuple[EdgeNode, ApiServer]]:
    cfg = edge_config(
        tmp_path,
        keys,
        fleet=fleet,
        model=keys.bundle().path,
        http="127.0.0.1:0",
        max_text_chars=100,
        max_texts=4,
        window=60.0,
    )
    async with EdgeNode(cfg) as n, serve_api(n) as api:
        yield n, api


@pytest.fixture
def node(served: tuple[EdgeNode, ApiServer]) -> EdgeNode:
    return served[0]


@pytest.fixture
async def http(served: tuple[EdgeNode, ApiServer]) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with aiohttp.ClientSession() as session:
        yield session, f"http://127.0.0.1:{served[1].port}"


async def call(
    http: tuple[aiohttp.ClientSession, str], method: str, path: str, data: Any = None, **kw: Any
) -> tuple[int, Any]:
    session, base = http
    async with session.request(method, base + path, data=data, **kw) as resp:
        body = (
            await resp.json(content_type=None)
            if resp.content_type == "application/json"
            else await resp.text()
        )
        return resp.status, body


async def error_of(
    http: tuple[aiohttp.ClientSession, str], want: int, method: str, path: str, **kw: Any
) -> Any:
    """The ``error`` object of a request that must be answered with status ``want``."""
    status, body = await call(http, method, path, **kw)
    assert status == want, body
    return body["error"]


JSON = {"Content-Type": "application/json"}


@pytest.mark.anyio
async def test_predict_answers_with_labels_ids_and_model(http: tuple[aiohttp.ClientSession, str]) -> None:
    status, body = await call(http, "POST", "/v1/predict", json={"texts": ["about alpha", "a beta thing"]})
    assert status == 200
    assert [p["label"] for p in body["predictions"]] == ["alpha", "beta"]
    assert body["model"] == {"name": "testclf", "version": 1, "variant": "fp32"}
    ids = [p["prediction_id"] for p in body["predictions"]]
    assert len(set(ids)) == 2
    status, body = await call(http, "POST", "/v1/predict", json={"text": "gamma gamma"})
    assert status == 200
    assert body["predictions"][0]["label"] == "gamma"
    assert 0.0 < body["predictions"][0]["confidence"] <= 1.0


BAD_PREDICT = [
    ("not json", b"{nope", "body"),
    ("non-utf8", b'{"text": "\xff\xfe"}', "body"),
    ("empty body", b"", "body"),
    ("top-level array", b'["alpha"]', "body"),
    ("text not a string", b'{"text": 5}', "text"),
    ("texts not a list", b'{"texts": "alpha"}', "texts"),
    ("texts item not a string", b'{"texts": ["ok", 3]}', "texts[1]"),
    ("empty text", b'{"text": ""}', "text"),
    ("whitespace text", b'{"text": "   "}', "text"),
    ("oversize text", b'{"text": "' + b"a" * 101 + b'"}', "text"),
    ("too many texts", b'{"texts": ["a", "b", "c", "d", "e"]}', "texts"),
    ("empty texts", b'{"texts": []}', "texts"),
    ("both text and texts", b'{"text": "a", "texts": ["b"]}', "text"),
    ("neither", b"{}", "text"),
    ("unknown field", b'{"txt": "alpha"}', "txt"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("case", "raw", "field"), BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
async def test_bad_predict_bodies_get_400_naming_the_field(
    http: tuple[aiohttp.ClientSession, str], node: EdgeNode, case: str, raw: bytes, field: str
) -> None:
    status, body = await call(
        http, "POST", "/v1/predict", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400, (case, body)
    assert body["error"]["field"] == field, body
    assert body["error"]["message"]
    # the node is unaffected
    status, _ = await call(http, "POST", "/v1/predict", json={"text": "alpha"})
    assert status == 200


@pytest.mark.anyio
async def test_generate_on_a_classifier_node_names_the_endpoint_its_model_answers_on(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    """`/v1/generate` where only a classifier is served: a 400 naming /v1/predict, and not
    /v1/embed, which refuses a classifier (new-user trial)."""
    error = await error_of(http, 400, "POST", "/v1/generate", json={"prompt": "hello"})
    assert error["message"] == (
        "no generation model is served here (the models served answer on /v1/predict)"
    ), error


@pytest.mark.anyio
async def test_feedback_errors_and_success(http: tuple[aiohttp.ClientSession, str]) -> None:
    _, body = await call(http, "POST", "/v1/predict", json={"text": "alpha here"})
    pid = body["predictions"][0]["prediction_id"]
    cases = [
        ({"prediction_id": "nope-1", "label": "alpha"}, 404, "prediction_id"),
        ({"prediction_id": pid, "label": "delta"}, 400, "label"),
        ({"prediction_id": pid}, 400, "label"),
        ({"label": "alpha"}, 400, "prediction_id"),
        ({"prediction_id": 7, "label": "alpha"}, 400, "prediction_id"),
        ({"prediction_id": pid, "label": ["alpha"]}, 400, "label"),
        ({"prediction_id": pid, "label": "alpha", "text": "x"}, 400, "text"),
    ]
    for payload, want, field in cases:
        status, err = await call(http, "POST", "/v1/feedback", json=payload)
        assert (status, err["error"]["field"]) == (want, field), (payload, err)
    status, ok = await call(http, "POST", "/v1/feedback", json={"prediction_id": pid, "label": "beta"})
    assert (status, ok) == (200, {"ok": True})
    err = await error_of(http, 409, "POST", "/v1/feedback", json={"prediction_id": pid, "label": "beta"})
    assert err["code"] == "feedback_exists"
    assert (await error_of(http, 400, "POST", "/v1/feedback", data=b"\xff", headers=JSON))["field"] == "body"


@pytest.mark.anyio
async def test_wrong_methods_paths_and_huge_bodies_are_json_errors(
    http: tuple[aiohttp.ClientSession, str],
) -> None:
    assert (await error_of(http, 405, "GET", "/v1/predict"))["code"] == "method_not_allowed"
    assert (await error_of(http, 404, "GET", "/v1/nothing"))["code"] == "not_found"
    huge = io.BytesIO(b'{"text": "' + b"a" * 3_000_000 + b'"}')
    assert (await error_of(http, 413, "POST", "/v1/predict", data=huge, headers=JSON))["field"] == "body"
    png = {"Content-Type": "image/png"}
    err = await error_of(http, 400, "POST", "/v1/predict", data=b'{"text": "a"}', headers=png)
    assert err["field"] == "body"


@pytest.mark.anyio
async def test_a_client_leaving_mid_body_is_logged_as_a_disconnect_without_a_traceback(
    served: tuple[EdgeNode, ApiServer], http: tuple[aiohttp.ClientSession, str]
) -> None:
    """New-user trial: 300 half-sent bodies whose clients left gave 300 error lines with a
    traceback (``api_handler_failed``). Leaving is the client's right: one info line each,
    counted under status 499 (nginx's "client closed request"), and the node answers on."""
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 300\r\n\r\n{"text": "ab'
    )
    with capture_logs() as logs:
        for _ in range(2):
            stream = await anyio.connect_tcp("127.0.0.1", served[1].port)
            await stream.send(head)
            await stream.aclose()
        with anyio.fail_after(10):
            while sum(e["event"] == "client_disconnected" for e in logs) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.02)
    api = [e for e in logs if e.get("path") == "/v1/predict"]
    assert [(e["event"], e["log_level"], "exc_info" in e) for e in api] == [
        ("client_disconnected", "info", False)
    ] * 2
    status, _ = await call(http, "POST", "/v1/predict", json={"text": "alpha"})
    assert status == 200
    _, text = await call(http, "GET", "/metrics")
    assert 'slmops_edge_http_requests_total{code="499",path="/v1/predict"} 2.0' in text


@pytest.mark.anyio
async def test_health_and_metrics_report_the_node(http: tuple[aiohttp.ClientSession, str]) -> None:
    await call(http, "POST", "/v1/predict", json={"texts": ["alpha", "beta"]})
    status, health = await call(http, "GET", "/v1/health")
    assert status == 200
    assert health["model"] == {"name": "testclf", "version": 1, "variant": "fp32"}
    assert health["link"] in ("offline", "connecting")
    assert health["outbox"] == 0
    assert health["served"] == 2
    assert health["buffer_bytes"] > 0
    assert health["pending_events"] == 2
    for key in ("last_sync", "dropped_inferences", "dropped_aggregates"):
        assert key in health
    status, text = await call(http, "GET", "/metrics")
    assert status == 200
    # prometheus_client's exposition (issue 14): parsed back (label order is the library's),
    # with the request-latency histogram.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (x.name, tuple(sorted(x.labels.items()))): x.value for f in families.values() for x in f.samples
    }
    assert samples[("slmops_edge_predictions_total", ())] == 2
    assert (
        samples[("slmops_edge_model_info", (("name", "testclf"), ("variant", "fp32"), ("version", "1")))] == 1
    )
    assert samples[("slmops_edge_http_requests_total", (("code", "200"), ("path", "/v1/predict")))] == 1
    latency = families["slmops_edge_predict_seconds"]
    assert latency.type == "histogram"
    count = next(s for s in latency.samples if s.name == "slmops_edge_predict_seconds_count")
    assert count.value == 1
    assert families["slmops_edge_predictions"].samples[0].value == 2
    assert "slmops_edge_model_refreshes" in families


@pytest.mark.anyio
async def test_feedback_reaches_the_aggregate_as_labels_only(node: EdgeNode) -> None:
    """Python API: feedback becomes confusion counts (true → predicted) in the next window."""
    preds = await node.predict(["alpha one", "beta two", "alpha three"])
    await node.feedback(preds[0].prediction_id, "alpha")
    await node.feedback(preds[2].prediction_id, "gamma")
    assert await node.windower.tick() == 1
    ((_, payload),) = await node.buffer.outbox_take(5)
    agg = decode_telemetry(payload)
    assert agg.count == 3
    assert agg.class_counts == {"alpha": 2, "beta": 1}
    assert agg.feedback == {"alpha": {"alpha": 1}, "gamma": {"alpha": 1}}
    with pytest.raises(InvalidInput):
        await node.predict([])


@pytest.mark.anyio
async def test_without_a_model_predict_is_503_and_health_says_so(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    cfg = edge_config(tmp_path, keys, fleet=fleet, http="127.0.0.1:0")
    async with EdgeNode(cfg) as n, serve_api(n) as api, aiohttp.ClientSession() as session:
        h = (session, f"http://127.0.0.1:{api.port}")
        status, err = await call(h, "POST", "/v1/predict", json={"text": "alpha"})
        assert status == 503
        assert err["error"]["message"] == "no model installed yet"
        status, health = await call(h, "GET", "/v1/health")
        assert health["model"] is None
        assert health["status"] == "no_model"
        with pytest.raises(NoModel):
            await n.predict(["alpha"])


@pytest.mark.anyio
async def test_concurrent_requests_share_micro_batches(tmp_path: Path, keys: Keys, fleet: str) -> None:
    """32 callers at once with a 20 ms batch wait: ORT runs far fewer batches than requests,
    no batch exceeds max_batch, and every caller gets the answer for its own text."""
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, model=keys.bundle().path, max_batch=8, max_batch_wait=0.02, window=60.0
    )
    async with EdgeNode(cfg) as n:
        got: dict[int, str] = {}

        async def one(i: int) -> None:
            (p,) = await n.predict([f"{['alpha', 'beta', 'gamma'][i % 3]} {i}"])
            got[i] = p.label

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(one, i)
        assert got == {i: ["alpha", "beta", "gamma"][i % 3] for i in range(32)}
        assert n.batcher.served == 32
        assert 4 <= n.batcher.batches < 32


LONE_SURROGATES = [
    ("high alone at the end", b'{"text": "abc\\ud800"}', "\\ud800", 13),
    ("high then a letter", b'{"text": "\\uD83Dx"}', "\\uD83D", 10),
    ("high then a high", b'{"texts": ["ok", "\\ud83d\\ud83d"]}', "\\ud83d", 18),
    ("low alone", b'{"text": "\\udc00"}', "\\udc00", 10),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "raw", "escape", "at"), LONE_SURROGATES, ids=[c[0] for c in LONE_SURROGATES]
)
async def test_a_lone_surrogate_escape_is_named_not_called_truncated(
    http: tuple[aiohttp.ClientSession, str], case: str, raw: bytes, escape: str, at: int
) -> None:
    """JSON text is Unicode: a ``\\uD800``-``\\uDBFF`` escape must be followed by a low one.
    Old code (msgspec's message): "is not valid JSON: Input data was truncated" for a
    complete body. Now the 400 names the escape and its byte offset. An escaped backslash
    before ``u`` is not an escape (``"\\\\ud800"`` is six characters) and is accepted."""
    status, body = await call(
        http, "POST", "/v1/predict", data=raw, headers={"Content-Type": "application/json"}
    )
    assert status == 400, (case, body)
    message = body["error"]["message"]
    assert "truncated" not in message, message
    assert f"lone UTF-16 surrogate escape {escape} at byte {at}" in message, message
    assert body["error"]["field"] == "body"
    status, ok = await call(
        http,
        "POST",
        "/v1/predict",
        data=b'{"text": "a \\\\ud800 \\ud83d\\ude00"}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, ok
