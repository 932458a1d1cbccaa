"""What ``slmops bench fleet`` reports, kept apart from ``bench.fleet`` (which imports the cloud)
so that ``slmops bench --help`` can say what each figure means without importing it."""

from __future__ import annotations

__all__ = ["DEFAULT_BACKLOG", "FIGURES", "figures_help"]

#: Buffered windows per reconnecting node in the storm by default: an hour offline (1,440 is a
#: day: at 1,000 nodes that is 144,000 aggregates to drain, minutes of a busy machine).
DEFAULT_BACKLOG = 60

#: Every figure ``run_fleet`` reports (and ``slmops bench fleet`` prints), in that order, with
#: what it means (``bench.fleet``'s docstring has the phases); times are wall-clock seconds.
FIGURES = {
    "nodes": "simulated nodes (--nodes)",
    "minutes": "steady windows per node (--minutes)",
    "period_s": "wall seconds per simulated 60 s window (--period)",
    "conns": "NATS connections the simulated nodes share in the steady phase",
    "steady_sent": "aggregates the nodes sent in the steady phase",
    "steady_applied": "of them, applied by the cloud (must equal steady_sent)",
    "steady_rate_per_s": "aggregates applied per second while the steady phase ran",
    "compression": "how much faster than real time the steady phase ran (60 / period_s)",
    "headroom_steady": "steady_rate_per_s / the real rate (one window per node per minute); a lower "
    "bound when kept_up (the schedule, not the cloud, set the pace)",
    "kept_up": "every window's lag below period_s",
    "lag_s_median": "a window's last PubAck -> the cloud has applied all sent so far (median)",
    "lag_s_max": "the same, the largest",
    "cloud_rss_bytes": "the cloud process's resident memory after the steady phase",
    "cloud_rss_per_node_bytes": "its growth since the cloud became active, per node",
    "snapshot_catch_up_s": "until every node's snapshot was written to KV for `fleet status`",
    "fleet_status_first_page_s": "`fleet status`: time to read its first page (100 nodes)",
    "fleet_status_first_page_rows": "rows on that page",
    "fleet_status_json_first_node_s": "`fleet status --json`: time to its first node",
    "fleet_status_json_all_s": "`fleet status --json`: time to every node",
    "fleet_status_rows": "nodes `fleet status --json` gave",
    "fleet_status_read_all_at_once_s": "the old read of every snapshot before printing (before issue 18)",
    "sqlite_bytes": "the cloud's SQLite state on disk",
    "sqlite_bytes_per_node": "sqlite_bytes / nodes",
    "drift_rounds": "drift detector rounds closed during the run",
    "drift_round_s_median": "time to close one round (fleet pooling, BH correction, events), median",
    "drift_round_s_max": "the same, the largest",
    "storm_nodes": "nodes that reconnect at once (10%), each with --backlog buffered windows",
    "storm_connections": "their NATS connections (one each)",
    "storm_connect_s": "time until all of them were connected",
    "storm_backlog_windows": "buffered windows per reconnecting node (--backlog)",
    "storm_aggregates": "storm_nodes x storm_backlog_windows",
    "storm_publish_s": "time the nodes took to publish their backlog (PubAcks back)",
    "storm_resent_for_want_of_puback": "messages sent again after no PubAck in 20 s (deduplicated)",
    "storm_drain_s": "first connect -> the cloud has applied every storm aggregate",
    "storm_drain_rate_per_s": "storm_aggregates / storm_drain_s",
    "storm_drain_vs_steady_rate": "storm_drain_rate_per_s / the real steady rate (one window per node "
    "per minute)",
    "storm_drift_rounds": "drift rounds closed during the drain (rounds are keyed by window time)",
    "storm_events": "events (drift and ops) the cloud made during the drain",
    "rollout_assigned_all_s": "--rollout (version 2 to every node, one 100% stage): start -> every "
    "node assigned (phase installing; the controller steps every 1 s)",
    "rollout_stage_installed_s": "start -> every node reports version 2 (phase soaking; the simulated "
    "nodes fetch no bundle)",
    "rollout_nodes": "nodes in the rollout's state",
    "rollout_header_bytes": "the rollout's own KV value (the header)",
    "rollout_parts": "KV keys holding its nodes (at most 500 each)",
    "rollout_parts_bytes": "their bytes together",
    "rollout_single_value_bytes_old_format": "the one value the state was before issue 18 (KV's limit: "
    "1 MiB)",
    "rollout_stage_event_bytes": "the stage_started event's size (the stream's limit: 256 KiB)",
    "rollout_stage_event_nodes_listed": "node names that event lists (it counts them all)",
    "rollout_abort_restored_all_s": "abort -> every node's own assignment key restored",
    "cloud_rss_after_storm_bytes": "the cloud's resident memory after the storm",
    "exactly_once": "every node's count in the cloud equals what it sent (exit 1 if not)",
    "duplicates_dropped": "messages the cloud dropped as already counted",
    "bare_publish_rate_per_s": "baseline: bare JetStream publishes per second, the same messages",
    "bare_fetch_ack_rate_per_s": "baseline: a bare pull consumer's fetch + ack per second",
    "load_before": "the machine's load average (1, 5, 15 min) before the run",
    "load_after": "the same after it",
}


def figures_help(width: int = 100) -> str:
    """``FIGURES`` as one block of help text (click's ``\\b`` keeps it as written): each
    figure's name, then its meaning wrapped to ``width`` columns."""
    import textwrap

    name_w = max(map(len, FIGURES)) + 2
    lines = ["\b", "fleet figures (wall-clock seconds; nothing passes or fails on a time):"]
    for name, meaning in FIGURES.items():
        parts = textwrap.wrap(meaning, width - name_w - 4)  # click indents the epilog by 2
        lines.append(f"  {name:<{name_w}}{parts[0]}")
        lines.extend(" " * (name_w + 2) + part for part in parts[1:])
    return "\n".join(lines)
