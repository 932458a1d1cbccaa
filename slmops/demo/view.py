"""The demo's live view: a rich table per node, the current phase and the events so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from slmops.demo.fleet import Fleet
    from slmops.demo.state import Story

__all__ = ["phase_line", "render"]


def phase_line(story: Story) -> str:
    """The one line printed as each phase starts when the output is not a terminal."""
    return f"[{story.elapsed():6.1f}s] {story.number}/{story.total} {story.phase}"


def render(story: Story, fleet: Fleet | None) -> Group:
    head = Text()
    for number, title, seconds in story.done[-7:]:
        head.append(f"  {number}/{story.total} {title} ({seconds:.1f}s)\n", style="dim")
    label = f"{story.number}/{story.total} " if story.number else ""
    head.append(f"[{story.elapsed():5.1f}s] {label}{story.phase}", style="bold cyan")
    table = Table(expand=False)
    for col in ("node", "link", "model", "served", "outbox", "buffer KiB", "last error"):
        table.add_column(col, justify="right" if col in ("served", "outbox", "buffer KiB") else "left")
    for n in fleet.nodes if fleet else []:
        h = n.health
        model = h.get("model") or {}
        link = str(h.get("link", "?"))
        style = {"online": "green", "offline": "red"}.get(link, "yellow")
        table.add_row(
            n.name,
            Text(link, style=style),
            f"v{model.get('version')} {model.get('variant', '')}" if model else "-",
            str(n.served),
            str(h.get("outbox", "-")),
            f"{int(h.get('buffer_bytes', 0)) // 1024}",
            str(h.get("last_error") or "")[:40],
        )
    events = Text()
    for e in story.drift_events[-4:]:
        scope = e.node if e.scope == "node" else "fleet"
        events.append(
            f"drift {e.state:<8} {e.signal:<12} {scope:<8} {e.statistic}={e.value:.3g} "
            f"effect={e.effect_size:.3f}\n",
            style="magenta",
        )
    for r in story.rollout_events[-3:]:
        events.append(
            f"rollout {r.state:<12} v{r.version} stage {r.stage} ({r.percent}%) {r.reason}\n", style="blue"
        )
    sent = Text(f"telemetry sent: {story.messages_sent} aggregates, {story.bytes_sent:,} bytes")
    return Group(head, table, sent, events)
