"""A node follows its assignment on a real server: the whole path from factory build to the
node serving the new version; every bad bundle rejected with a status naming the reason while
the old model keeps serving and no partial file stays; refresh on reconnect; a swap under
continuous load without a failed request; the variant picked by the node's memory; the node's
own key overriding the fleet's."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest
import structlog.testing
from _bad_bundles import BAD_BUNDLES, resign
from _delivery import Delivery, serving
from nats.js import JetStreamContext

from _models import make_bundle
from _nats import wait_until
from _proxy import TcpProxy
from slmops.cloud.factory.build import build
from slmops.edge.config import EdgeConfig
from slmops.edge.errors import NoModel
from slmops.edge.node import EdgeNode
from slmops.shared import names
from slmops.shared.bundle import pack_archive, read_bundle
from slmops.shared.messages import (
    ModelManifest,
    ModelRef,
    RefreshResult,
    encode_json,
)

pytestmark = pytest.mark.anyio


async def store_raw(
    js: JetStreamContext, bundle_dir: Path, archive: bytes | None = None, listed: ModelManifest | None = None
) -> ModelRef:
    """Put a bundle into the registry WITHOUT push's checks, as a broken or hostile registry
    would, so the node's own checks are what is tested. ``listed``: the manifest the registry's
    KV shows (default: the bundle's own)."""
    b = read_bundle(bundle_dir)
    m = b.manifest
    obs = await js.object_store(names.MODELS_BUCKET)
    await obs.put(names.model_object_name(m.name, m.version, m.variant), archive or pack_archive(b))
    kv = await js.key_value(names.MODELS_MANIFEST_BUCKET)
    await kv.put(names.manifest_key(m.name, m.version, m.variant), encode_json(listed or m))
    return m.ref


def leftovers(node: EdgeNode) -> list[str]:
    """Files and directories in the model cache besides the bundles it keeps and its state."""
    keep = {"state.json"}
    for ref in (serving(node), node.models.previous):
        if ref is not None:
            keep.add(f"{ref.name}__{ref.version}__{ref.variant}")
    return sorted(p.name for p in node.models.cache_dir.iterdir() if p.name not in keep)


async def test_build_push_assign_and_the_node_serves_the_new_version(d: Delivery) -> None:
    v1 = build(d.tmp / "v1", d.keys.key, name=d.model, version=1, seed=0).bundle
    v2 = build(d.tmp / "v2", d.keys.key, name=d.model, version=2, seed=1).bundle
    for b in (v1, v2):
        await d.push(b)
    cfg = d.config(model=v1.path)
    async with EdgeNode(cfg) as node:
        assert serving(node) == d.ref(1)
        await node.link.wait_online(10)
        await d.assign(2)
        await wait_until(lambda: serving(node) == d.ref(2), 20, what="v2 serving")
        answer = await node.predict(["What is AI?"])
        assert answer[0].model == d.ref(2)
        assert answer[0].label in v2.manifest.labels

        def reports() -> list[RefreshResult]:
            return [s.refresh for s in d.statuses.of("n1", "model_installed") if s.refresh is not None]

        await wait_until(lambda: bool(reports()), 10, what="installed status with its refresh result")
        assert reports()[-1].ok
        assert reports()[-1].model == d.ref(2)
        assert node.models.previous == d.ref(1)
        assert leftovers(node) == []


@pytest.mark.parametrize("case", [*sorted(BAD_BUNDLES), "truncated_download", "too_large_listed_small"])
async def test_a_bad_bundle_is_rejected_and_the_old_model_keeps_serving(case: str, d: Delivery) -> None:
    v1 = make_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model)
    bad = d.tmp / "v2"
    if case == "truncated_download":
        # The stored archive lost its tail: the object is consistent, its content is not.
        good = make_bundle(bad, d.keys.key, version=2, name=d.model)
        archive = pack_archive(good)
        await store_raw(d.js, bad, archive[: len(archive) // 2])
        expected = "truncated"
    elif case == "too_large_listed_small":
        # The registry's KV understates the need, so only the bundle's signed manifest,
        # checked after the download, can refuse it.
        expected = BAD_BUNDLES["too_large"](bad, d.keys.key, 2, d.model)
        listed = msgspec.structs.replace(read_bundle(bad).manifest, min_memory_mb=0)
        await store_raw(d.js, bad, listed=listed)
    else:
        expected = BAD_BUNDLES[case](bad, d.keys.key, 2, d.model)
        await store_raw(d.js, bad)
    cfg = d.config(model=v1.path)
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await d.assign(2, variant="fp32")
        await wait_until(lambda: bool(d.statuses.of("n1", "model_rejected")), 20, what="rejected status")
        report = d.statuses.of("n1", "model_rejected")[-1].refresh
        assert report is not None
        assert (report.ok, report.code, report.model.version) == (False, expected, 2)
        assert report.reason
        # The registry's listing already shows a too-large model: it is refused unfetched.
        assert ("not downloaded" in report.reason) == (case == "too_large")
        assert serving(node) == d.ref(1)
        answer = await node.predict(["about beta"])
        assert (answer[0].label, answer[0].model.version) == ("beta", 1)
        assert leftovers(node) == []
        # Refused for what it is: not fetched again for the same assignment.
        checks = node.refresher.stats.checks
        await node.refresher.check()
        assert node.refresher.stats.checks == checks + 1
        assert len(d.statuses.of("n1", "model_rejected")) == 1


async def test_a_version_assigned_while_offline_runs_soon_after_reconnect(d: Delivery) -> None:
    v1 = make_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model)
    v2 = make_bundle(d.tmp / "v2", d.keys.key, version=2, name=d.model)
    await d.push(v2)
    async with TcpProxy("127.0.0.1", d.server.port) as proxy:
        cfg = d.config(url=proxy.url, model=v1.path)
        async with EdgeNode(cfg) as node:
            await node.link.wait_online(10)
            await proxy.cut()
            await wait_until(lambda: node.link.state.value != "online", 10, what="node offline")
            await d.assign(2)
            assert serving(node) == d.ref(1)
            await proxy.restore()
            t0 = anyio.current_time()
            await node.link.wait_online(15)
            await wait_until(lambda: serving(node) == d.ref(2), 10, what="v2 after reconnect")
            # "Within seconds": nats-py's reconnect wait (2 s) plus one download and install.
            assert anyio.current_time() - t0 < 10


async def test_a_swap_under_continuous_load_fails_no_request(d: Delivery) -> None:
    v1 = make_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model)
    v2 = make_bundle(d.tmp / "v2", d.keys.key, version=2, name=d.model)
    await d.push(v2)
    cfg = d.config(model=v1.path)
    served: dict[int, int] = {}
    failures: list[BaseException] = []
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        stop = anyio.Event()

        async def client(i: int) -> None:
            texts = ["about alpha", "about beta", "about gamma"]
            while not stop.is_set():
                try:
                    answer = await node.predict([texts[i % 3]])
                except Exception as exc:
                    failures.append(exc)
                    continue
                assert answer[0].label == texts[i % 3].split()[1]
                served[answer[0].model.version] = served.get(answer[0].model.version, 0) + 1

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(client, i)
            await wait_until(lambda: served.get(1, 0) > 50, 10, what="load on v1")
            await d.assign(2)
            await wait_until(lambda: served.get(2, 0) > 50, 20, what="load on v2")
            stop.set()
    assert failures == []
    assert served[1] > 0
    assert served[2] > 0


