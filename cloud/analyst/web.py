"""The cloud's read-only HTTP face: ``/metrics`` (Prometheus), the analyst's web console
(``/``) and the JSON API it reads (``/api/*``, described by ``/api/openapi.json``).

Served by aiohttp in the service's own event loop (``serve_http``), on standbys too (their
API answers with what a standby knows: nothing active, ``active: false``). Off by default;
``CloudConfig.http`` = ``HOST:PORT``. A non-loopback address needs ``http_token``
(``CloudConfig`` refuses one without), and with a token every request must carry it
(``Authorization: Bearer <token>`` or ``?token=<token>``, which the page passes on). The
page loads nothing from elsewhere: its script is a static file here, plots are SVG rendered
by the server (``plots.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog
from aiohttp import web
from anyio.abc import TaskStatus

from slmops.cloud.analyst.address import parse_http
from slmops.cloud.analyst.metrics import (
    CONTENT_TYPE,
    MetricsRefresher,
    exposition,
    registry_for,
)
from slmops.cloud.drift.labelshift import confusion_matrix, em_priors
from slmops.cloud.drift.report import _NAMES
from slmops.cloud.drift.stats import noise_tv, total_variation
from slmops.cloud.ingest.presence import is_online
from slmops.shared.httpauth import same_token
from slmops.shared.messages import DriftEvent, ModelManifest, decode_each
from slmops.shared.vocabulary import DriftKind, DriftSignal

if TYPE_CHECKING:
    from slmops.cloud.analyst.view import ServiceView
    from slmops.cloud.drift.units import Group, RoundRecord

__all__ = ["OPENAPI", "build_app", "serve_http"]

log = structlog.get_logger(__name__)

_LINEAGE_DOC = (
    "{lineage: [{model, from_version, to_version, kind, fleet, event, rollout, outcome, reason, time}]}"
)
#: Rounds a plot or series reads at most (the newest).
SERIES_ROUNDS = 500


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat() if t is not None else None


class _Console:
    def __init__(self, svc: ServiceView, refresher: MetricsRefresher, token: str | None) -> None:
        self.svc = svc
        self.refresher = refresher
        self.token = token
        self.registry = registry_for(svc, refresher)

    # -- plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is not None:
            given = request.query.get("token", "")
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header[7:]
            if not same_token(given, self.token):
                return _json({"error": "missing or wrong bearer token"}, 401)
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException:
            raise
        except (ValueError, KeyError) as exc:
            return _json({"error": str(exc)}, 400)
        response.headers["Cache-Control"] = "no-store"
        return response

    def _group(self, request: web.Request) -> Group:
        det = self.svc.detector
        key = request.query.get("group", "")
        if det is None or key not in det.groups:
            raise web.HTTPNotFound(text=f"no drift group {key!r} (is this the active instance?)")
        return det.groups[key]

    async def _rounds(self, g: Group) -> list[RoundRecord]:
        store = self.svc.store
        if store is None:
            return []
        return await store.rounds(g.key, limit=SERIES_ROUNDS)

    async def _events(self, fleet: str | None) -> list[DriftEvent]:
        store = self.svc.store
        if store is None:
            return []
        return decode_each(await store.events(fleet, limit=1000), DriftEvent)

    # -- handlers -------------------------------------------------------------------------------

    async def index(self, _request: web.Request) -> web.Response:
        html = resources.files("slmops.cloud.analyst").joinpath("static/index.html").read_text("utf-8")
        return web.Response(text=html, content_type="text/html")

    async def script(self, _request: web.Request) -> web.Response:
        js = resources.files("slmops.cloud.analyst").joinpath("static/console.js").read_text("utf-8")
        return web.Response(text=js, content_type="application/javascript")

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=exposition(self.registry), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, _request: web.Request) -> web.Response:
        return _json(OPENAPI)

    async def fleet(self, request: web.Request) -> web.Response:
        want = request.query.get("fleet")
        now = datetime.now(UTC)
        events = await self._events(want)
        skewed = {
            (e.fleet, e.model.name, e.model.version, e.model.variant): e
            for e in events
            if e.kind == DriftKind.SKEW
        }
        nodes = []
        for (fleet, node), n in sorted(self.refresher.shown()):
            if want and fleet != want:
                continue
            m = n.model
            skew = skewed.get((fleet, m.name, m.version, m.variant)) if m is not None else None
            nodes.append(
                {
                    "fleet": fleet,
                    "node": node,
                    "online": is_online(n.last_seen, now),
                    "model": m.name if m else None,
                    "version": m.version if m else None,
                    "variant": m.variant if m else None,
                    "last_seen": _iso(n.last_seen),
                    "last_window_end": _iso(n.last_window_end),
                    "outbox_depth": n.outbox_depth,
                    "inferences": n.inferences,
                    "windows": n.windows,
                    "missing_seqs": n.seqs.missing,
                    "duplicates": n.duplicates,
                    "loss_receipts": {"inferences": n.dropped_inferences, "aggregates": n.dropped_aggregates},
                    "skew": skew.summary if skew is not None else None,
                }
            )
        return _json({"active": self.svc.active, "holder": self.svc.holder, "nodes": nodes})

    async def groups(self, request: web.Request) -> web.Response:
        det = self.svc.detector
        want = request.query.get("fleet")
        out = []
        for g in det.groups.values() if det is not None else []:
            if want and g.fleet != want:
                continue
            out.append(
                {
                    "group": g.key,
                    "fleet": g.fleet,
                    "model": g.model.name,
                    "version": g.model.version,
                    "variant": g.model.variant,
                    "rounds": g.rounds,
                    "baseline": f"baseline:{g.baseline_id}" if g.baseline_id else None,
                    "references": {
                        s: {"source": r.source, "start": _iso(r.start), "end": _iso(r.end)}
                        for s, r in g.refs.items()
                    },
                    "manifest_signals": sorted(g.manifest_refs),
                    "open": sorted(s for s, us in g.fleet_sig.items() if us.open),
                }
            )
        return _json({"groups": out})

    async def events(self, request: web.Request) -> web.Response:
        events = await self._events(request.query.get("fleet"))
        return _json({"events": [msgspec.to_builtins(e) for e in events]})

    async def _series(self, g: Group, signal: str) -> dict[str, Any]:
        rounds = await self._rounds(g)
        ref = g.refs.get(signal)
        mref = g.manifest_refs.get(signal)
        times, vs_base, vs_manifest, counts = [], [], [], []
        for r in rounds:
            acc = r.signals.get(signal)
            if acc is None or acc.n <= 0 or r.end is None:
                continue
            times.append(r.end)
            counts.append(acc.n)

            def effect(
                probs: list[float], n_ref: float, c: list[float] = acc.counts, n: float = acc.n
            ) -> float | None:
                if len(probs) != len(c):
                    return None
                return round(max(0.0, total_variation(c, probs) - noise_tv(probs, n, n_ref)), 5)

            vs_base.append(effect(ref.probs, ref.n_ref) if ref is not None else None)
            vs_manifest.append(effect(mref.probs, mref.n_ref) if mref is not None else None)
        return {
            "group": g.key,
            "signal": signal,
            "name": _NAMES.get(signal, signal),
            "reference": ref.source if ref is not None else None,
            "reference_start": _iso(ref.start) if ref is not None else None,
            "reference_end": _iso(ref.end) if ref is not None else None,
            "times": [_iso(t) for t in times],
            "inferences": counts,
            "effect_vs_baseline": vs_base,
            "effect_vs_manifest": vs_manifest,
            "_times": times,
        }

    async def drift(self, request: web.Request) -> web.Response:
        g = self._group(request)
        signal = request.query.get("signal", "class_prior")
        series = await self._series(g, signal)
        series.pop("_times")
        if signal == DriftSignal.CLASS_PRIOR and g.labels:
            series["priors"] = await self._priors(g)
        return _json(series)

    async def _priors(self, g: Group) -> list[dict[str, float] | None]:
        import numpy as np

        matrix = (
            np.asarray(g.joint) if g.joint is not None else confusion_matrix(g.labels, None, g.ref_accuracy)
        )
        out: list[dict[str, float] | None] = []
        for r in await self._rounds(g):
            acc = r.signals.get("class_prior")
            if acc is None or acc.n <= 0 or len(acc.counts) != len(g.labels):
                out.append(None)
                continue
            p = em_priors(acc.counts, matrix)
            out.append({label: round(float(x), 4) for label, x in zip(g.labels, p, strict=True)})
        return out

    async def plot(self, request: web.Request) -> web.Response:
        from slmops.cloud.analyst.plots import signal_svg

        g = self._group(request)
        signal = request.query.get("signal", "class_prior")
        s = await self._series(g, signal)
        marks = []
        for e in await self._events(g.fleet):
            if e.model != g.model or e.scope != "fleet":
                continue
            # Marked at the traffic's time (the windows), the plot's own axis.
            if e.kind == DriftKind.BASELINE:
                marks.append((e.reference_end or e.window_end, e.reference))
            elif e.signal == signal and e.state == "opened":
                what = f"opened {e.kind}" if e.kind != DriftKind.DRIFT else f"opened ep{e.id.split('.')[-2]}"
                marks.append((e.window_end, what))
        series = {f"vs {s['reference'] or 'baseline'}": s["effect_vs_baseline"]}
        if any(v is not None for v in s["effect_vs_manifest"]):
            series["vs manifest"] = s["effect_vs_manifest"]
        svg = await anyio.to_thread.run_sync(
            lambda: signal_svg(
                f"{g.key} · {s['name']}: effect (TV net of noise)",
                s["_times"],
                series,
                events=[m for m in marks if s["_times"] and min(s["_times"]) <= m[0] <= max(s["_times"])],
                threshold=self.svc.config.drift.min_effect,
                ylabel="effect",
            )
        )
        return web.Response(text=svg, content_type="image/svg+xml")

    async def rollouts(self, _request: web.Request) -> web.Response:
        from slmops.cloud.rollout import RolloutStore

        if not self.svc.active:
            return _json({"rollouts": []})
        js = self.svc._link.js
        with anyio.fail_after(5):
            states = await RolloutStore(js).all()
        out = []
        for state, _rev in states:
            out.append(
                {
                    "id": state.id,
                    "fleet": state.fleet,
                    "model": state.model,
                    "version": state.version,
                    "previous_version": state.previous_version,
                    "status": state.status,
                    "phase": state.phase,
                    "stage": state.stage,
                    "stages": list(state.config.stages),
                    "nodes": len(state.nodes),
                    "failures": state.failures,
                    "reason": state.reason,
                    "gates": state.gates,
                }
            )
        return _json({"rollouts": out})

    async def _manifests(self) -> list[ModelManifest]:
        """The registry's manifests (undecodable values skipped). Raises what the KV read
        raises (no bucket yet, a stalled watch)."""
        from slmops.shared.kv import kv_values
        from slmops.shared.names import MODELS_MANIFEST_BUCKET

        raw = await kv_values(self.svc._link.js, MODELS_MANIFEST_BUCKET)
        return decode_each(raw.values(), ModelManifest)

    async def lineage(self, _request: web.Request) -> web.Response:
        from slmops.cloud.analyst.lineage import lineage

        if not self.svc.active:
            return _json({"lineage": []})
        try:
            manifests = await self._manifests()
        except Exception as exc:  # no bucket yet: rollouts may still say something
            log.debug("lineage_registry_unread", error=repr(exc)[:200])
            manifests = []
        return _json({"lineage": await lineage(self.svc._link.js, manifests)})

    async def versions(self, _request: web.Request) -> web.Response:
        if not self.svc.active:
            return _json({"versions": []})
        try:
            manifests = await self._manifests()
        except Exception as exc:  # no bucket yet, a stalled watch: say so, do not fail the page
            return _json({"versions": [], "error": f"registry unreadable: {type(exc).__name__}"})
        out = []
        for m in manifests:
            out.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "variant": m.variant,
                    "parent_version": m.parent_version,
                    "created": _iso(m.created),
                    "notes": m.notes,
                    "task": m.task,
                    "labels": m.labels,
                    "accuracy": m.reference.accuracy if m.reference is not None else None,
                }
            )
        out.sort(key=lambda v: (v["name"], v["version"], v["variant"]))
        return _json({"versions": out})


def build_app(svc: ServiceView, refresher: MetricsRefresher, token: str | None) -> web.Application:
    c = _Console(svc, refresher, token)
    app = web.Application(middlewares=[c.auth])
    app.router.add_get("/", c.index)
    app.router.add_get("/console.js", c.script)
    app.router.add_get("/metrics", c.metrics)
    app.router.add_get("/api/openapi.json", c.openapi)
    app.router.add_get("/api/fleet", c.fleet)
    app.router.add_get("/api/groups", c.groups)
    app.router.add_get("/api/events", c.events)
    app.router.add_get("/api/drift", c.drift)
    app.router.add_get("/api/plot.svg", c.plot)
    app.router.add_get("/api/rollouts", c.rollouts)
    app.router.add_get("/api/versions", c.versions)
    app.router.add_get("/api/lineage", c.lineage)
    return app


async def serve_http(
    svc: ServiceView, refresher: MetricsRefresher, *, task_status: TaskStatus[tuple[str, int]]
) -> None:
    """Serve ``build_app`` on ``svc.config.http`` until cancelled; reports the bound
    (host, port) (port 0 picks one). ``OSError`` naming the address when it cannot bind."""
    cfg = svc.config
    if cfg.http is None:
        raise ValueError("serve_http needs config.http (host:port to listen on), got None")
    host, port = parse_http(cfg.http)
    runner = web.AppRunner(build_app(svc, refresher, cfg.http_token), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve the console on {cfg.http} (http): {exc.strerror}"
            ) from exc
        bound = runner.addresses[0] if runner.addresses else (host, port)
        log.info("cloud_http", address=f"{bound[0]}:{bound[1]}", token=cfg.http_token is not None)
        task_status.started((str(bound[0]), int(bound[1])))
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


_Q = {"in": "query", "schema": {"type": "string"}}
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "slmops cloud console API", "version": "1", "description": "Read-only."},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
    "paths": {
        "/api/fleet": {"get": {"summary": "Nodes: online, model, last window, outbox, counts, gaps, "
                               "loss receipts, skew", "parameters": [{"name": "fleet", **_Q}],
                               "responses": {"200": {"description": "{active, holder, nodes: [...]}"}}}},
        "/api/groups": {"get": {"summary": "Drift groups (fleet, model, version, variant), their references "
                                "and baseline", "parameters": [{"name": "fleet", **_Q}],
                                "responses": {"200": {"description": "{groups: [...]}"}}}},
        "/api/events": {"get": {"summary": "Drift, skew and baseline events (newest 1000)",
                                "parameters": [{"name": "fleet", **_Q}],
                                "responses": {"200": {"description": "{events: [DriftEvent]}"}}}},
        "/api/drift": {"get": {"summary": "One signal over time: effect against the baseline and the "
                               "manifest per fleet round; estimated priors for class_prior",
                               "parameters": [{"name": "group", "required": True, **_Q},
                                              {"name": "signal", **_Q}],
                               "responses": {"200": {"description": "series"},
                                             "404": {"description": "no group"}}}},
        "/api/plot.svg": {"get": {"summary": "The same series as an SVG plot, events marked",
                                  "parameters": [{"name": "group", "required": True, **_Q},
                                                 {"name": "signal", **_Q}],
                                  "responses": {"200": {"description": "image/svg+xml"}}}},
        "/api/rollouts": {"get": {"summary": "Every rollout: stages, status, gates",
                                  "responses": {"200": {"description": "{rollouts: [...]}"}}}},
        "/api/versions": {"get": {"summary": "The registry: versions, variants, lineage (parent_version)",
                                  "responses": {"200": {"description": "{versions: [...]}"}}}},
        "/api/lineage": {"get": {"summary": "Version lineage: recalibrations (with the drift event that "
                                            "caused them), rollouts per fleet and their outcome, rollbacks",
                                 "responses": {"200": {"description": _LINEAGE_DOC}}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition",
                             "responses": {"200": {"description": "text/plain"}}}},
    },
}  # fmt: skip
