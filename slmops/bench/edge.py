"""``slmops bench edge``: predictions/s through the node vs bare ``session.run``, and node RSS.

Model: the model factory's default model (``cloud.factory.build``), fed held-out corpus texts.
baseline: in this process, a loop of ``featurize`` (the manifest's preprocessing) +
``InferenceSession.run`` + argmax at the same batch size — what an app embedding ONNX Runtime
itself would do.
Project and baseline alternate in slices within each case (the machine's load drifts).
project: ``EdgeNode.predict`` (Python API) with telemetry on, and ``POST /v1/predict`` to an
``slmops edge`` subprocess. ``durable`` = the answer waits for the group commit holding its
telemetry (the default, what makes ``kill -9`` lose nothing answered); ``concurrency`` =
callers at once (the node micro-batches them).
RSS: the ``slmops edge`` subprocess after the HTTP load vs a bare Python process that loaded
the same model with ONNX Runtime and ran it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.edge.config import EdgeConfig
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import Bundle
from slmops.shared.preprocess import featurize
from slmops.shared.runtime import load_session

__all__ = ["run"]

_BARE_RSS = """
import sys, time
from pathlib import Path
from shared.bundle import read_bundle
from shared.preprocess import featurize
from shared.runtime import load_session
b = read_bundle(Path(sys.argv[1]))
s = load_session(b.model_path, b.manifest)
texts = [l for l in sys.stdin.read().splitlines() if l]
for i in range(0, len(texts), 32):
    s.ort.run(["probs"], featurize(texts[i:i + 32], b.manifest.preprocessing).feeds())