async def test_the_node_picks_the_variant_its_memory_fits(d: Delivery) -> None:
    v1 = make_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model)
    fp32 = make_bundle(d.tmp / "fp32", d.keys.key, version=2, name=d.model)
    resign(fp32.path, d.keys.key, min_memory_mb=256)
    int8 = make_bundle(d.tmp / "int8", d.keys.key, version=2, name=d.model, variant="int8")
    resign(int8.path, d.keys.key, min_memory_mb=64, parent_version=2)
    for path in (fp32.path, int8.path):
        await d.push(read_bundle(path))
    small = d.config(node="small", model=v1.path)
    big = d.config(node="big", model=v1.path)
    async with EdgeNode(small) as s, EdgeNode(big) as b:
        s.models.memory_mb = 128
        b.models.memory_mb = 4096
        await s.link.wait_online(10)
        await b.link.wait_online(10)
        a = await d.assign(2)  # fleet-wide: each node chooses
        assert a.variant is None
        await wait_until(lambda: serving(s) == d.ref(2, variant="int8"), 20, what="small")
        await wait_until(lambda: serving(b) == d.ref(2, variant="fp32"), 20, what="big")


async def _v1_node_with_v2_v3_pushed(d: Delivery) -> EdgeConfig:
    """Versions 2 and 3 in the registry, and the config of a node starting on version 1."""
    for v in (2, 3):
        await d.push(make_bundle(d.tmp / f"v{v}", d.keys.key, version=v, name=d.model))
    v1 = make_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model)
    return d.config(model=v1.path)


