"""Edge API bearer tokens (issue 17): `slmops edge` refuses a non-loopback --http without a
token; with a token (file or env) every endpoint answers 401 with a clear message to a request
without it or with a wrong one, and serves the right one; loopback without a token stays open
as before; `--print-config` never shows the token."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import pytest
from click.testing import CliRunner

from _edge_proc import Client
from _edge_proc import start as start_edge
from _edge_util import Keys, edge_config
from _nats import free_port
from slmops.cli import main
from slmops.edge.api import ApiServer, serve_api
from slmops.edge.node import EdgeNode

pytestmark = pytest.mark.anyio

SLMOPS = [sys.executable, "-m", "slmops.cli"]
TOKEN = "s3cret-token-0123456789"


@pytest.fixture
async def served(tmp_path: Path, keys: Keys, fleet: str) -> AsyncIterator[tuple[EdgeNode, ApiServer]]:
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, model=keys.bundle().path, http="127.0.0.1:0",
        http_token_file=str(tmp_path / "token"),
    )  # fmt: skip
    async with EdgeNode(cfg) as n, serve_api(n) as api:
        yield n, api


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/predict"), ("POST", "/v1/embed"), ("POST", "/v1/generate"),
     ("POST", "/v1/chat/completions"), ("POST", "/v1/feedback"), ("GET", "/v1/health"), ("GET", "/metrics")],
)  # fmt: skip
async def test_every_endpoint_needs_the_token(
    served: tuple[EdgeNode, ApiServer], method: str, path: str
) -> None:
    _, api = served
    base = f"http://127.0.0.1:{api.port}"
    async with aiohttp.ClientSession() as http:
        for headers, expected in (
            ({}, "missing bearer token"),
            ({"Authorization": "Bearer wrong-token-0123456789"}, "wrong bearer token"),
            ({"Authorization": f"Basic {TOKEN}"}, "not of the form 'Bearer <token>'"),
            ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "wrong bearer token"),
        ):
            async with http.request(method, base + path, json={"texts": ["alpha"]}, headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 401, (path, headers, body)
                assert body["error"]["code"] == "unauthorized"
                assert expected in body["error"]["message"], body
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.request(
            method, base + path, json={"texts": ["alpha"]}, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp:
            assert resp.status != 401, await resp.text()


async def test_the_right_token_gets_a_prediction(served: tuple[EdgeNode, ApiServer]) -> None:
    _, api = served
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.post(f"http://127.0.0.1:{api.port}/v1/predict", json={"texts": ["about alpha"]}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["predictions"][0]["label"] == "alpha"


def test_a_non_loopback_bind_without_a_token_is_refused(tmp_path: Path) -> None:
    """`slmops edge --http 0.0.0.0:PORT` with no token is a usage error naming the remedy."""
    base = [
        "edge",
        "--fleet",
        "f1",
        "--node",
        "n1",
        "--data",
        str(tmp_path / "d"),
        "--nats",
        "nats://127.0.0.1:1",
    ]
    res = CliRunner().invoke(main, [*base, "--http", "0.0.0.0:8470"])
    assert res.exit_code == 2, res.output
    assert "not a loopback address" in res.output
    assert "--http-token-file" in res.output
    short = tmp_path / "short"
    short.write_text("abc")
    res = CliRunner().invoke(main, [*base, "--http", "127.0.0.1:0", "--http-token", "tiny"])
    assert res.exit_code == 2, res.output
    assert "16+ characters" in res.output
    res = CliRunner().invoke(
        main, [*base, "--http", "0.0.0.0:8470", "--http-token-file", str(short), "--print-config"]
    )
    assert res.exit_code == 0, res.output  # the file is read when the API starts
    res = CliRunner().invoke(main, [*base, "--http", "0.0.0.0:8470", "--print-config"],
                             env={"SLMOPS_EDGE_HTTP_TOKEN": TOKEN})  # fmt: skip
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output
    assert 'http_token = "***"' in res.output


async def test_a_node_process_on_all_interfaces_with_a_token_from_env(tmp_path: Path, keys: Keys) -> None:
    """A real `slmops edge` bound to 0.0.0.0 with SLMOPS_EDGE_HTTP_TOKEN: 401 without the
    token, 200 with it; a loopback node without a token stays open."""
    port = free_port()
    args = [*SLMOPS, "--log-json", "edge", "--fleet", "f1", "--node", "n1", "--data", str(tmp_path / "d"),
            "--nats", "nats://127.0.0.1:1", "--model", str(keys.bundle().path), "--trust", str(keys.pub),
            "--http", f"0.0.0.0:{port}"]  # fmt: skip
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as authed:
        client = Client(authed, f"http://127.0.0.1:{port}")
        proc = await start_edge(args, tmp_path / "edge.log", client, env={"SLMOPS_EDGE_HTTP_TOKEN": TOKEN})
        try:
            await client.predict(["about beta"])
            async with (
                aiohttp.ClientSession() as anon,
                anon.post(f"http://127.0.0.1:{port}/v1/predict", json={"texts": ["x"]}) as resp,
            ):
                assert resp.status == 401
                assert "missing bearer token" in (await resp.json())["error"]["message"]
        finally:
            proc.terminate()
            with anyio.fail_after(30):
                await proc.wait()
    # Loopback, no token: open as before.
    cfg = edge_config(tmp_path, keys, fleet="f2", model=keys.bundle().path, http="127.0.0.1:0")
    async with (
        EdgeNode(cfg) as node,
        serve_api(node) as api,
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{api.port}/v1/predict", json={"texts": ["about beta"]}) as resp,
    ):
        assert resp.status == 200, await resp.text()
