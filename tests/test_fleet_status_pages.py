"""``slmops fleet status`` at fleet scale (issue 18): the table shows one page, read from the
key list plus that page's snapshots; ``--json`` writes every node as one JSON document,
streamed; forgotten nodes stay hidden in both."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

import anyio
import msgspec
import pytest
from click.testing import CliRunner
from nats.js import JetStreamContext

from slmops.cli import main
from slmops.cloud.ingest.overview import FORGOTTEN_PREFIX, Forgotten
from slmops.cloud.ingest.snapshot import NodeSnapshot, ensure_fleet_bucket
from slmops.shared.server import EmbeddedServer


def _snapshot(fleet: str, node: str, inferences: int) -> NodeSnapshot:
    return NodeSnapshot(
        node=node, fleet=fleet, model="m", model_version=1, variant="fp32",
        last_seen=datetime.now(UTC), last_window_end=None, inferences=inferences, errors=0,
        windows=1, aggregates=1, duplicates=0, late=0, seq_high=1, missing_seqs=0,
        missing_ranges=[], gaps=0, abandoned_seqs=0, dropped_inferences=0, dropped_aggregates=0,
        outbox_depth=0, served=0, status_event=None, status_time=None, last_error=None,
        device=None, arch=None, cores=None, memory_mb=None,
    )  # fmt: skip


@pytest.mark.anyio
async def test_fleet_status_pages_the_table_and_streams_every_node_as_json(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str
) -> None:
    kv = await ensure_fleet_bucket(js)
    for i in range(7):
        await kv.put(f"{fleet}.n{i}", msgspec.json.encode(_snapshot(fleet, f"n{i}", 100 + i)))
    gone = Forgotten(fleet=fleet, node="n5", last_seen=datetime(2100, 1, 1, tzinfo=UTC), at=datetime.now(UTC))
    await kv.put(f"{FORGOTTEN_PREFIX}.{fleet}.n5", msgspec.json.encode(gone))
    await kv.delete(f"{fleet}.n6")  # listed by the stream until compacted: must not show

    def cli(*args: str) -> str:
        result = CliRunner().invoke(
            main, ["fleet", "status", "--nats", nats_server.url, "--fleet", fleet, *args]
        )
        assert result.exit_code == 0, result.output
        return result.output

    page2 = await anyio.to_thread.run_sync(lambda: cli("--page", "2", "--page-size", "2"))
    rows = [line.split()[1] for line in page2.splitlines() if line.startswith(fleet)]
    assert rows == ["n2", "n3"]
    assert "(nodes 3-4 of 7: --page 3 for more, --json for all)" in page2
    past = await anyio.to_thread.run_sync(
        lambda: CliRunner().invoke(
            main, ["fleet", "status", "--nats", nats_server.url, "--fleet", fleet, "--page", "99"]
        )
    )
    assert past.exit_code == 1, past.output  # it printed the header alone and exited 0
    assert past.output.strip() == "Error: page 99 is past the last page (1 page at --page-size 100)"
    doc = json.loads(await anyio.to_thread.run_sync(lambda: cli("--json")))
    assert sorted(n["node"] for n in doc["nodes"]) == ["n0", "n1", "n2", "n3", "n4"]
    assert {n["node"]: n["inferences"] for n in doc["nodes"]}["n4"] == 104
    assert doc["clock"] == "server"
    assert all(n["online"] for n in doc["nodes"])


@pytest.mark.anyio
async def test_fleet_status_json_into_a_closed_pipe_exits_quietly(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str
) -> None:
    """``fleet status --json | head -1``: the reader leaves after one line; the command must
    stop without a traceback (it printed the watch's failed close and "Broken pipe")."""
    kv = await ensure_fleet_bucket(js)
    for i in range(200):  # ~160 kB of JSON: more than a pipe holds, so the writer meets the close
        await kv.put(f"{fleet}.n{i}", msgspec.json.encode(_snapshot(fleet, f"n{i}", i)))

    def head_1() -> tuple[str, int, str]:
        cmd = [sys.executable, "-m", "slmops.cli", "fleet", "status", "--json"]
        with subprocess.Popen(
            [*cmd, "--nats", nats_server.url, "--fleet", fleet],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as proc:  # fmt: skip
            assert proc.stdout is not None
            assert proc.stderr is not None
            first = proc.stdout.readline()
            proc.stdout.close()
            err = proc.stderr.read()
            return first, proc.wait(timeout=60), err

    first, code, err = await anyio.to_thread.run_sync(head_1)
    assert first.startswith('{"server_time"')
    for word in ("Traceback", "Broken pipe", "Error"):
        assert word not in err, err
    assert code == 1  # click's exit on EPIPE, quiet