async def test_the_node_key_overrides_the_fleet_key_and_falling_back_works(d: Delivery) -> None:
    cfg = await _v1_node_with_v2_v3_pushed(d)
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        await d.assign(3, node="n1")
        await d.assign(2)
        await wait_until(lambda: serving(node) == d.ref(3), 20, what="node key wins")
        kv = await d.js.key_value(names.ASSIGNMENTS_BUCKET)
        await kv.delete(names.assignment_key(d.fleet, "n1"))
        await wait_until(lambda: serving(node) == d.ref(2), 20, what="fleet key after delete")


async def test_a_node_without_a_model_takes_its_assignment_at_start(d: Delivery) -> None:
    """The assignment was written before the node ever ran: no watch event will come, the
    read at start finds it. The download folder is gone once the refresh has finished (its
    install is counted after the cleanup; the model goes live a moment before, so looking
    right after the swap raced the cleanup under load)."""
    v4 = make_bundle(d.tmp / "v4", d.keys.key, version=4, name=d.model)
    await d.push(v4)
    await d.assign(4)
    cfg = d.config()
    async with EdgeNode(cfg) as node:
        assert serving(node) is None
        await wait_until(lambda: serving(node) == d.ref(4), 20, what="v4 at start")
        assert (await node.predict(["gamma"]))[0].label == "gamma"
        await wait_until(lambda: node.refresher.stats.installs == 1, 10, what="the refresh finished")
        assert leftovers(node) == []


async def test_a_garbled_node_assignment_is_ignored_and_the_fleet_one_followed(d: Delivery) -> None:
    v2 = make_bundle(d.tmp / "v2", d.keys.key, version=2, name=d.model)
    await d.push(v2)
    kv = await d.js.key_value(names.ASSIGNMENTS_BUCKET)
    await kv.put(names.assignment_key(d.fleet, "n1"), b'{"fleet": "x", "model": "../etc", "version": 1}')
    await d.assign(2)
    v1 = make_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model)
    cfg = d.config(model=v1.path)
    async with EdgeNode(cfg) as node:
        await wait_until(lambda: serving(node) == d.ref(2), 20, what="fleet version")
        checks = node.refresher.stats.checks
        await kv.put(names.assignment_key(d.fleet, "n1"), b"not json at all")
        await wait_until(lambda: node.refresher.stats.checks > checks, 10, what="re-check after the write")
        assert serving(node) == d.ref(2)
        assert node.last_error is None


