"""The tests' TCP proxy is the project's own (the demo uses it too)."""

from slmops.netproxy import TcpProxy

__all__ = ["TcpProxy"]
