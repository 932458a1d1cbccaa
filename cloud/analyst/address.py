"""The console's ``HOST:PORT`` (kept light: ``CloudConfig`` validates with it)."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback", "parse_http"]


def parse_http(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port); ``ValueError`` naming the value."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"http must be HOST:PORT (e.g. 127.0.0.1:8480), got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