async def test_a_version_the_node_blocked_is_not_fetched_again(d: Delivery) -> None:
    """edge.safety blocks a version it rolled back; its assignment must not bring it back."""
    cfg = await _v1_node_with_v2_v3_pushed(d)
    async with EdgeNode(cfg) as node:
        node.safety.blocked.add((d.model, 2))
        await node.link.wait_online(10)
        await d.assign(2)
        await wait_until(lambda: node.refresher.stats.blocked_skips > 0, 10, what="blocked version skipped")
        assert serving(node) == d.ref(1)
        assert node.refresher.stats.bytes_downloaded == 0
        await d.assign(3)
        await wait_until(lambda: serving(node) == d.ref(3), 20, what="v3")


async def test_a_node_is_woken_by_its_assignment_without_any_consumer(d: Delivery) -> None:
    """Issue 13 fault 11: a node's watches were consumers (names and push targets in the
    request body). Now it is woken by the bucket's republished puts on its own subjects
    (``names.assignment_subjects``) and downloads by direct gets: a new assignment is
    installed well within the 60 s poll, and no consumer on the assignments bucket filters
    this fleet's keys at any point."""
    v4 = make_bundle(d.tmp / "v4", d.keys.key, version=4, name=d.model)
    v5 = make_bundle(d.tmp / "v5", d.keys.key, version=5, name=d.model)
    for bundle in (v4, v5):
        await d.push(bundle)
    await d.assign(4)
    cfg = d.config()
    assert cfg.refresh.poll_interval >= 60  # the default: a pass below is a wake-up, not a poll

    async def fleet_consumers() -> list[str]:
        infos = await d.js.consumers_info(f"KV_{names.ASSIGNMENTS_BUCKET}")
        return [c.name for c in infos if d.fleet in (c.config.filter_subject or "")]

    async with EdgeNode(cfg) as node:
        await wait_until(lambda: serving(node) == d.ref(4), 20, what="v4")
        checks = node.refresher.stats.checks
        await d.assign(5)
        await wait_until(lambda: serving(node) == d.ref(5), 20, what="v5 by wake-up")
        assert node.refresher.stats.checks > checks
        assert await fleet_consumers() == []


