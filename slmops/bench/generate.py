"""``slmops bench generate --model DIR``: a generation model (e.g. SmolLM2 from ``slmops models
build --arch smollm2``) through the node against bare ``onnxruntime-genai``, same prompts,
same run.

Model: the generation bundle at ``--model`` (re-signed with a throwaway bench key, files
unchanged). Prompts: ``PROMPTS`` (short chat questions), greedy, at most ``max_new_tokens``.
baseline: ``_genbare.BareGenerator`` in this process — chat template, encode, prefill, one
token at a time with streaming detokenization, one intra-op thread (as the node).
project: ``Generations`` of an ``EdgeNode`` (Python API: ``open`` + ``Stream.next`` until the
end + ``finish``, telemetry on, durable answers: the answer waits for its telemetry's commit),
and ``POST /v1/generate`` with ``"stream": true`` to an ``slmops edge`` subprocess (server-sent
events read as they arrive). Each prompt runs bare, then through the node, alternately, so the
shared machine's load hits both alike.
Figures: decode tokens/s = (output tokens - 1) / (last token - first token), summed over the
answers; time to first token (ms) from the call (template and prefill included) to the first
token; RSS of the node subprocess (after warm-up) against a bare process that loaded the same
folder and answered two prompts; the prompt log-likelihood's cost: prefill with and without
the read of ``[prompt tokens × vocabulary]`` logits and the log-softmax (bare, interleaved),
and what it adds per request at the bundle's ``loglik_share``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.bench._genbare import BareGenerator, Timed, loglik_cost, rates
from slmops.bench._proc import bench_key, edge_command, status_mb, stop_process, wait_healthy
from slmops.shared.bundle import Bundle, resign_bundle

__all__ = ["PROMPTS", "run"]

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three fruits that are red.",
    "How do I boil an egg?",
    "Explain what a noun is in one sentence.",
    "Give me a short tip for sleeping better.",
    "What is two plus two?",
    "Describe a cat in a few words.",
)
#: A long prompt for the log-likelihood cost (about 300 tokens through the template).
_LONG = "Summarise this text. " + " ".join(["The quick brown fox jumps over the lazy dog."] * 30)


def _bundle(tmp: Path, key: Ed25519PrivateKey, model: Path) -> Bundle:
    shutil.copytree(model, tmp / "bundle")
    bundle = resign_bundle(tmp / "bundle", key)
    if bundle.manifest.task != "generation":
        raise ValueError(f"{model}: task {bundle.manifest.task!r}, not a generation bundle")
    return bundle


async def _python_api(node: Any, prompt: str, max_new_tokens: int) -> Timed:
    t0 = time.perf_counter()
    stream = await node.generations.open(prompt, {"max_new_tokens": max_new_tokens, "temperature": 0})
    first = 0.0
    try:
        while (chunk := await stream.next()) is not None:
            if chunk and not first:
                first = time.perf_counter()
        end = time.perf_counter()
        await stream.finish()
    finally:
        await stream.aclose()
    first = first or end
    return Timed(stream.prompt_tokens, stream.completion_tokens, (first - t0) * 1000, end - first)


async def _http(session: aiohttp.ClientSession, url: str, prompt: str, max_new_tokens: int) -> Timed:
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = end = 0.0
    usage: dict[str, int] = {}
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("text") and not first:
                first = time.perf_counter()
            if "usage" in event:
                end = time.perf_counter()
                usage = event["usage"]
    end = end or time.perf_counter()
    first = first or end
    return Timed(
        usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), (first - t0) * 1000, end - first
    )


def _pair_rows(
    case: str, ours: list[Timed], bare: list[Timed], extra: dict[str, Any]
) -> list[dict[str, Any]]:
    rate, ttft = rates(ours)
    base_rate, base_ttft = rates(bare)
    common = {"answers": len(ours), "output_tokens": sum(a.output_tokens for a in ours), **extra}
    return [
        {
            "scenario": f"generate {case} decode",
            "project": rate,
            "baseline": base_rate,
            "ratio": rate / base_rate if base_rate else float("nan"),
            "units": "tokens/s",
            "goal_ratio": 0.9,
            **common,
        },
        {
            "scenario": f"generate {case} time to first token",
            "project": ttft,
            "baseline": base_ttft,
            "ratio": ttft / base_ttft if base_ttft else float("nan"),
            "units": "ms",
            **common,
        },
    ]


async def _python_rows(tmp: Path, bundle: Bundle, pub: Path, bare: BareGenerator, rounds: int, n: int) -> Any:
    from slmops.edge.config import EdgeConfig
    from slmops.edge.node import EdgeNode

    config = EdgeConfig.build(
        {
            "fleet": "bench", "node": "gen1", "data_dir": tmp / "node", "model": bundle.path,
            "trust": [pub], "nats_url": "nats://127.0.0.1:1", "http": "off", "window": 1.0, "min_count": 1,
        }
    )  # fmt: skip
    ours: list[Timed] = []
    theirs: list[Timed] = []
    async with EdgeNode(config) as node:
        await _python_api(node, PROMPTS[0], 8)  # warm-up
        bare.answer(PROMPTS[0], 8)
        for _ in range(rounds):
            for prompt in PROMPTS:
                theirs.append(bare.answer(prompt, n))
                ours.append(await _python_api(node, prompt, n))
    return _pair_rows("python", ours, theirs, {"durable": True, "max_new_tokens": n})


async def _http_rows(
    tmp: Path, bundle: Bundle, pub: Path, bare: BareGenerator, rounds: int, n: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = edge_command(tmp / "http-node", "gen2", bundle.path, pub, port)
    base = f"http://127.0.0.1:{port}"
    log = tmp / "edge.log"
    ours: list[Timed] = []
    theirs: list[Timed] = []
    rss: dict[str, int] = {}
    with log.open("wb") as out:
        proc = await anyio.open_process(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_healthy(session, base, proc=proc, log=log, timeout=120)
                url = base + "/v1/generate"
                await _http(session, url, PROMPTS[0], 8)  # warm-up
                rss["after_warmup_mb"] = status_mb(proc.pid, "VmRSS")
                for _ in range(rounds):
                    for prompt in PROMPTS:
                        theirs.append(bare.answer(prompt, n))
                        ours.append(await _http(session, url, prompt, n))
                rss["after_run_mb"] = status_mb(proc.pid, "VmRSS")
                rss["peak_mb"] = status_mb(proc.pid, "VmHWM")
        finally:
            await stop_process(proc, 15, grace=20)
    return _pair_rows("http stream", ours, theirs, {"durable": True, "max_new_tokens": n}), rss


def _bare_rss(folder: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "slmops.bench._genbare", str(folder)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return int(done.stdout.strip().splitlines()[-1])


async def run(quick: bool = False, model: Path | None = None) -> list[dict[str, Any]]:
    """The figures of the module docstring, one dict per row. Raises ``RuntimeError`` without
    onnxruntime-genai, ``ValueError`` without ``model`` or when it is not a generation bundle."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise RuntimeError("bench generate needs onnxruntime-genai (pip install onnxruntime-genai)")
    if model is None:
        raise ValueError(
            "bench generate needs --model DIR, a generation bundle: slmops models build --arch smollm2 "
            "--out DIR --key KEY, then --model DIR/int4-embed"
        )
    rounds, n = (1, 16) if quick else (2, 64)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slmops-bench-generate-") as tmp_name:
        tmp = Path(tmp_name)
        key, pub = bench_key(tmp)
        bundle = _bundle(tmp, key, model)
        m = bundle.manifest
        described = {"model": f"{model} ({m.name} v{m.version} {m.variant})"}
        bare = BareGenerator(bundle.path)
        for row in await _python_rows(tmp, bundle, pub, bare, rounds, n):
            results.append({**row, **described})
        http, rss = await _http_rows(tmp, bundle, pub, bare, rounds, n)
        results.extend({**row, **described} for row in http)
        bare_mb = _bare_rss(bundle.path)
        results.append(
            {
                "scenario": "generate node rss",
                "project": rss["after_run_mb"],
                "baseline": bare_mb,
                "ratio": rss["after_run_mb"] / bare_mb if bare_mb else float("nan"),
                "units": "MB",
                "after_warmup_mb": rss["after_warmup_mb"],
                "peak_mb": rss["peak_mb"],
                "baseline_note": "python + onnxruntime-genai with this folder loaded, after two answers",
                **described,
            }
        )
        share = m.generation.loglik_share if m.generation is not None else 0.0
        for label, prompts in (("chat prompts", PROMPTS), ("a ~300-token prompt", (_LONG,))):
            cost = loglik_cost(bare, prompts, 1 if quick else 3)
            extra_ms = cost["prefill_loglik_ms"] - cost["prefill_ms"]
            results.append(
                {
                    "scenario": f"generate prompt log-likelihood, {label}",
                    "project": cost["prefill_loglik_ms"],
                    "baseline": cost["prefill_ms"],
                    "ratio": cost["prefill_loglik_ms"] / cost["prefill_ms"],
                    "units": "ms per prefill",
                    "prompt_tokens": round(cost["prompt_tokens"], 1),
                    "extra_ms_per_100_tokens": round(100 * extra_ms / cost["prompt_tokens"], 3),
                    "loglik_share": share,
                    "mean_extra_ms_per_request_at_share": round(share * extra_ms, 3),
                    **described,
                }
            )
    return results
