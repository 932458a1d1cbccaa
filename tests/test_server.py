"""EmbeddedServer: a real nats-server process, started, checked, stopped and restarted."""

from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest

from slmops.shared.errors import ServerStartError
from slmops.shared.server import EmbeddedServer, find_nats_server


def test_finds_the_wheel_binary() -> None:
    assert find_nats_server().name.startswith("nats-server")


@pytest.mark.anyio
async def test_session_server_answers_jetstream_account_info(nats_server: EmbeddedServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    try:
        info = await nc.jetstream().account_info()
    finally:
        await nc.close()
    assert info.limits is not None


def test_bad_argument_raises_server_start_error_with_output() -> None:
    server = EmbeddedServer(extra_args=["--no-such-flag"], start_timeout=5)
    with pytest.raises(ServerStartError) as caught:
        server.start()
    assert "exited with code" in str(caught.value)
    assert "no-such-flag" in caught.value.stderr
    assert "no-such-flag" in str(caught.value)  # the output is in the message, not only an attr
    assert not server.running


def test_missing_binary_raises_server_start_error(tmp_path: Path) -> None:
    server = EmbeddedServer(binary=tmp_path / "nope")
    with pytest.raises(ServerStartError, match="cannot run"):
        server.start()


def test_port_in_use_raises_server_start_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerStartError, match="nats-server"):
            EmbeddedServer(port=port, start_timeout=5).start()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"port": 70000}, "port must be"),
        ({"port": "4222"}, "port must be"),
        ({"host": ""}, "host must be"),
        ({"start_timeout": 0}, "start_timeout"),
        ({"extra_args": "-DV"}, "extra_args"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbeddedServer(**kwargs)  # type: ignore[arg-type]


def test_context_manager_stops_and_removes_its_temp_store() -> None:
    with EmbeddedServer() as server:
        assert server.running
        store = server.store_dir
        assert store is not None
        assert store.is_dir()
    assert not server.running
    assert not store.exists()


@pytest.mark.anyio
async def test_restart_keeps_port_and_stream_data(private_server: EmbeddedServer) -> None:
    port = private_server.port
    nc = await nats.connect(private_server.url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        await js.publish("keep.a", b"survives")
    finally:
        await nc.close()

    await private_server.restart_async()
    assert private_server.port == port

    await private_server.stop_async()
    assert not private_server.running
    await private_server.start_async()  # start() after stop() keeps the port as well
    assert private_server.port == port

    nc = await nats.connect(private_server.url, allow_reconnect=False)
    try:
        msg = await nc.jetstream().get_last_msg("KEEP", "keep.a")
    finally:
        await nc.close()
    assert msg.data == b"survives"