async def test_models_assigned_side_by_side_are_each_followed(d: Delivery) -> None:
    """Issue 11, assignments keyed by node and model name: a classifier assigned the usual
    way (legacy fleet key) and an embedder assigned side by side (its per-model fleet key)
    are both installed and served; the embedder's new version, on the node's own per-model
    key, replaces only the embedder; the classifier's, on the node's legacy key, only the
    classifier."""
    from _transformer import make_transformer_bundle

    clf, emb = f"c{d.fleet}", f"e{d.fleet}"  # the model store is shared by the session
    for name, version, task in (
        (clf, 1, "classification"),
        (clf, 2, "classification"),
        (emb, 1, "embedding"),
        (emb, 2, "embedding"),
    ):
        b = make_transformer_bundle(
            d.tmp / f"{name}-{version}", d.keys.key, name=name, version=version, task=task
        )
        await d.push(b)
    cfg = d.config()
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)

        def held() -> list[tuple[str, int]]:
            return [(m.ref.name, m.ref.version) for m in node.models.all()]

        await d.assign(1, model=clf)  # its watch wakes the node
        await wait_until(lambda: held() == [(clf, 1)], 20, what="the classifier served")
        await d.assign(1, model=emb, side_by_side=True)
        # The per-model keys wake the node too: it follows within seconds, not at its next
        # poll (60 s).
        await wait_until(lambda: held() == [(clf, 1), (emb, 1)], 20, what="the embedder by its watch")
        assert held() == [(clf, 1), (emb, 1)]  # the first installed is the default
        assert (await node.predict(["alpha"]))[0].model.name == clf
        assert (await node.embed(["alpha"])).model.name == emb

        await d.assign(2, model=emb, node="n1", side_by_side=True)
        await wait_until(lambda: held() == [(clf, 1), (emb, 2)], 20, what="embedder v2 by its watch")
        await d.assign(2, model=clf, node="n1")
        await wait_until(lambda: held() == [(clf, 2), (emb, 2)], 20, what="classifier v2")
        assert (await node.predict(["alpha"]))[0].model.version == 2
        assert (await node.embed(["alpha"])).model.version == 2
        assert node.models.previous_of(emb) == ModelRef(name=emb, version=1)
        assert node.models.previous == ModelRef(name=clf, version=1)
        await wait_until(
            lambda: len([s for s in d.statuses.of("n1", "model_installed") if s.refresh is not None]) >= 4,
            10,
            what="four installed statuses",
        )
        installed = [s.refresh.model for s in d.statuses.of("n1", "model_installed") if s.refresh is not None]
        assert sorted((r.name, r.version) for r in installed) == [(clf, 1), (clf, 2), (emb, 1), (emb, 2)]
        last = d.statuses.of("n1", "model_installed")[-1]
        assert [(r.name, r.version) for r in last.models] == [(clf, 2), (emb, 2)]

        # Hostile: a bad value on the node's own per-model key unloads nothing (the fleet's
        # per-model key still names v1, but a bad write is not a deletion).
        kv = await d.js.key_value(names.ASSIGNMENTS_BUCKET)
        checks = node.refresher.stats.checks
        await kv.put(names.assignment_key(d.fleet, "n1", emb), b'{"model": 7')
        await wait_until(
            lambda: node.refresher.stats.checks > checks, 20, what="re-check after the bad write"
        )
        assert node.models.get(emb) is not None
        # Deleting every per-model key of the embedder unloads it (woken by the watch).
        await kv.delete(names.assignment_key(d.fleet, "n1", emb))
        await kv.delete(names.assignment_key(d.fleet, None, emb))
        await wait_until(lambda: held() == [(clf, 2)], 20, what="the embedder unloaded")
        assert node.refresher.statistics().removals == 1
        with pytest.raises(NoModel, match="no longer assigned to this node"):
            await node.embed(["alpha"], emb)
        await wait_until(lambda: bool(d.statuses.of("n1", "model_removed")), 10, what="model_removed status")
        assert [(r.name, r.version) for r in d.statuses.of("n1", "model_removed")[-1].models] == [(clf, 2)]
        # The classifier (named by the legacy key) stays; its cache keeps only its bundles.
        cached = sorted(d.name for d in node.models.cache_dir.iterdir() if d.is_dir() and d.name[0] != ".")
        assert all(d.startswith(clf) for d in cached), cached
        # Assigned again, it comes back.
        await d.assign(2, model=emb, side_by_side=True)
        await wait_until(lambda: held() == [(clf, 2), (emb, 2)], 20, what="the embedder back")


async def test_a_per_model_key_naming_another_model_is_ignored(d: Delivery) -> None:
    """A value under ``<fleet>.<node>.<A>`` that names model B is someone's mistake: the node
    follows the keys it can trust and logs the misfiled one."""
    v1 = make_bundle(d.tmp / "v1", d.keys.key, version=1, name=d.model)
    await d.push(v1)
    kv = await d.js.key_value(names.ASSIGNMENTS_BUCKET)
    a = await d.assign(1, node="n1")
    await kv.put(names.assignment_key(d.fleet, "n1", "other-model"), encode_json(a))
    # Hostile: per-model keys whose model part no model name can be (KV allows "=" and "/").
    for bad in ("a=b", "_x", "x/y", "m" * 100):
        await kv.put(f"{names.assignment_key(d.fleet, 'n1')}.{bad}", encode_json(a))
    cfg = d.config()
    async with EdgeNode(cfg) as node:
        await node.link.wait_online(10)
        with structlog.testing.capture_logs() as logs:
            await wait_until(lambda: serving(node) == v1.manifest.ref, 20, what="v1 serving")
            await node.refresher.check()
        assert node.models.names == [d.model]
        assert any(e["event"] == "assignment_misfiled" and e["key_model"] == "other-model" for e in logs)
        assert len([e for e in logs if e["event"] == "assignment_key_invalid"]) >= 4
        assert node.refresher.stats.rejections == 0
