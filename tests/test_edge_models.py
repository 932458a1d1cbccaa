"""The model manager on real bundles and real ORT: verified installs, the cache of current +
previous, rollback, rejection of bad bundles without partial files, reload at start, and a
swap under load where in-flight requests finish on the old session."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from _bad_bundles import BAD_BUNDLES

from _edge_util import Keys, edge_config
from slmops.edge.models import ModelManager
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import TrustStore
from slmops.shared.errors import BundleError
from slmops.shared.messages import ModelManifest


def manager(cache: Path, keys: Keys) -> ModelManager:
    ids: dict[tuple[str, int, str], int] = {}

    async def register(m: ModelManifest) -> int:
        return ids.setdefault((m.name, m.version, m.variant), len(ids) + 1)

    return ModelManager(cache, TrustStore.from_files([keys.pub]), register=register)


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


@pytest.mark.anyio
async def test_install_keeps_current_and_previous_and_rolls_back(tmp_path: Path, keys: Keys) -> None:
    cache = tmp_path / "cache"
    mm = manager(cache, keys)
    assert await mm.open() is None
    for v in (1, 2, 3):
        ref = await mm.install(keys.bundle(version=v).path, source="test")
        assert ref.version == v
    assert mm.current is not None
    assert mm.current.ref.version == 3
    assert mm.previous is not None
    assert mm.previous.version == 2
    assert cache_entries(cache) == ["state.json", "testclf__2__fp32", "testclf__3__fp32"]
    back = await mm.rollback()
    assert back.version == 2
    assert mm.current.ref.version == 2
    assert mm.previous.version == 3
    # a new manager (a restarted node) loads the cached current model
    again = manager(cache, keys)
    active = await again.open()
    assert active is not None
    assert active.ref.version == 2
    assert again.previous is not None
    assert again.previous.version == 3
    preds = active.session.predict(["gamma"])
    assert preds[0].label == "gamma"


@pytest.mark.anyio
async def test_reinstalling_the_current_version_is_a_no_op(tmp_path: Path, keys: Keys) -> None:
    mm = manager(tmp_path / "cache", keys)
    await mm.open()
    await mm.install(keys.bundle(version=1).path, source="a")
    first = mm.current
    await mm.install(keys.bundle(version=1).path, source="b")
    assert mm.current is first


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(BAD_BUNDLES))
async def test_bad_bundle_is_rejected_with_its_code_and_leaves_nothing(
    tmp_path: Path, keys: Keys, kind: str
) -> None:
    """Each way a bundle can be wrong is refused with its code; the old model keeps serving
    and the cache holds no new or temporary file."""
    cache = tmp_path / "cache"
    mm = manager(cache, keys)
    await mm.open()
    await mm.install(keys.bundle(version=1).path, source="test")
    before = cache_entries(cache)
    bad_dir = tmp_path / "bad"
    code = BAD_BUNDLES[kind](bad_dir, keys.key, 2, "testclf")
    mm.memory_mb = 1024  # the device the too_large bundle does not fit
    with pytest.raises(BundleError) as info:
        await mm.install(bad_dir, source="test")
    assert info.value.code == code
    assert mm.current is not None
    assert mm.current.ref.version == 1
    assert cache_entries(cache) == before


@pytest.mark.anyio
async def test_without_trusted_keys_nothing_installs(tmp_path: Path, keys: Keys) -> None:
    async def register(m: ModelManifest) -> int:
        return 1

    mm = ModelManager(tmp_path / "cache", TrustStore(), register=register)
    await mm.open()
    with pytest.raises(BundleError) as info:
        await mm.install(keys.bundle().path, source="test")
    assert info.value.code == "unknown_key"


@pytest.mark.anyio
async def test_rollback_without_previous_is_refused(tmp_path: Path, keys: Keys) -> None:
    mm = manager(tmp_path / "cache", keys)
    await mm.open()
    await mm.install(keys.bundle().path, source="test")
    with pytest.raises(BundleError) as info:
        await mm.rollback()
    assert info.value.code == "no_previous"


@pytest.mark.anyio
async def test_tampered_cached_model_falls_back_to_previous_at_start(tmp_path: Path, keys: Keys) -> None:
    cache = tmp_path / "cache"
    mm = manager(cache, keys)
    await mm.open()
    await mm.install(keys.bundle(version=1).path, source="test")
    await mm.install(keys.bundle(version=2).path, source="test")
    model = cache / "testclf__2__fp32" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    active = await manager(cache, keys).open()
    assert active is not None
    assert active.ref.version == 1


@pytest.mark.anyio
async def test_swap_under_load_loses_no_request(tmp_path: Path, keys: Keys, fleet: str) -> None:
    """Requests running while v2 is installed all succeed, each answered by v1 or v2, and
    every one is in telemetry under the model that answered it."""
    cfg = edge_config(tmp_path, keys, fleet=fleet, model=keys.bundle(version=1).path, window=60.0)
    v2 = keys.bundle(version=2).path
    versions: list[int] = []
    swapped = anyio.Event()
    async with EdgeNode(cfg) as node:

        async def load(i: int) -> None:
            after = 0
            while after < 5:  # keep the load up until 5 requests after the swap
                (p,) = await node.predict([f"alpha {i} {len(versions)}"])
                versions.append(p.model.version)
                after += swapped.is_set()

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(load, i)
            await anyio.sleep(0.01)
            await node.models.install(v2, source="test")
            swapped.set()
        assert set(versions) == {1, 2}
        assert versions.count(2) >= 8 * 5 - 8  # a loader's first request after the swap may be in flight
        await node.windower.tick()
        counts = await node.buffer.outbox_counts()
        assert sum(c for _, c in counts) == len(versions)


@pytest.mark.anyio
async def test_model_flag_does_not_downgrade_a_newer_cached_model(
    tmp_path: Path, keys: Keys, fleet: str
) -> None:
    v1, v2 = keys.bundle(version=1).path, keys.bundle(version=2).path
    async with EdgeNode(edge_config(tmp_path, keys, fleet=fleet, model=v2)) as node:
        assert node.models.current is not None
    async with EdgeNode(edge_config(tmp_path, keys, fleet=fleet, model=v1)) as node:
        assert node.models.current is not None
        assert node.models.current.ref.version == 2
