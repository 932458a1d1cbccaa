"""``slmops bench edge [--model PATH]``: predictions/s through the node vs bare ``session.run``,
per-call overhead, and node RSS.

Model: the bundle at ``--model`` (a directory; re-signed with a throwaway bench key, files
unchanged), else the factory's n-gram model built here; fed the corpus texts (held-out ones
when the model's labels are the corpus topics).
baseline: in this process, a loop of the bare libraries (``bench._bare.BarePredictor``: the
tokenizer in batch mode + ``InferenceSession.run`` of encoder and head + argmax, or
``featurize`` + ``run`` for n-gram bundles) at the same batch size — what an app embedding
ONNX Runtime itself would do. For HTTP also a bare aiohttp endpoint (a subprocess calling the
same predictor in its handler), so the framework's own cost is shown apart from ours.
Project and baseline alternate in slices within each case (the machine's load drifts).
project: ``EdgeNode.predict`` (Python API) with telemetry on, and ``POST /v1/predict`` to an
``slmops edge`` subprocess. ``durable`` = the answer waits for the group commit holding its
telemetry (the default, what makes ``kill -9`` lose nothing answered); ``concurrency`` =
callers at once (the node micro-batches them).
Per-call overhead (µs) = time per call through us − time per call of the bare loop, for the
Python API and HTTP, beside the bare aiohttp endpoint's.
RSS: the ``slmops edge`` subprocess after warm-up and 3 s idle, and its peak (VmHWM) after one
``max_batch`` 32 × ``max_tokens`` request, vs a bare Python process that loaded the same model
with ONNX Runtime and ran it.
"""

from __future__ import annotations

import shutil
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.bench._bare import BarePredictor
from slmops.bench._proc import bench_key, edge_command, status_mb, wait_healthy
from slmops.edge.config import EdgeConfig
from slmops.edge.node import EdgeNode
from slmops.shared.bundle import Bundle, resign_bundle

__all__ = ["run"]

_BARE_RSS = """
import sys
from pathlib import Path
from slmops.bench._bare import BarePredictor
p = BarePredictor(Path(sys.argv[1]))
texts = [l for l in sys.stdin.read().splitlines() if l]
for i in range(0, len(texts), 32):
    p.predict(texts[i:i + 32])
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
    """The baseline: ``BarePredictor.predict`` (bare tokenizer/featurize + ``run`` + argmax) in a loop."""

    def __init__(self, bundle: Bundle, texts: list[str]) -> None:
        self.predictor = BarePredictor(bundle.path)
        self.texts = texts

    def run(self, batch: int, seconds: float) -> tuple[int, float]:
        predict, texts = self.predictor.predict, self.texts
        n = i = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            predict([texts[(i + j) % len(texts)] for j in range(batch)])
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


def _poster(session: aiohttp.ClientSession, url: str) -> Callable[[list[str]], Awaitable[None]]:
    async def call(chunk: list[str]) -> None:
        async with session.post(url, json={"texts": chunk}) as r:
            if r.status != 200:
                raise RuntimeError(f"{url} answered {r.status}: {await r.text()}")
            await r.read()

    return call


async def _http_cases(
    tmp: Path, bundle: Bundle, pub: Path, bare: _Bare, cases: list[tuple[int, int]], seconds: float
) -> tuple[list[tuple[int, int, float, float, float]], dict[str, int]]:
    """Per case (batch, concurrency, ours, bare session, bare aiohttp) predictions/s, and the
    node's RSS: after warm-up + idle, and peak after one max_batch × max_tokens request."""
    port, bare_port = _free_port(), _free_port()
    args = edge_command(tmp / "http-node", "http1", bundle.path, pub, port)
    bare_args = [sys.executable, "-m", "slmops.bench._bare", str(bundle.path), str(bare_port)]
    base, bare_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{bare_port}"
    out: list[tuple[int, int, float, float, float]] = []
    rss: dict[str, int] = {}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    async with (
        await anyio.open_process(args, **quiet) as proc,  # type: ignore[arg-type]
        await anyio.open_process(bare_args, **quiet) as bare_proc,  # type: ignore[arg-type]
    ):
        try:
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector) as session:
                await wait_healthy(session, base)
                await wait_healthy(session, bare_base)
                ours, theirs = (
                    _poster(session, base + "/v1/predict"),
                    _poster(session, bare_base + "/v1/predict"),
                )
                for _ in range(20):  # warm-up: first calls allocate
                    await ours(bare.texts[:1])
                    await theirs(bare.texts[:1])
                await anyio.sleep(3.0)
                rss["idle_mb"] = status_mb(proc.pid, "VmRSS")
                for batch, conc in cases:
                    pn = pt = bn = bt = hn = ht = 0.0
                    for _ in range(_SLICES):
                        n, t = await _callers(ours, bare.texts, batch, conc, seconds / _SLICES)
                        pn, pt = pn + n, pt + t
                        n, t = bare.run(batch, seconds / _SLICES)
                        bn, bt = bn + n, bt + t
                        n, t = await _callers(theirs, bare.texts, batch, conc, seconds / _SLICES)
                        hn, ht = hn + n, ht + t
                    out.append((batch, conc, pn / pt, bn / bt, hn / ht))
                rss["after_load_mb"] = status_mb(proc.pid, "VmRSS")
                long_text = " ".join(["word"] * 2 * bundle.manifest.preprocessing.max_tokens)
                await ours([long_text] * 32)
                rss["peak_mb"] = status_mb(proc.pid, "VmHWM")
                rss["bare_http_mb"] = status_mb(bare_proc.pid, "VmRSS")
        finally:
            for p in (proc, bare_proc):
                p.terminate()
            with anyio.move_on_after(10):
                await proc.wait()
                await bare_proc.wait()
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


