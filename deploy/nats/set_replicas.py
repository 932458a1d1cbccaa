#!/usr/bin/env python3
"""Set the replica count of every slmops stream, KV bucket and object store on a cluster.

    SLMOPS_NATS_URL=nats://cloud:<password>@n1:4222 python deploy/nats/set_replicas.py 3

``slmops cloud`` creates its resources with one replica (right for a single server). On a
3-node cluster run this once, as the ``cloud`` user, after the cloud's first start (or after
adding buckets): each stream named ``SLMOPS_*``, ``KV_slmops_*`` or ``OBJ_slmops_*`` is updated
to the given replica count; JetStream copies the data to the new replicas in the background.
Streams already at that count are left alone; nothing else is changed or deleted. Run it in the
slmops environment (it uses nats-py and slmops' URL handling). ``--dry-run`` only prints.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import nats.errors
from nats.js import api as js_api
from nats.js import errors as js_errors

from slmops.shared.connect import connect_once
from slmops.shared.errors import SlmopsError

PREFIXES = ("SLMOPS_", "KV_slmops_", "OBJ_slmops_")


async def set_replicas(url: str, replicas: int, *, dry_run: bool = False) -> list[tuple[str, int, int]]:
    """Update the slmops streams to ``replicas``; return ``(stream, before, after)`` for each."""
    nc = await connect_once(url, timeout=10.0)
    try:
        js = nc.jetstream(timeout=10.0)
        infos = await js.streams_info()
        done = []
        for info in sorted(infos, key=lambda i: i.config.name or ""):
            config = info.config
            name = config.name or ""
            if not name.startswith(PREFIXES):
                continue
            before = config.num_replicas or 1
            if before != replicas and not dry_run:
                await js.update_stream(_with_replicas(config, replicas))
            done.append((name, before, before if dry_run else replicas))
        return done
    finally:
        await nc.close()


def _with_replicas(config: js_api.StreamConfig, replicas: int) -> js_api.StreamConfig:
    return config.evolve(num_replicas=replicas)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Set the replica count of every slmops stream and bucket.")
    parser.add_argument("replicas", type=int, help="replicas per stream: 1, 3 or 5 (at most the servers)")
    parser.add_argument(
        "--nats",
        default=os.environ.get("SLMOPS_NATS_URL", "nats://127.0.0.1:4222"),
        help="NATS URL with the cloud user's credentials (default: $SLMOPS_NATS_URL)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only print what would change")
    args = parser.parse_args(argv)
    if args.replicas not in (1, 3, 5):
        parser.error(f"replicas must be 1, 3 or 5, got {args.replicas!r}")
    try:
        done = asyncio.run(set_replicas(args.nats, args.replicas, dry_run=args.dry_run))
    except (OSError, nats.errors.Error, js_errors.Error, SlmopsError, ValueError) as exc:
        print(f"set_replicas: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for name, before, after in done:
        note = "unchanged" if before == after else f"{before} -> {after}"
        print(f"{name:32} {note}")
    if not done:
        print("no slmops streams found: start `slmops cloud` once first", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
