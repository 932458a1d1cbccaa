"""The console's ``HOST:PORT`` (kept light: ``CloudConfig`` validates with it)."""

from __future__ import annotations

from functools import partial

from slmops.shared.address import is_loopback, parse_hostport

__all__ = ["is_loopback", "parse_http"]

#: ``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ``ValueError`` naming the value.
parse_http = partial(parse_hostport, flag="http", example="127.0.0.1:8480")
