#!/usr/bin/env python3
"""Print nats-server user blocks for slmops edge nodes, and write each node's env file.

    python deploy/nats/make_node_users.py --fleet shop --bcrypt \\
        --env-dir ./node-env --url nats://nats.example.com:4222 till-001 till-002

prints one ``{ user: node-<node> ... }`` block per node, to paste into the ``users: [...]`` list
of the SLMOPS account (deploy/nats/single.conf or accounts.conf; for leaf/site.conf add
``--hub-domain hub``), and with
``--env-dir`` writes ``<dir>/<node>.env`` (mode 0600) holding SLMOPS_NATS_URL with that node's
credentials, SLMOPS_EDGE_FLEET and SLMOPS_EDGE_NODE: copy it to /etc/slmops/edge.env on the
device. Passwords are random (32 URL-safe characters, so they need no escaping in a URL).

With ``--bcrypt`` the config holds only a bcrypt hash (nats-server checks it); the clear
password then exists only in the env files, so ``--env-dir`` is required. Hashing uses the
``bcrypt`` package if installed, else Python's ``crypt`` module (Linux, Python <= 3.12).

The permissions are the exact set nats-py 2.16 needs for what a node does (publish its own
telemetry and status with JetStream acks, read KV ``slmops_assignments`` by direct get and be
woken by its own keys' subjects, read KV ``slmops_manifests``, download from object store
``slmops_models`` by direct gets; no consumer), measured against nats-server 2.15 — see
deploy/README.md. ``cloud/trust/permissions.py`` grants the same set in JWT mode (a test
keeps the two equal). Standard library only: runs on any Python >= 3.11.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

# The same rule as shared/names.validate_id (kept in sync by tests/test_deploy.py): one
# subject token, no leading "_" (reserved for the fleet-wide assignment key "_fleet").
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# bcrypt cost: 2^11 rounds ≈ 0.1 s per check on a small VM — paid once per connect.
_BCRYPT_ROUNDS = 11

_BLOCK = """\
{{
  user: node-{node}
  password: "{password}"
  permissions: {{
    publish: {{
      allow: [
        # Its own subjects, nothing else. A JetStream publish needs no $JS.API right:
        # the PubAck comes back on the node's inbox.
        "slmops.telemetry.{fleet}.{node}",
        "slmops.status.{fleet}.{node}",
        # KV slmops_assignments: its own key and its fleet's, and the per-model keys under each
        # (<key>.<model>), only by direct get by subject (the key is in the subject, where
        # permissions see it). Stream info lists key names, never values: the node finds its
        # per-model keys with it.
        "$JS.API.STREAM.INFO.KV_slmops_assignments",
        "$JS.API.DIRECT.GET.KV_slmops_assignments.$KV.slmops_assignments.{fleet}.{node}",
        "$JS.API.DIRECT.GET.KV_slmops_assignments.$KV.slmops_assignments.{fleet}.{node}.>",
        "$JS.API.DIRECT.GET.KV_slmops_assignments.$KV.slmops_assignments.{fleet}._fleet",
        "$JS.API.DIRECT.GET.KV_slmops_assignments.$KV.slmops_assignments.{fleet}._fleet.>",
        # KV slmops_manifests, read-only.
        "$JS.API.STREAM.INFO.KV_slmops_manifests",
        "$JS.API.DIRECT.GET.KV_slmops_manifests.>",
        # KV slmops_fleetconfig, read-only: its own key and its fleet's, by direct get by
        # subject (pushed configuration, edge/fleetconfig.py).
        "$JS.API.DIRECT.GET.KV_slmops_fleetconfig.$KV.slmops_fleetconfig.{fleet}.{node}",
        "$JS.API.DIRECT.GET.KV_slmops_fleetconfig.$KV.slmops_fleetconfig.{fleet}._fleet",
        # KV slmops_keys, read-only: the root-signed list of signing keys (edge/keys.py), by
        # direct get by subject; one key, the same for every node.
        "$JS.API.DIRECT.GET.KV_slmops_keys.$KV.slmops_keys.keylist",
        # Object store slmops_models, read-only: bind, object info, chunks by batched direct
        # get (every object there is a signed bundle any node may download). No consumer
        # right at all: a node creates none (issue 13 fault 11).
        "$JS.API.STREAM.INFO.OBJ_slmops_models",
        "$JS.API.STREAM.MSG.GET.OBJ_slmops_models",
        "$JS.API.DIRECT.GET.OBJ_slmops_models",
      ]
    }}
    subscribe: {{
      allow: [
        # Its own replies.
        "_INBOX_{fleet}.{node}.>",
        # Wake-ups on its assignment keys (the bucket republishes each put there, headers only).
        "slmops.assigned.{fleet}.{node}",
        "slmops.assigned.{fleet}.{node}.>",
        "slmops.assigned.{fleet}._fleet",
        "slmops.assigned.{fleet}._fleet.>",
        # Wake-ups on its two fleet configuration keys (the puts' own KV subjects; no consumer).
        "$KV.slmops_fleetconfig.{fleet}.{node}",
        "$KV.slmops_fleetconfig.{fleet}._fleet",
      ]
    }}
  }}
}}"""


def node_block(fleet: str, node: str, password: str, indent: int = 0, hub_domain: str | None = None) -> str:
    """The nats-server config block of one node user, indented by ``indent`` spaces.

    ``hub_domain`` is for a site leaf server (leaf/site.conf) that maps ``$JS.API.>`` to the
    hub's ``$JS.<domain>.API.>``: the server checks a publish against both the subject the
    client sent and the mapped one, so every ``$JS.API`` right is granted under both names.
    """
    text = _BLOCK.format(fleet=_check_id(fleet, "fleet"), node=_check_id(node, "node"), password=password)
    lines = text.splitlines()
    if hub_domain is not None:
        prefix = f'"$JS.{_check_id(hub_domain, "hub domain")}.API.'
        lines = [
            twin
            for line in lines
            for twin in ([line, line.replace('"$JS.API.', prefix)] if '"$JS.API.' in line else [line])
        ]
    pad = " " * indent
    return "\n".join(pad + line if line else line for line in lines)


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash nats-server accepts; raises ``RuntimeError`` if no bcrypt is available."""
    try:
        import bcrypt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        hashed: bytes = bcrypt.hashpw(password.encode(), bcrypt.gensalt(_BCRYPT_ROUNDS))
        return hashed.decode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # crypt is deprecated in 3.11-3.12
        try:
            import crypt
        except ImportError:
            crypt = None  # type: ignore[assignment]
    if crypt is not None and hasattr(crypt, "METHOD_BLOWFISH"):
        result = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2**_BCRYPT_ROUNDS))
        if result and result.startswith("$2"):
            return result
    raise RuntimeError("no bcrypt available: `pip install bcrypt` (or drop --bcrypt)")


