"""The node's side of the signed key list (``shared.keylist``): load the accepted list at
start, follow KV ``slmops_keys`` while online, accept only lists whose root signature
verifies and whose version is newer, persist them, and hand the resulting trust to the model
manager (which falls back or stops serving models whose signer became compromised).

Reads are direct gets by subject (``shared.kv.kv_get_direct``), as for assignments: on every
connect, every ``interval`` seconds, and at once when a bundle arrives signed by a key this
node does not know (``refresh_now``) — so a bundle signed by a newly added key is never
refused because its list was still on the way (rotation, issue 17).

A node given no ``--trust-root`` ignores key lists: it trusts its ``--trust`` files only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from slmops.edge.models import ModelManager
from slmops.shared.connect import Link, LinkState
from slmops.shared.errors import NatsUnavailable
from slmops.shared.keylist import (
    KeyList,
    KeyListError,
    KeyListHeld,
    accept,
    load_saved,
    read_signed,
    save,
    trust_store,
)
from slmops.shared.vocabulary import NodeEvent

__all__ = ["KeyFollower"]

log = structlog.get_logger(__name__)

#: File in the data directory holding the accepted list's signed bytes.
KEYLIST_FILE = "keylist.json"

Report = Callable[..., Awaitable[bool]]


class KeyFollower:
    """Holds the accepted key list and keeps ``models.trust`` in line with it."""

    def __init__(
        self,
        data_dir: Path,
        roots: Sequence[Ed25519PublicKey],
        static: Sequence[Ed25519PublicKey],
        models: ModelManager,
        report: Report,
        *,
        interval: float = 10.0,
    ) -> None:
        """``attach(link)`` before ``run`` or ``refresh_now``; ``load()`` needs no link (the
        node loads the saved list before it knows which server it connects to)."""
        self.path = Path(data_dir) / KEYLIST_FILE
        self.roots = list(roots)
        self.static = list(static)
        self.models = models
        #: Set by ``attach``.
        self.link: Link
        self.report = report
        self.interval = interval
        self.keylist: KeyList | None = None
        #: Why the last list seen was refused (None after an accepted one).
        self.last_refusal: str | None = None
        self._seen: bytes | None = None
        self._lock = anyio.Lock()
        self._wake = anyio.Event()

    def attach(self, link: Link) -> None:
        """Follow the list over ``link``: read it on each connect."""
        self.link = link
        link.on_change(self._on_link)

    @property
    def version(self) -> int:
        """The accepted list's version (0: none)."""
        return 0 if self.keylist is None else self.keylist.version

    def load(self) -> None:
        """At start, before models load: the persisted list, verified again, decides trust.
        A saved list that no longer verifies (another root configured) is logged and ignored."""
        if not self.roots:
            return
        try:
            saved = load_saved(self.path, self.roots)
        except KeyListError as exc:
            log.error("keylist_saved_refused", path=str(self.path), reason=exc.reason)
            return
        if saved is None:
            return
        self.keylist, self._seen = saved
        self.models.trust = trust_store(self.static, self.keylist)
        log.info("keylist_loaded", version=self.keylist.version, keys=len(self.keylist.keys))

    def _on_link(self, state: LinkState) -> None:
        if state is LinkState.ONLINE:
            self._wake.set()

    async def run(self) -> None:
        """Read the list on every connect and every ``interval`` s while online."""
        if not self.roots:
            await anyio.sleep_forever()
        while True:
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            if self.link.state is LinkState.ONLINE:
                await self.refresh_now()

    async def refresh_now(self) -> bool:
        """Read the list from KV and apply it if it is new and valid; True when a new list
        was accepted. Never raises for what the network or the list's bytes do."""
        if not self.roots:
            return False
        async with self._lock:
            try:
                raw = await read_signed(self.link.js)
            except NatsUnavailable as exc:
                log.debug("keylist_read_failed", error=str(exc))
                return False
            if raw is None or raw == self._seen:
                return False
            self._seen = raw
            try:
                new = accept(self.keylist, raw, self.roots)
            except KeyListHeld:
                return False
            except KeyListError as exc:
                self.last_refusal = exc.reason
                log.warning("keylist_refused", reason=exc.reason, held=self.version)
                await self._report(NodeEvent.KEYS_REFUSED, last_error=str(exc))
                return False
            await anyio.to_thread.run_sync(save, self.path, raw)
            self.keylist, self.last_refusal = new, None
            touched = await self.models.apply_trust(trust_store(self.static, new))
            log.info("keylist_accepted", version=new.version, keys=len(new.keys), touched=len(touched))
            note = "; ".join(f"{name}: {what}" for name, what in touched) or None
            event = NodeEvent.KEYS_FALLBACK if touched else NodeEvent.KEYS_UPDATED
            await self._report(event, last_error=note)
            return True

    async def _report(self, event: str, **fields: Any) -> None:
        try:
            await self.report(event, **fields)
        except Exception as exc:  # a status is a snapshot: the next one says it again
            log.warning("keylist_report_failed", error=repr(exc))
