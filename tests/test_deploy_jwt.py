"""deploy/nats/jwt/ (operator mode) run for real: every config passes ``nats-server -t``
with an ``auth.conf`` from ``slmops fleet server-config``, and the leaf layout works end to
end — a device at a site (JetStream domain ``hub``) publishes with acks, reads its own
assignment, downloads a model and is refused another node's key; a revocation pushed at the
hub cuts it off at the site. Only addresses, ports, paths and store directories are
rewritten in the copies."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest
from test_deploy import _servers

from _nats import free_port
from slmops.cloud.trust import FleetDir, push_account
from slmops.shared import names
from slmops.shared.errors import NatsUnavailable
from slmops.shared.kv import kv_get_direct
from slmops.shared.objects import fetch_object
from slmops.shared.provision import ensure_resources
from slmops.shared.server import find_nats_server

JWT_DIR = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "jwt"
CONFS = sorted(JWT_DIR.rglob("*.conf"))


def _tree(fleet_dir: FleetDir, dst: Path, *, leaf_site: bool = False) -> Path:
    """A copy of deploy/nats/jwt with its auth.conf (resolver store inside ``dst``)."""
    shutil.copytree(JWT_DIR, dst)
    (dst / "resolver").mkdir()
    (dst / "auth.conf").write_text(fleet_dir.server_conf_text(dst / "resolver", leaf_site=leaf_site))
    return dst


def _rewrite(path: Path, pairs: dict[str, str]) -> None:
    text = path.read_text()
    for old, new in pairs.items():
        assert old in text, f"{path.name} no longer holds {old!r}: update tests/test_deploy_jwt.py"
        text = text.replace(old, new)
    path.write_text(text)


@pytest.mark.parametrize("conf", CONFS, ids=[str(p.relative_to(JWT_DIR)) for p in CONFS])
def test_jwt_config_passes_the_servers_config_test(conf: Path, tmp_path: Path) -> None:
    tree = _tree(FleetDir.init(tmp_path / "ids"), tmp_path / "jwt", leaf_site=conf.name == "site.conf")
    done = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(tree / conf.relative_to(JWT_DIR))],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is valid" in done.stdout + done.stderr


@pytest.mark.anyio
async def test_leaf_site_in_operator_mode_serves_its_devices_and_applies_a_revocation(tmp_path: Path) -> None:
    ids = FleetDir.init(tmp_path / "ids")
    node = ids.enroll("node", fleet="shop", node="till-001", js_domain="hub")
    ids.enroll("node", fleet="shop", node="till-002", js_domain="hub")
    site_user = ids.enroll("cloud", name="site-042")
    leaf_port = free_port()
    hub = _tree(ids, tmp_path / "hub")
    _rewrite(hub / "leaf" / "hub.conf", {
        "listen: 0.0.0.0:4222": "listen: 127.0.0.1:-1", "http: 127.0.0.1:8222\n": "",
        'store_dir: "/var/lib/nats/jetstream"': f"store_dir: {json.dumps(str(tmp_path / 'js'))}",
        "listen: 0.0.0.0:7422": f"listen: 127.0.0.1:{leaf_port}",
    })  # fmt: skip
    site = _tree(ids, tmp_path / "site", leaf_site=True)
    _rewrite(site / "leaf" / "site.conf", {
        "listen: 0.0.0.0:4222": "listen: 127.0.0.1:-1", "http: 127.0.0.1:8222\n": "",
        "hub.example.com:7422": f"127.0.0.1:{leaf_port}",
        "/etc/nats/site.creds": str(site_user.creds), "/etc/nats/sys.creds": str(ids.sys_creds),
    })  # fmt: skip
    pairs = (
        (hub / "leaf" / "hub.conf", tmp_path / "run-hub"),
        (site / "leaf" / "site.conf", tmp_path / "run-site"),
    )
    async with _servers(*pairs) as (h, s):
        cloud = await nats.connect(h.url, user_credentials=str(ids.cloud_creds))
        try:
            js = cloud.jetstream()
            await ensure_resources(js)
            kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
            await kv.put(names.assignment_key("shop", "till-001"), b"own-v1")
            await kv.put(names.assignment_key("shop", "till-002"), b"other-v1")
            blob = bytes(range(256)) * 9000
            await (await js.object_store(names.MODELS_BUCKET)).put("m/1/fp32", blob)
        finally:
            await cloud.close()

        errors: list[str] = []
        closed = anyio.Event()

        async def error_cb(exc: Exception) -> None:
            errors.append(str(exc).lower())

        async def closed_cb() -> None:
            closed.set()

        nc = await nats.connect(
            s.url, user_credentials=str(node.creds), inbox_prefix=names.inbox_prefix("shop", "till-001"),
            error_cb=error_cb, closed_cb=closed_cb,
        )  # fmt: skip
        try:
            njs = nc.jetstream(domain="hub", timeout=3)
            with anyio.fail_after(30):  # the leaf link comes up in the background
                while True:
                    try:
                        ack = await njs.publish(names.telemetry_subject("shop", "till-001"), b"agg")
                        break
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        await anyio.sleep(0.2)
            assert ack.stream == names.TELEMETRY_STREAM
            own = await kv_get_direct(njs, names.ASSIGNMENTS_BUCKET, names.assignment_key("shop", "till-001"))
            assert own == b"own-v1"
            out = io.BytesIO()
            with anyio.fail_after(30):
                await fetch_object(njs, names.MODELS_BUCKET, "m/1/fp32", out)
            assert out.getvalue() == blob
            with pytest.raises(NatsUnavailable):
                await kv_get_direct(njs, names.ASSIGNMENTS_BUCKET, names.assignment_key("shop", "till-002"))
            assert any("permissions violation" in e and "till-002" in e for e in errors), errors

            ids.revoke(fleet="shop", node="till-001")
            await push_account(h.url, ids.sys_creds, ids.account_jwt())
            with anyio.fail_after(10):  # the hub's update reaches the site's resolver
                await closed.wait()
            assert "revoked" in str(nc.last_error).lower(), nc.last_error
        finally:
            await nc.close()