def env_file(url: str, fleet: str, node: str, password: str) -> str:
    """The /etc/slmops/edge.env content of one node: URL with its credentials, fleet, node."""
    scheme, sep, rest = url.partition("://")
    if not sep or not rest or "@" in rest:
        raise ValueError(f"--url must look like nats://host:4222 without credentials, got {url!r}")
    servers = ",".join(f"{scheme}://node-{node}:{password}@{host}" for host in rest.split(","))
    return (
        "# slmops edge node credentials: keep this file mode 0600, owned by root.\n"
        f"SLMOPS_NATS_URL={servers}\n"
        f"SLMOPS_EDGE_FLEET={fleet}\n"
        f"SLMOPS_EDGE_NODE={node}\n"
    )


def _check_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not valid: use 1-64 characters of A-Z a-z 0-9 _ -, "
            "starting with a letter or digit"
        )
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print nats-server user blocks for slmops edge nodes (and write their env files)."
    )
    parser.add_argument("nodes", nargs="+", metavar="NODE", help="node ids, e.g. till-001 till-002")
    parser.add_argument("--fleet", required=True, help="the fleet id the nodes belong to")
    parser.add_argument(
        "--bcrypt", action="store_true", help="store bcrypt hashes in the config (needs --env-dir)"
    )
    parser.add_argument(
        "--env-dir", type=Path, help="write <dir>/<node>.env (mode 0600) with each node's credentials"
    )
    parser.add_argument(
        "--url",
        default="nats://127.0.0.1:4222",
        help="server URL(s), comma-separated, written into the env files (default: %(default)s)",
    )
    parser.add_argument(
        "--hub-domain",
        help="for leaf/site.conf: the hub's JetStream domain the site maps $JS.API.> to (e.g. hub)",
    )
    parser.add_argument("--indent", type=int, default=6, help="indent of the printed blocks (default 6)")
    args = parser.parse_args(argv)
    if args.bcrypt and args.env_dir is None:
        parser.error("--bcrypt needs --env-dir: the clear passwords would be lost otherwise")
    try:
        fleet = _check_id(args.fleet, "fleet")
        nodes = [_check_id(n, "node") for n in args.nodes]
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"node ids repeat: {nodes!r}")
        blocks = []
        for node in nodes:
            password = secrets.token_urlsafe(24)
            stored = bcrypt_hash(password) if args.bcrypt else password
            blocks.append(node_block(fleet, node, stored, args.indent, args.hub_domain))
            if args.env_dir is not None:
                args.env_dir.mkdir(parents=True, exist_ok=True)
                path = args.env_dir / f"{node}.env"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(env_file(args.url, fleet, node, password))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"make_node_users: {exc}", file=sys.stderr)
        return 2
    print("\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
