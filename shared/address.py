"""``HOST:PORT`` listen addresses, shared by the edge API and the cloud console."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback", "parse_hostport"]


def parse_hostport(value: str, *, flag: str = "http", example: str = "127.0.0.1:8470") -> tuple[str, int]:
    """``"127.0.0.1:8470"`` (``"[::1]:8470"`` too) → ``("127.0.0.1", 8470)``; port 0 picks a
    free port. Raises ``ValueError`` naming ``flag`` and the value."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} address {value!r} is not valid: use HOST:PORT, e.g. {example}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