for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
        print(int(line.split()[1]) // 1024)
"""


def _texts() -> list[str]:
    from slmops.cloud.factory.corpus import load_topics

    topics = load_topics()
    return [t for utterances in topics.values() for t in utterances]


#: Project and baseline alternate in this many slices per case, so a change in the shared
#: machine's load hits both alike.
_SLICES = 4


async def _callers(
    call: Callable[[list[str]], Awaitable[object]],
    texts: list[str],
    batch: int,
    concurrency: int,
    seconds: float,
) -> tuple[int, float]:
    """(predictions, seconds) of ``concurrency`` callers each calling ``call(batch texts)``."""
    done = [0]
    deadline = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
            await call(chunk)
            done[0] += batch
            i += batch * concurrency

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in range(concurrency):
            tg.start_soon(caller, c * batch)
    return done[0], time.perf_counter() - t0


class _Bare:
    """The baseline: featurize + ``InferenceSession.run`` + argmax, in a loop."""

    def __init__(self, bundle: Bundle, texts: list[str]) -> None:
        self.session = load_session(bundle.model_path, bundle.manifest)
        self.pp = bundle.manifest.preprocessing
        self.out = bundle.manifest.outputs[-1].name
        self.texts = texts

    def run(self, batch: int, seconds: float) -> tuple[int, float]:
        ort, pp, texts = self.session.ort, self.pp, self.texts
        n = i = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            chunk = [texts[(i + j) % len(texts)] for j in range(batch)]
            (probs,) = ort.run([self.out], featurize(chunk, pp).feeds())
            probs.argmax(axis=1)
            n += batch
            i += batch
        return n, time.perf_counter() - t0


async def _paired(
    call: Callable[[list[str]], Awaitable[object]], bare: _Bare, batch: int, concurrency: int, seconds: float
) -> tuple[float, float]:
    """(project, baseline) predictions/s, measured in alternating slices."""
    pn = pt = bn = bt = 0.0
    for _ in range(_SLICES):
        n, t = await _callers(call, bare.texts, batch, concurrency, seconds / _SLICES)
        pn, pt = pn + n, pt + t
        n, t = bare.run(batch, seconds / _SLICES)
        bn, bt = bn + n, bt + t
    return pn / pt, bn / bt


def _rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _http_cases(
    tmp: Path, bundle: Bundle, pub: Path, bare: _Bare, cases: list[tuple[int, int]], seconds: float
) -> tuple[list[tuple[int, int, float, float]], int]:
    port = _free_port()
    args = [
        sys.executable, "-m", "slmops.cli", "--log-level", "warning", "edge",
        "--nats", "nats://127.0.0.1:1", "--fleet", "bench", "--node", "http1",
        "--data", str(tmp / "http-node"), "--model", str(bundle.path), "--trust", str(pub),
        "--http", f"127.0.0.1:{port}", "--window", "1s", "--min-count", "1",
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    out: list[tuple[int, int, float, float]] = []
    async with await anyio.open_process(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector) as session:
                with anyio.fail_after(60):
                    while True:
                        try:
                            async with session.get(base + "/v1/health") as r:
                                if r.status == 200:
                                    break
                        except aiohttp.ClientError:
                            await anyio.sleep(0.1)

                async def call(chunk: list[str]) -> None:
                    async with session.post(base + "/v1/predict", json={"texts": chunk}) as r:
                        if r.status != 200:
                            raise RuntimeError(f"node answered {r.status}: {await r.text()}")
                        await r.read()

                for batch, conc in cases:
                    out.append((batch, conc, *await _paired(call, bare, batch, conc, seconds)))
            rss = _rss_mb(proc.pid)
        finally:
            proc.terminate()
            with anyio.move_on_after(10):
                await proc.wait()
    return out, rss


def _bare_rss(bundle: Bundle, texts: list[str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _BARE_RSS, str(bundle.path)],
        input="\n".join(texts[:2000]),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(done.stdout.strip().splitlines()[-1])


async def run(quick: bool = False) -> list[dict[str, Any]]:
    from slmops.cloud.factory.build import build

    seconds = 0.2 if quick else 4.0
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmops-bench-edge-") as tmp_name:
        tmp = Path(tmp_name)
        key = Ed25519PrivateKey.generate()
        pub = tmp / "fleet.pub"
        pub.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        bundle = build(tmp / "bundle", key).bundle
        texts = _texts()

        bare = _Bare(bundle, texts)

        def result(
            case: str, batch: int, conc: int, durable: bool, rate: float, base: float
        ) -> dict[str, Any]:
            return {
                "scenario": f"edge {case} b{batch} c{conc}{'' if durable else ' fast-ack'}",
                "project": rate,
                "baseline": base,
                "ratio": rate / base,
                "units": "predictions/s",
                "batch": batch,
                "concurrency": conc,
                "durable": durable,
                "model": f"{bundle.manifest.name} v{bundle.manifest.version} (factory default)",
            }

        for durable in (True, False):
            config = EdgeConfig.build(
                {
                    "fleet": "bench",
                    "node": "py1" if durable else "py2",
                    "data_dir": tmp / f"node-{durable}",
                    "model": bundle.path,
                    "trust": [pub],
                    "nats_url": "nats://127.0.0.1:1",
                    "http": "off",
                    "window": 1.0,
                    "min_count": 1,
                    "durable_ack": durable,
                }
            )
            cases = [(1, 1), (1, 64), (32, 1), (32, 8)] if durable else [(1, 1), (1, 64), (32, 1)]
            async with EdgeNode(config) as node:
                await node.predict(texts[:32])  # warm-up
                for batch, conc in cases:
                    rate, base = await _paired(node.predict, bare, batch, conc, seconds)
                    results.append(result("python", batch, conc, durable, rate, base))
        http, rss = await _http_cases(tmp, bundle, pub, bare, [(1, 1), (1, 32), (32, 1), (32, 8)], seconds)
        for batch, conc, rate, base in http:
            results.append(result("http", batch, conc, True, rate, base))
        bare_rss = _bare_rss(bundle, texts)
        results.append(
            {
                "scenario": "edge node rss",
                "project": rss,
                "baseline": bare_rss,
                "ratio": rss / bare_rss if bare_rss else float("nan"),
                "units": "MB",
                "goal_mb": 150,
                "baseline_note": "python + onnxruntime session of the same model, after 2000 predictions",
            }
        )
    return results
