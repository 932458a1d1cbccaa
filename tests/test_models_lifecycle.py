"""`slmops models yank / rm / show` run in process (the CLI's code; its process start-up is
another test's subject) against a real nats-server, with real edge nodes (one online, one
behind a cut link) following their assignments."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from nats.js import JetStreamContext

from _edge_util import Keys, edge_config
from _models import make_bundle
from _nats import model_of, wait_until
from _proxy import TcpProxy
from slmops.cli import main
from slmops.cloud.registry import Registry
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import TrustStore
from slmops.shared.messages import ModelRef
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio


async def _cli(*args: str) -> tuple[int, str, str]:
    """An `slmops` command in this process (a subprocess paid ~2-5 s of start-up per call, ten
    calls here): exit code, stdout, stderr."""
    r = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, ["--log-level", "error", *args]))
    return r.exit_code, r.stdout, r.stderr


def _serving(node: EdgeNode) -> ModelRef | None:
    current = node.models.current
    return None if current is None else current.ref


async def _push(js: JetStreamContext, tmp: Path, fleet: str) -> tuple[Keys, str, Registry]:
    """Versions 1 and 2 of a model of this test's own, pushed."""
    keys = Keys(tmp / "keys")
    model = model_of(fleet)
    registry = Registry(js)
    trust = TrustStore([keys.key.public_key()])
    for v in (1, 2):
        await registry.push(make_bundle(tmp / f"v{v}", keys.key, version=v, name=model), trust)
    return keys, model, registry


async def test_a_yank_moves_online_nodes_at_once_and_an_offline_one_on_reconnect(
    js: JetStreamContext, nats_server: EmbeddedServer, tmp_path: Path, fleet: str
) -> None:
    keys, model, registry = await _push(js, tmp_path, fleet)
    v1 = ModelRef(name=model, version=1)
    v2 = ModelRef(name=model, version=2)
    url = nats_server.url
    async with TcpProxy("127.0.0.1", nats_server.port) as proxy:
        on = edge_config(tmp_path, keys, fleet=fleet, node="on", url=url, model=tmp_path / "v1")
        off = edge_config(tmp_path, keys, fleet=fleet, node="off", url=proxy.url, model=tmp_path / "v1")
        async with EdgeNode(on) as n_on, EdgeNode(off) as n_off:
            await n_on.link.wait_online(10)
            await n_off.link.wait_online(10)
            await registry.assign(fleet, 2, model=model)
            await wait_until(lambda: _serving(n_on) == v2 and _serving(n_off) == v2, 30, what="both on v2")
            await proxy.cut()
            await wait_until(lambda: n_off.link.state.value != "online", 10, what="node offline")

            code, out, err = await _cli(
                "models", "yank", "--nats", url, "--model", model, "--version", "2", "--reason", "bad answers"
            )
            assert code == 0, err
            assert f"yanked {model} v2: bad answers" in out
            assert f"{fleet}._fleet: now v1" in out
            await wait_until(lambda: _serving(n_on) == v1, 20, what="online node back on v1")
            assert _serving(n_off) == v2  # it cannot know yet

            code, _, err = await _cli("models", "assign", "--nats", url, "--fleet", fleet, "--model", model,
                                      "--version", "2")  # fmt: skip
            assert code == 1
            assert "yanked" in err
            code, _, err = await _cli("rollout", "start", "--nats", url, "--fleet", fleet, "--version", "2")
            assert code == 1
            assert "yanked (bad answers)" in err

            await proxy.restore()
            await n_off.link.wait_online(20)
            await wait_until(lambda: _serving(n_off) == v1, 30, what="reconnected node on v1")
            assert _serving(n_on) == v1  # and nothing brought v2 back
    code, out, err = await _cli("models", "show", "--nats", url, "--model", model, "--version", "2", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["yanked"]["reason"] == "bad answers"
    assert doc["yanked"]["fallbacks"] == {f"{fleet}._fleet": 1}
    assert doc["assigned"] == []


async def test_rm_is_refused_while_assigned_and_removes_an_unused_version(
    js: JetStreamContext, nats_server: EmbeddedServer, tmp_path: Path, fleet: str
) -> None:
    _keys, model, registry = await _push(js, tmp_path, fleet)
    await registry.assign(fleet, 1, model=model)
    url = nats_server.url
    code, _, err = await _cli("models", "rm", "--nats", url, "--model", model, "--version", "1")
    assert code == 1
    assert f"assignment {fleet}._fleet" in err
    code, out, _ = await _cli("models", "show", "--nats", url, "--model", model, "--version", "1")
    assert code == 0
    assert f"assigned   {fleet}._fleet" in out
    assert "variant    fp32:" in out

    code, out, err = await _cli("models", "rm", "--nats", url, "--model", model, "--version", "2")
    assert code == 0, err
    assert f"removed {model} v2" in out
    assert [m.version for m in await registry.manifests() if m.name == model] == [1]
    code, _, err = await _cli("models", "show", "--nats", url, "--model", model, "--version", "2")
    assert code == 1
    assert "version 2 is not in the registry (versions: [1])" in err
    # v1's bundle still downloads whole: the files v2 shared with it were kept.
    bundle = await registry.fetch_bundle(model, 1, "fp32", tmp_path / "fetched")
    assert bundle.manifest.version == 1


async def test_a_yank_with_no_earlier_good_version_stops_the_model_and_says_why(
    js: JetStreamContext, nats_server: EmbeddedServer, tmp_path: Path, fleet: str
) -> None:
    """v1 is the only version: yanked, the node serves nothing of the model and its answer
    names the yank; assigning a good version brings it back."""
    from slmops.edge.errors import NoModel

    keys, model, registry = await _push(js, tmp_path, fleet)
    await registry.assign(fleet, 1, model=model)
    cfg = edge_config(tmp_path, keys, fleet=fleet, node="solo", url=nats_server.url, model=tmp_path / "v1")
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        code, out, err = await _cli("models", "yank", "--nats", nats_server.url, "--model", model,
                                    "--version", "1", "--reason", "leaks data")  # fmt: skip
        assert code == 0, err
        assert f"no earlier good version of {model}: nodes stop serving {model}" in out
        assert "ignore it and keep serving v1, or install it on reconnect" in out  # old releases
        await wait_until(lambda: _serving(node) is None, 20, what="the model withdrawn")
        with pytest.raises(NoModel, match=r"v1 was yanked \(leaks data\) and no earlier good version"):
            await node.predict(["hello"])
        assert not any(p.name.startswith(f"{model}__1__") for p in node.models.cache_dir.iterdir())
        await registry.assign(fleet, 2, model=model)
        await wait_until(lambda: _serving(node) == ModelRef(name=model, version=2), 20, what="v2 serving")
