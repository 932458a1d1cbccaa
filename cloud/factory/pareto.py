"""The report of ``slmops models optimize``: the Pareto set of the candidates, ``report.json``,
``report.md`` (one table) and ``report.png`` (accuracy against latency and against size)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["pareto_names", "write_markdown", "write_plot"]


def pareto_names(rows: Sequence[Mapping[str, Any]], profile: str) -> set[str]:
    """Names of the measured candidates no other beats on all of accuracy (higher), latency
    ratio under ``profile`` (lower) and bytes on disk (lower), being strictly better on one."""

    def point(r: Mapping[str, Any]) -> tuple[float, float, float]:
        return (-float(r["accuracy"]), float(r["profiles"][profile]["latency_ratio"]), float(r["size_bytes"]))

    measured = [r for r in rows if r["status"] == "ok" and profile in r["profiles"]]
    front = set()
    for r in measured:
        a = point(r)
        dominated = any(
            all(x <= y for x, y in zip(point(o), a, strict=True)) and point(o) != a
            for o in measured
            if o is not r
        )
        if not dominated:
            front.add(str(r["name"]))
    return front


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def write_markdown(path: Path, doc: Mapping[str, Any]) -> None:
    """``report.md``: the teacher line, the floor, one row per candidate (per profile: p95
    latency ratio to L6 fp32 and whether every budget held), and the choice per profile."""
    profiles: list[str] = list(doc["profiles"])
    chosen: dict[str, str | None] = doc["chosen"]
    t = doc["teacher"]
    lines = [
        f"# models optimize: {t['name']} v{t['version']} ({t['bundle']})",
        "",
        f"Teacher (L6 fp32) held-out accuracy {t['accuracy']:.4f} on {t['held_out']} texts "
        f"(seed {t['seed']}); "
        f"accuracy floor {doc['floor']:.4f}. Latency: p95 at batch 1 as a ratio to the teacher's p95 in the "
        "same pinned process (profile's cores and threads); absolute ms are in report.json. "
        "Δ acc is paired (same texts): +wins/−losses against the teacher. "
        "`*` = on the Pareto front (accuracy, latency ratio, size) for that profile; "
        "`fit` = smoke tests and every budget held; **bold** = chosen.",
        "",
    ]
    head = ["candidate", "chain", "acc", "Δ acc", "+/−", "agree", "max gap", "ECE", "MB", "gz MB"]
    head += (
        [f"{p} ratio" for p in profiles] + [f"{p} RSS MB" for p in profiles] + [f"{p} fit" for p in profiles]
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fronts = {p: pareto_names(doc["candidates"], p) for p in profiles}
    for r in doc["candidates"]:
        name = r["name"]
        if r["status"] != "ok":
            lines.append(
                f"| {name} | {' → '.join(r['chain'])} | {r['status']}: {r['note']} |" + " |" * (len(head) - 3)
            )
            continue
        picked = [p for p in profiles if chosen.get(p) == name]
        label = f"**{name}** ({', '.join(picked)})" if picked else name
        cells = [
            label,
            " → ".join(r["chain"]) or "(teacher)",
            f"{r['accuracy']:.4f}" + (" (under floor)" if r["under_floor"] else ""),
            f"{r['accuracy'] - t['accuracy']:+.4f}",
            f"+{r['wins']}/−{r['losses']}",
            f"{r['agreement']:.3f}",
            f"{r['max_prob_gap']:.3f}",
            f"{r['ece']:.3f}",
            _mb(r["size_bytes"]),
            _mb(r["gzip_bytes"]),
        ]
        for p in profiles:
            lab = r["profiles"].get(p)
            cells.append(
                "" if lab is None else f"{lab['latency_ratio']:.2f}{'*' if name in fronts[p] else ''}"
            )
        for p in profiles:
            lab = r["profiles"].get(p)
            cells.append("" if lab is None else f"{lab['peak_rss_mb']:.0f}")
        for p in profiles:
            lab = r["profiles"].get(p)
            cells.append("" if lab is None else ("fit" if lab["ok"] else "no: " + "; ".join(
                f.split(":")[0] for f in lab["failures"])))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Chosen per profile", ""]
    for p in profiles:
        budget = doc["profiles"][p]
        got = chosen.get(p)
        lines.append(
            f"- **{p}** (latency ≤ {budget['latency_factor']}× L6 fp32, "
            f"RSS ≤ {budget['model_memory_mb']} MB, "
            f"disk ≤ {budget['model_disk_mb']} MB): "
            + (
                f"`{got}` → {doc['variants'].get(p, '')}"
                if got
                else "nothing fits its budgets above the floor"
            )
        )
    notes = [f"- {r['name']}: {r['note']}" for r in doc["candidates"] if r["note"]]
    if notes:
        lines += ["", "## Notes", "", *notes]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, doc: Mapping[str, Any]) -> None:
    """``report.png``: held-out accuracy against the latency ratio (one marker shape per
    profile) and against bytes on disk; the chosen candidate of each profile ringed and named."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["candidates"] if r["status"] == "ok"]
    profiles = list(doc["profiles"])
    markers = dict(zip(profiles, "os^Dv<>", strict=False))
    chosen: dict[str, str | None] = doc["chosen"]
    fig, (ax_lat, ax_size) = plt.subplots(1, 2, figsize=(13, 5.5))
    for p in profiles:
        xs = [r["profiles"][p]["latency_ratio"] for r in rows if p in r["profiles"]]
        ys = [r["accuracy"] for r in rows if p in r["profiles"]]
        ax_lat.scatter(
            xs,
            ys,
            marker=markers[p],
            label=f"{p} (budget {doc['profiles'][p]['latency_factor']}×)",
            alpha=0.7,
        )
        ax_lat.axvline(doc["profiles"][p]["latency_factor"], linestyle=":", linewidth=0.8, color="grey")
        pick = next((r for r in rows if r["name"] == chosen.get(p)), None)
        if pick is not None and p in pick["profiles"]:
            x, y = pick["profiles"][p]["latency_ratio"], pick["accuracy"]
            ax_lat.scatter([x], [y], s=260, facecolors="none", edgecolors="red", linewidths=2)
            ax_lat.annotate(
                f"{p}: {pick['name']}", (x, y), textcoords="offset points", xytext=(6, -14), fontsize=8
            )
    for r in rows:
        ax_size.scatter([r["size_bytes"] / 1e6], [r["accuracy"]], color="tab:blue")
        ax_size.annotate(r["name"], (r["size_bytes"] / 1e6, r["accuracy"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=7)  # fmt: skip
        picked = [p for p in profiles if chosen.get(p) == r["name"]]
        if picked:
            at = (r["size_bytes"] / 1e6, r["accuracy"])
            ax_size.scatter([at[0]], [at[1]], s=260, facecolors="none", edgecolors="red", linewidths=2)
            ax_size.annotate(
                ", ".join(picked), at, textcoords="offset points", xytext=(4, -12), fontsize=8, color="red"
            )
    floor = doc["floor"]
    for ax in (ax_lat, ax_size):
        ax.axhline(floor, color="red", linestyle="--", linewidth=0.8, label="accuracy floor")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("p95 latency, batch 1, / L6 fp32 p95 (same run)")
    ax_size.set_xscale("log")
    ax_size.set_xlabel("bundle size on disk (MB)")
    ax_lat.legend(fontsize=8)
    fig.suptitle(f"models optimize: {doc['teacher']['name']} v{doc['teacher']['version']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=1) + "\n")
