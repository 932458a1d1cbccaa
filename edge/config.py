"""The edge node's configuration (a ``shared.config.Config``: unknown keys are errors).

Durations are seconds (``window=0.5``); sizes are bytes. ``EdgeConfig.build`` also accepts the
human forms ``"500ms"``, ``"1m"``, ``"64k"`` for those fields (``DURATIONS``, ``SIZES``), as
the CLI and config files do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import msgspec

from slmops.shared.address import is_loopback, parse_hostport
from slmops.shared.config import Config, load_config, positive
from slmops.shared.connect import check_nats_url
from slmops.shared.connopts import ConnectOptions
from slmops.shared.fleetconfig import PUSHABLE
from slmops.shared.httpauth import check_token, read_token
from slmops.shared.names import validate_id

__all__ = [
    "EdgeConfig",
    "GenerationLimits",
    "RefreshTimings",
    "SafetyLimits",
    "is_loopback",
    "parse_hostport",
]


class SafetyLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """When a node abandons a new version on its own (``edge.safety``); the ``[safety]``
    table of an edge config file. Validated on construction."""

    min_samples: int = 50
    watch_s: float = 600.0
    max_error_rate: float = 0.05
    max_error_increase: float = 0.02
    #: Off by default: it compares the new version with the previous one measured in an
    #: EARLIER period, so the device's load moves it (demo and new-user runs at load 10-20 saw
    #: "3.2x" and "16.2x" for versions of equal speed, and the node abandoned a good version,
    #: even one the cloud had just rolled back to). Latency is judged by the cloud's rollout
    #: gates, canary against control in the same period; set this (or ``max_latency_ms``) on a
    #: device whose load is steady.
    max_latency_ratio: float | None = None
    max_latency_ms: float | None = None
    #: A p95 below this is never a breach by ratio (noise dominates sub-millisecond figures).
    latency_floor_ms: float = 5.0
    #: Interval samples each version needs before latency is judged.
    min_intervals: int = 5
    interval: float = 1.0

    def __post_init__(self) -> None:
        for name in ("min_samples", "min_intervals"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.latency_floor_ms >= 0:
            raise ValueError(f"latency_floor_ms must not be negative, got {self.latency_floor_ms!r}")
        if self.max_latency_ratio is not None:
            positive("max_latency_ratio", self.max_latency_ratio)
        for name in ("watch_s", "interval"):
            positive(name, getattr(self, name))
        for name in ("max_error_rate", "max_error_increase"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {getattr(self, name)!r}")
        if self.max_latency_ms is not None:
            positive("max_latency_ms", self.max_latency_ms)


class RefreshTimings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How the node follows its assignment (``edge.refresh``); the ``[refresh]`` table of an
    edge config file. Seconds, all positive."""

    #: Longest one bundle download may take.
    download_timeout: float = 120.0
    #: Longest one KV read or watch set-up may take.
    op_timeout: float = 10.0
    #: The assignment is re-read this often even when no watch fired (a watch can miss one).
    poll_interval: float = 60.0
    #: Backoff of a failed download: first delay and cap.
    retry_initial: float = 1.0
    retry_max: float = 60.0

    def __post_init__(self) -> None:
        for name in ("download_timeout", "op_timeout", "poll_interval", "retry_initial", "retry_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


class GenerationLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How much generation a node takes on (``edge.generate``); the ``[generation]`` table of
    an edge config file. A request may lower the model's limits, never raise them."""

    #: Generations running at once (each steps in a worker thread; 2 cores here: 1 keeps a
    #: stream's tokens/s, more share the cores).
    max_concurrent: int = 1
    #: Requests waiting for a slot; beyond it the API answers 429 with ``Retry-After``.
    max_queue: int = 8
    #: Longest prompt, in messages' characters (before tokenizing: bounds the tokenizer's work).
    max_prompt_chars: int = 32_000
    #: Share of requests whose prompt log-likelihood is computed; None = the manifest's.
    loglik_share: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_prompt_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {self.max_queue!r}")
        if self.loglik_share is not None and not 0 <= self.loglik_share <= 1:
            raise ValueError(f"loglik_share must be in [0, 1], got {self.loglik_share!r}")


class EdgeConfig(Config, kw_only=True):
    """Everything one edge node needs. Callers may rely on every value being validated."""

    DURATIONS: ClassVar[tuple[str, ...]] = (
        "window",
        "max_batch_wait",
        "status_interval",
        "publish_timeout",
        "link_backoff_max",
        "commit_interval",
        "http_read_timeout",
        "http_head_timeout",
    )
    SIZES: ClassVar[tuple[str, ...]] = ("outbox_max_bytes", "http_inflight_bytes")
    FLAGS: ClassVar[dict[str, str]] = {
        "data_dir": "--data",
        "nats_url": "--nats",
        "nats_creds": "--creds",
        "outbox_max_bytes": "--outbox-max",
        "intra_op_threads": "--threads",
        "memory_mb": "--memory-mb",
    }

    fleet: str
    node: str
    #: Directory for the SQLite buffer and the model cache (created if missing).
    data_dir: str
    nats_url: str = "nats://127.0.0.1:4222"
    #: TLS to NATS (``shared.connopts.ConnectOptions``): the CA file the server's certificate
    #: must chain to, and this client's certificate + key for mutual TLS (PEM paths).
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: A NATS ``.creds`` file (``slmops fleet enroll``) for a server in operator mode.
    nats_creds: str | None = None
    #: JetStream domain of the hub, for a device logged in at a leaf site in operator mode
    #: (deploy/nats/jwt/leaf): its JetStream requests go to ``$JS.<domain>.API``.
    js_domain: str | None = None
    #: A bundle directory to install at start (else the cached model, else none).
    model: str | None = None
    #: Further bundle directories served beside ``model`` (one per model name; issue 11).
    models: list[str] = msgspec.field(default_factory=list)
    #: A device profile file (``deploy/profiles/*.toml``, ``shared.profiles``): the node
    #: reports its name in ``NodeStatus.device.profile`` (the cloud assigns the variant made
    #: for it) and its ``memory_mb`` as the device's memory, unless ``memory_mb`` is set.
    profile: str | None = None
    #: Memory (MB) the served models' ``min_memory_mb`` must fit in together; None = the
    #: profile's ``memory_mb``, else this machine's physical memory; 0 = not checked.
    memory_mb: int | None = None
    #: Public key files (PEM) whose bundle signatures this node accepts.
    trust: list[str] = msgspec.field(default_factory=list)
    #: Root public keys (PEM) whose signed key list (KV ``slmops_keys``) this node follows:
    #: the list adds, retires and revokes bundle-signing keys (``shared.keylist``).
    trust_root: list[str] = msgspec.field(default_factory=list)
    #: ``HOST:PORT`` of the local HTTP API, or None (or "off") for no HTTP API.
    http: str | None = "127.0.0.1:8470"
    #: Bearer token every API request must carry (``Authorization: Bearer <token>``); better
    #: given as ``http_token_file`` or env SLMOPS_EDGE_HTTP_TOKEN than on a command line.
    #: Required (one of the two) for a non-loopback ``http``.
    http_token: str | None = None
    #: File holding that token (read at start; surrounding whitespace dropped).
    http_token_file: str | None = None
    #: Seconds per telemetry window.
    window: float = 60.0
    #: k of k-anonymity: a window with fewer inferences is not published alone.
    min_count: int = 10
    #: Longest accepted input text, in characters.
    max_text_chars: int = 10_000
    #: Most texts in one request.
    max_texts: int = 256
    #: Most texts ORT runs in one micro-batch.
    max_batch: int = 32
    #: How long a micro-batch waits for more requests; 0 = take what is queued (batches
    #: still form while ORT is busy with the previous one).
    max_batch_wait: float = 0.0
    intra_op_threads: int = 1
    #: A micro-batch of at most this many characters runs in the event loop instead of a
    #: worker thread: handing work to a thread and back costs ~130 µs on the 2-core test
    #: machine, featurize + ORT of one short text 30-80 µs (``slmops bench edge``); 4096
    #: characters (~32 short texts) block the loop well under a millisecond. 0 = always a
    #: worker thread.
    inline_max_chars: int = 4096
    #: Request bodies the HTTP API holds at once, in bytes, over all connections, counting
    #: each body's bytes and its decoded texts (2.125 x its Content-Length while it is read
    #: and decoded, about 1 x while it is served): a request waits (up to 3 x
    #: ``http_read_timeout``, then 503) until it fits, so 16 concurrent 10 MB bodies are not
    #: all in memory together; small requests still fit beside big ones. A body above ~47 %
    #: of the budget is read alone. RSS grew by 32.6 MiB for 16 x 10 MB bodies (edge.api).
    http_inflight_bytes: int = 32 * 1024 * 1024
    #: Seconds a client has to deliver its request body (including the wait for the byte
    #: budget); a slower or stalled client gets 408 (503 for the budget) and is disconnected.
    http_read_timeout: float = 10.0
    #: Seconds a connection has to deliver a complete request head (request line and
    #: headers), counted from when it connected or got its last answer; a slower client
    #: (slowloris) or an idle kept-alive connection is closed without an answer.
    http_head_timeout: float = 10.0
    #: Bound on the outbox (encoded aggregates waiting for the cloud), in bytes (docs/architecture.md §5).
    outbox_max_bytes: int = 16 * 1024 * 1024
    #: Optional differential privacy: epsilon spent per published window (None = off).
    dp_epsilon: float | None = None
    #: Total epsilon this node may ever spend; once spent, windows go out without
    #: histograms (counts only). None = no limit.
    dp_budget: float | None = None
    status_interval: float = 30.0
    #: Longest pause between attempts to make the first NATS connection (backoff cap).
    link_backoff_max: float = 30.0
    #: Timeout of one JetStream publish (its PubAck).
    publish_timeout: float = 5.0
    #: Most telemetry publishes awaiting their PubAck at once.
    max_in_flight: int = 32
    #: True: an answer is sent only once its telemetry row is committed to SQLite, so a
    #: ``kill -9`` never loses telemetry of an answered inference. False: answer first.
    durable_ack: bool = True
    #: Shortest time between two group commits of telemetry rows: longer = fewer, larger
    #: commits and less contention between the event loop and the SQLite thread (measured
    #: +30-60% predictions/s for one fast-ack caller at 5 ms), but a durable answer waits up to
    #: this long for its commit. None = 0 with ``durable_ack``, 5 ms without.
    commit_interval: float | None = None
    #: Remembered prediction ids (for feedback); the oldest are forgotten first.
    feedback_memory: int = 100_000
    #: When the node rolls a new version back on its own.
    safety: SafetyLimits = msgspec.field(default_factory=SafetyLimits)
    #: Timings of following the model assignment.
    refresh: RefreshTimings = msgspec.field(default_factory=RefreshTimings)
    #: Generation models: concurrency, queue and prompt limits.
    generation: GenerationLimits = msgspec.field(default_factory=GenerationLimits)
    #: Settings a pushed fleet configuration may not change on this node ("local flags
    #: win"): top-level names (``"window"``) or ``"safety.<name>"`` / ``"refresh.<name>"``
    #: (``shared.fleetconfig.PUSHABLE``). The privacy floors need no pin: pushed config can
    #: never loosen this node's ``min_count``, ``dp_epsilon`` or ``dp_budget``.
    pin: list[str] = msgspec.field(default_factory=list)
    #: The differential-privacy budget ledger (SQLite), kept apart from the telemetry
    #: database so a new install (a wiped or quarantined database) does not get a fresh
    #: budget. None = ``<data>/privacy_ledger.db``; put it outside the data directory
    #: (e.g. /var/lib/slmops-privacy/) for it to outlive a wiped data directory too.
    dp_ledger: str | None = None

    def __post_init__(self) -> None:
        validate_id(self.fleet, "fleet")
        validate_id(self.node, "node")
        try:
            check_nats_url(self.nats_url)
        except ValueError as exc:
            raise ValueError(f"nats_url: {exc}") from None
        self.connect_options  # noqa: B018 -- validates the TLS settings (cert and key go together)
        if not self.data_dir:
            raise ValueError("data_dir must be a directory path, got an empty string")
        if self.http is not None and self.http.strip().lower() in ("", "off"):
            self.http = None
        if self.http is not None:
            host, _port = parse_hostport(self.http)
            if not is_loopback(host) and self.http_token is None and self.http_token_file is None:
                raise ValueError(
                    f"http {self.http!r} is not a loopback address: give a bearer token "
                    "(--http-token-file FILE or env SLMOPS_EDGE_HTTP_TOKEN) so the API is not open "
                    "to the network"
                )
        if self.http_token is not None and self.http_token_file is not None:
            raise ValueError("give http_token or http_token_file, not both")
        if self.http_token is not None:
            check_token(self.http_token, "http_token")
        positive = {
            "window": self.window,
            "publish_timeout": self.publish_timeout,
            "status_interval": self.status_interval,
            "link_backoff_max": self.link_backoff_max,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if self.commit_interval is not None and self.commit_interval < 0:
            raise ValueError(f"commit_interval must be >= 0 seconds, got {self.commit_interval!r}")
        if self.inline_max_chars < 0:
            raise ValueError(f"inline_max_chars must be >= 0, got {self.inline_max_chars!r}")
        if self.max_batch_wait < 0:
            raise ValueError(f"max_batch_wait must be >= 0 seconds, got {self.max_batch_wait!r}")
        at_least_one = {
            "min_count": self.min_count,
            "max_text_chars": self.max_text_chars,
            "max_texts": self.max_texts,
            "max_batch": self.max_batch,
            "intra_op_threads": self.intra_op_threads,
            "max_in_flight": self.max_in_flight,
            "feedback_memory": self.feedback_memory,
        }
        for name, ivalue in at_least_one.items():
            if ivalue < 1:
                raise ValueError(f"{name} must be >= 1, got {ivalue!r}")
        if self.http_inflight_bytes < 1024:
            raise ValueError(f"http_inflight_bytes must be >= 1024, got {self.http_inflight_bytes!r}")
        for name in ("http_read_timeout", "http_head_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.outbox_max_bytes < 1024:
            raise ValueError(f"outbox_max_bytes must be >= 1024, got {self.outbox_max_bytes!r}")
        if self.memory_mb is not None and self.memory_mb < 0:
            raise ValueError(f"memory_mb must be >= 0 (0 = not checked), got {self.memory_mb!r}")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise ValueError(f"dp_epsilon must be > 0 (or unset), got {self.dp_epsilon!r}")
        if self.dp_budget is not None and not self.dp_budget > 0:
            raise ValueError(f"dp_budget must be > 0 (or unset), got {self.dp_budget!r}")
        for name in self.pin:
            top, _, sub = str(name).partition(".")
            table = {"safety": SafetyLimits, "refresh": RefreshTimings}.get(top)
            if top not in PUSHABLE or (sub and (table is None or sub not in table.__struct_fields__)):
                raise ValueError(f"pin: {name!r} is not a pushable setting (pushable: {sorted(PUSHABLE)})")

    @property
    def group_commit_interval(self) -> float:
        """``commit_interval`` with its default applied."""
        if self.commit_interval is not None:
            return self.commit_interval
        return 0.0 if self.durable_ack else 0.005

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def model_path(self) -> Path | None:
        return None if self.model is None else Path(self.model)

    @property
    def model_paths(self) -> list[Path]:
        """``model`` then ``models``: every bundle to install at start, default first."""
        return [Path(p) for p in ([self.model] if self.model else []) + list(self.models)]

    @property
    def dp_ledger_path(self) -> Path:
        return Path(self.dp_ledger) if self.dp_ledger else self.data_path / "privacy_ledger.db"

    @property
    def trust_paths(self) -> list[Path]:
        return [Path(p) for p in self.trust]

    def api_token(self) -> str | None:
        """The bearer token the API requires (None: none). Reads ``http_token_file``;
        ``ValueError`` naming the file when it cannot be read or holds no usable token."""
        if self.http_token_file is not None:
            return read_token(Path(self.http_token_file))
        return self.http_token

    @property
    def http_address(self) -> tuple[str, int] | None:
        return None if self.http is None else parse_hostport(self.http)

    @classmethod
    def build(cls, data: dict[str, Any] | None = None, path: Path | None = None) -> EdgeConfig:
        """Build from a TOML/JSON file overlaid with ``data`` (None values are ignored);
        durations and sizes may be strings in both. Raises ``shared.errors.ConfigError``
        naming the source and the bad key."""
        return load_config(cls, data, path)

    def replace(self, **changes: Any) -> EdgeConfig:
        """A copy with ``changes`` applied and validated again."""
        return msgspec.convert({**msgspec.structs.asdict(self), **changes}, EdgeConfig, strict=False)

    @property
    def connect_options(self) -> ConnectOptions:
        """The TLS settings as ``ConnectOptions`` (``ValueError`` for a cert without a key)."""
        return ConnectOptions.of(self)