def _bundle(tmp: Path, key: Ed25519PrivateKey, model: Path | None) -> tuple[Bundle, str]:
    """The bundle to bench, signed by ``key``: a copy of ``model`` re-signed (its files
    unchanged), else the factory's n-gram model built here."""
    if model is None:
        from slmops.cloud.factory.build import build

        return build(tmp / "bundle", key).bundle, "factory n-gram default"
    shutil.copytree(model, tmp / "bundle")
    bundle = resign_bundle(tmp / "bundle", key)
    m = bundle.manifest
    return bundle, f"{model} ({m.name} v{m.version} {m.variant})"


def _bench_texts(bundle: Bundle) -> list[str]:
    """Held-out corpus texts when the model was trained on the corpus split, else all of it."""
    from slmops.cloud.factory.build import factory_split

    split = factory_split(bundle.manifest)
    return split.held_out_texts if split is not None else _texts()


def _overhead_us(batch: int, rate: float, base: float) -> float:
    return (batch / rate - batch / base) * 1e6


async def run(quick: bool = False, model: Path | None = None) -> list[dict[str, Any]]:
    seconds = 0.2 if quick else 4.0
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmops-bench-edge-") as tmp_name:
        tmp = Path(tmp_name)
        key, pub = bench_key(tmp)
        bundle, described = _bundle(tmp, key, model)
        texts = _bench_texts(bundle)
        bare = _Bare(bundle, texts)
        max_tokens = bundle.manifest.preprocessing.max_tokens

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
                "overhead_us_per_call": round(_overhead_us(batch, rate, base), 1),
                "model": described,
                "max_tokens": max_tokens,
                "texts": len(texts),
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
            cases = [(1, 1), (1, 64), (32, 1), (32, 8)] if durable else [(1, 1), (32, 1)]
            async with EdgeNode(config) as node:
                await node.predict(texts[:32])  # warm-up
                for batch, conc in cases:
                    rate, base = await _paired(node.predict, bare, batch, conc, seconds)
                    results.append(result("python", batch, conc, durable, rate, base))
        http, rss = await _http_cases(tmp, bundle, pub, bare, [(1, 1), (1, 32), (32, 1), (32, 8)], seconds)
        for batch, conc, rate, base, bare_http in http:
            row = result("http", batch, conc, True, rate, base)
            row["bare_http"] = bare_http
            row["ratio_vs_bare_http"] = rate / bare_http
            row["bare_http_overhead_us_per_call"] = round(_overhead_us(batch, bare_http, base), 1)
            results.append(row)
        bare_rss = _bare_rss(bundle, texts)
        results.append(
            {
                "scenario": "edge node rss idle",
                "project": rss["idle_mb"],
                "baseline": bare_rss,
                "ratio": rss["idle_mb"] / bare_rss if bare_rss else float("nan"),
                "units": "MB",
                "goal_mb": 150,
                "after_load_mb": rss["after_load_mb"],
                "bare_http_endpoint_mb": rss["bare_http_mb"],
                "model": described,
                "baseline_note": "python + onnxruntime (+ tokenizers) of this model, after 2000 predictions",
            }
        )
        results.append(
            {
                "scenario": f"edge node rss peak b32x{max_tokens}",
                "project": rss["peak_mb"],
                "baseline": bare_rss,
                "ratio": rss["peak_mb"] / bare_rss if bare_rss else float("nan"),
                "units": "MB",
                "goal_mb": 250,
                "model": described,
                "note": f"VmHWM of the node after one request of 32 texts of {max_tokens}+ tokens",
            }
        )
    return results
