"""The cloud's recalibration loop downloads bundles through the shared streamed download
(``shared.objects``): a download cut short leaves no subscription behind (nats-py's
``get(writeinto=...)``, which it used before, leaves one that keeps filling memory)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from slmops.cloud.recalibration.loop import RecalibrationLoop
from slmops.shared import names

pytestmark = pytest.mark.anyio


def subscriptions(nc: NATS) -> int:
    # nats-py has no public count of a client's subscriptions; this is what leaks.
    subs: dict[int, Any] = nc._subs
    return len(subs)


async def test_a_cancelled_bundle_download_leaves_no_subscription(
    nc: NATS, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    model = f"fetch-{fleet}"
    store = await js.object_store(names.MODELS_BUCKET)
    await store.put(names.model_object_name(model, 1, "fp32"), os.urandom(3 * 1024 * 1024 + 17))
    loop = RecalibrationLoop(js, Ed25519PrivateKey.generate(), policy="suggest")
    before = subscriptions(nc)
    cut = False
    async with anyio.create_task_group() as tg:

        async def download() -> None:
            await loop._fetch(model, 1, "fp32", tmp_path / "work")

        tg.start_soon(download)
        archive = tmp_path / "work" / "bundle.tar"

        def streaming() -> bool:
            return subscriptions(nc) > before and archive.exists() and archive.stat().st_size > 0

        with anyio.fail_after(30):
            while not streaming():  # cancel while the chunks are arriving
                await anyio.lowlevel.checkpoint()
        cut = True
        tg.cancel_scope.cancel()
    assert cut
    assert 0 < (tmp_path / "work" / "bundle.tar").stat().st_size < 3 * 1024 * 1024
    assert subscriptions(nc) == before
