"""The cloud service's configuration (``CloudConfig``); unknown keys are errors."""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

import msgspec

from slmops.shared.config import Config, positive
from slmops.shared.connect import check_nats_url
from slmops.shared.connopts import ConnectOptions
from slmops.shared.httpauth import MIN_TOKEN_CHARS
from slmops.shared.names import validate_id

__all__ = ["CloudConfig", "DriftConfig", "RecalibratePolicy", "RolloutConfig", "RolloutSettings"]


class DriftConfig(Config, kw_only=True):
    """Drift-detection knobs (docs/architecture.md §7). Defaults are what ``slmops bench drift`` measured."""

    #: Target false drift events per node-window on stationary traffic: half of the goal of
    #: 1 per 10,000, because at 1e-4 `slmops bench drift` measured 0.98 per 10,000 (sparse
    #: histogram cells in small node windows make the calibration approximate).
    target_false_rate: float = 5e-5
    #: Target false drift events per (fleet, model) per day (issue 14's goal: ≤ 1 on a
    #: 10,000-node fleet with 1-minute windows; half of it, as for ``target_false_rate``). A
    #: round's BH level is capped at this × the round's window length / 1 day, so a large
    #: fleet's thousands of node windows per round no longer raise it to the 0.1 ceiling.
    target_false_per_fleet_day: float = 0.5
    #: A node's counts are tested only once at least this many inferences accumulated; a
    #: smaller window is carried into the node's next one (never tested alone).
    min_count: int = 100
    #: Minimum effect (total-variation distance to the reference) for an event to open.
    min_effect: float = 0.02
    #: CUSUM allowance subtracted from every per-window z-score.
    cusum_allowance: float = 0.5
    #: Consecutive quiet windows before an open event resolves (hysteresis).
    resolve_windows: int = 3
    #: A window is "quiet" below this z-score (one-sided 5%).
    quiet_z: float = 1.645
    #: Rounds of fleet traffic used as reference when the manifest has none for a signal.
    warmup_rounds: int = 5
    #: Tested windows that make a node's own baseline, against which its later windows are
    #: tested (nodes differ in class mix; the manifest describes the fleet, not each node).
    #: Long, so the baseline's own sampling error stays small beside one window's (1/20).
    node_baseline_windows: int = 20
    #: Simulated windows per calibration (per signal, window-size bucket and noise level).
    calibration_windows: int = 200_000

    def __post_init__(self) -> None:
        if not 0 < self.target_false_rate < 1:
            raise ValueError(f"target_false_rate must be in (0, 1), got {self.target_false_rate!r}")
        if not self.target_false_per_fleet_day > 0:
            raise ValueError(
                f"target_false_per_fleet_day must be > 0, got {self.target_false_per_fleet_day!r}"
            )
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count!r}")
        if not 0 <= self.min_effect < 1:
            raise ValueError(f"min_effect must be in [0, 1), got {self.min_effect!r}")
        if self.resolve_windows < 1 or self.warmup_rounds < 1 or self.node_baseline_windows < 1:
            raise ValueError(
                f"resolve_windows and warmup_rounds must be >= 1, got "
                f"{self.resolve_windows!r}, {self.warmup_rounds!r}"
            )
        if self.calibration_windows < 10_000:
            raise ValueError(f"calibration_windows must be >= 10000, got {self.calibration_windows!r}")


class RolloutConfig(msgspec.Struct, kw_only=True):
    """How a rollout advances and what stops it. Validated on construction. Stored inside the
    rollout state in KV (``cloud.rollout.state``), so it tolerates fields a newer controller
    added; the config file's ``[rollout]`` table is the strict ``RolloutSettings``."""

    #: Cumulative percentages of the fleet per stage; the last is 100.
    stages: list[int] = msgspec.field(default_factory=lambda: [5, 25, 100])
    #: Seconds each stage runs after its nodes installed, before its gates are judged.
    soak_s: float = 120.0
    #: Fraction of a stage's nodes that may fail to install (rejected, rolled back locally).
    max_failures: float = 0.02
    #: Seconds to wait for a stage's nodes to install; then the stage soaks with those that
    #: did (nodes offline for days must not hold a rollout forever) unless none did.
    install_timeout_s: float = 300.0
    #: Inferences the canary (and, for comparisons, the control) needs before a gate judges.
    min_samples: int = 200
    #: Past this many seconds of soak without enough samples the rollout pauses for a person.
    sample_timeout_s: float = 1800.0
    #: Canary error rate may exceed control's by at most this (absolute).
    max_error_rate_increase: float = 0.01
    #: Canary latency p95 may be at most this times control's.
    max_latency_ratio: float = 1.5
    #: ... unless the canary's p95 is below this: sub-millisecond figures (one ORT call of the
    #: default model is ~0.1 ms) move by bins with scheduling noise alone.
    latency_floor_ms: float = 2.0
    #: Canary mean confidence (the expected-accuracy proxy) may be at most this lower.
    max_confidence_drop: float = 0.05
    #: Canary's class-mix distance to its own reference may exceed control's by at most this
    #: (total variation), so a recalibrated version that predicts a new mix on purpose passes.
    max_drift_increase: float = 0.1
    #: Canary accuracy from app feedback may be at most this lower than control's (absolute).
    max_accuracy_drop: float = 0.05
    #: Labelled answers (app feedback) each side needs before the accuracy gate judges; with
    #: fewer it passes saying so (apps need not send feedback at all).
    min_feedback: int = 100
    #: Generation models: the share (0-1) of the version's quality set
    #: (``GenerationSpec.quality``) its canary nodes must pass, as they report it after
    #: installing (``NodeStatus.quality``); None: no quality gate.
    min_quality: float | None = None

    def __post_init__(self) -> None:
        st = self.stages
        if not st or any(isinstance(p, bool) or not isinstance(p, int) for p in st):
            raise ValueError(f"stages must be a non-empty list of ints, got {st!r}")
        if any(not 0 < p <= 100 for p in st) or any(b <= a for a, b in itertools.pairwise(st)):
            raise ValueError(f"stages must increase strictly within 1..100, got {st!r}")
        if st[-1] != 100:
            raise ValueError(f"the last stage must be 100 (the whole fleet), got {st!r}")
        if not 0 <= self.max_failures < 1:
            raise ValueError(f"max_failures must be a fraction in [0, 1), got {self.max_failures!r}")
        for name in (
            "soak_s",
            "install_timeout_s",
            "sample_timeout_s",
            "max_error_rate_increase",
            "latency_floor_ms",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)!r}")
        for name in ("max_latency_ratio", "max_confidence_drop", "max_drift_increase", "max_accuracy_drop"):
            positive(name, getattr(self, name))
        q = self.min_quality
        if q is not None and (isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 1):
            raise ValueError(f"min_quality must be a fraction in [0, 1], got {q!r}")
        for name in ("min_samples", "min_feedback"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


class RolloutSettings(RolloutConfig, kw_only=True, forbid_unknown_fields=True):
    """The ``[rollout]`` table of the cloud's config file: a ``RolloutConfig`` whose unknown
    keys are errors (the stored rollout state itself stays tolerant of newer fields)."""

    def config(self) -> RolloutConfig:
        return RolloutConfig(**msgspec.structs.asdict(self))


#: What the cloud does on a fleet-wide label shift: nothing, propose a recalibrated version in
#: a drift event, or build it and roll it out.
RecalibratePolicy = Literal["off", "suggest", "auto"]


class CloudConfig(Config, kw_only=True):
    """What the cloud needs (``cloud.service``: ingest, and the tasks only the active
    instance runs). ``fleets`` empty means every fleet."""

    DURATIONS: ClassVar[tuple[str, ...]] = (
        "fetch_timeout",
        "ack_wait",
        "lease_ttl",
        "snapshot_interval",
        "recalibration_cooldown",
        "rollout_interval",
        "max_clock_skew",
        "max_window_age",
    )

    FLAGS: ClassVar[dict[str, str]] = {
        "nats_url": "--nats", "nats_creds": "--creds", "state_dir": "--state", "fleets": "--fleet",
    }  # fmt: skip

    nats_url: str = "nats://127.0.0.1:4222"
    #: TLS to NATS (``shared.connopts.ConnectOptions``): the CA file the server's certificate
    #: must chain to, and this client's certificate + key for mutual TLS (PEM paths).
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: A NATS ``.creds`` file (``slmops fleet enroll``) for a server in operator mode.
    nats_creds: str | None = None
    state_dir: str = "./slmops-cloud"
    fleets: list[str] = msgspec.field(default_factory=list)
    #: Accounts whose requests reach the change service through a service import with
    #: ``share: true`` (names in a password config, public keys in operator mode): only their
    #: server-written ``Nats-Request-Info`` is believed by the audit (``cloud.audit.identity``).
    #: Empty (default): every audit record says "unauthenticated" — a header from any other
    #: account may have been written by a client of the cloud's own account.
    audit_accounts: list[str] = msgspec.field(default_factory=list)
    #: Messages per pull (one SQLite transaction and one ack per batch). Per-batch costs
    #: (commit, fsync, node and detector rows) dominate small batches: in `slmops bench
    #: ingest`, 1024 ran 15-40% faster than 256 and 4096 a mean 18% faster than 1024 (6 pairs).
    #: A pull never waits for a batch to fill: it takes what the stream has.
    batch_size: int = 4096
    #: How long one fetch waits for messages before the loop looks around again.
    fetch_timeout: float = 1.0
    #: Seconds a message may stay unacked before JetStream redelivers it.
    ack_wait: float = 30.0
    #: Single-active lease time-to-live; renewed every third of it.
    lease_ttl: float = 10.0
    #: How often dirty node states are written to the ``slmops_fleet`` KV bucket.
    snapshot_interval: float = 1.0
    #: Out-of-order seqs kept per node above the contiguous mark before the oldest gap is
    #: declared lost (bounds memory when a node never resends a seq).
    max_pending_seqs: int = 4096
    #: A seq more than this above its install's highest applied one is quarantined (dead-
    #: lettered as ``seq_jump``, not counted as missing; ``ingest/dedupe.py``). The default is
    #: the telemetry stream's per-node message cap: no more of a node's aggregates can wait.
    max_seq_jump: int = 100_000
    #: How far (seconds) a node's window may end after the server time of its message
    #: (node clocks run ahead); beyond it the aggregate is dead-lettered (``ingest/checks``).
    max_clock_skew: float = 600.0
    #: How long before the server time (seconds) a window may start: outbox backlogs after a
    #: long outage are old but real; a window from 1970 is not.
    max_window_age: float = 365 * 86400.0
    drift: DriftConfig = msgspec.field(default_factory=DriftConfig)
    #: Seconds after proposing a recalibrated version during which drift on that version
    #: starts no further recalibration (it would chain estimate errors into v3, v4...).
    recalibration_cooldown: float = 600.0
    #: How rollouts the cloud starts itself (recalibration policy ``auto``) advance.
    rollout: RolloutSettings = msgspec.field(default_factory=lambda: RolloutSettings())
    #: Run the rollout controller (in the active instance).
    rollouts: bool = True
    #: Seconds between two steps of the rollout controller.
    rollout_interval: float = 1.0
    #: On a fleet-wide label shift (needs ``key``).
    recalibrate: RecalibratePolicy = "off"
    #: The cloud's Ed25519 private key file (mode 0600) that signs recalibrated versions.
    key: str | None = None
    #: ``HOST:PORT`` of the read-only web console, its JSON API and ``/metrics`` (Prometheus);
    #: None: off. Port 0 picks a free one.
    http: str | None = None
    #: Bearer token every HTTP request must carry; required for a non-loopback ``http``.
    http_token: str | None = None
    #: POST every drift event's JSON here (``cloud.analyst.webhook``: in order, retried with
    #: backoff, bounded); None: off.
    webhook_url: str | None = None

    def __post_init__(self) -> None:
        check_nats_url(self.nats_url)
        self.connect_options  # noqa: B018 -- validates the TLS settings (cert and key go together)
        if self.http is not None:
            from slmops.cloud.analyst.address import is_loopback, parse_http

            host, _port = parse_http(self.http)
            if not is_loopback(host) and not self.http_token:
                raise ValueError(
                    f"http {self.http!r} is not a loopback address: set http_token (--http-token) "
                    "so the console is not open to the network"
                )
        if self.webhook_url is not None and not self.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must be an http(s) URL, got {self.webhook_url!r}")
        if self.http_token is not None and len(self.http_token) < MIN_TOKEN_CHARS:
            raise ValueError(f"http_token must be at least {MIN_TOKEN_CHARS} characters")
        for fleet in self.fleets:
            validate_id(fleet, "fleet")
        if self.recalibrate != "off" and self.key is None:
            raise ValueError(f"recalibrate {self.recalibrate!r} needs key (the cloud's signing key, --key)")
        if not 1 <= self.batch_size <= 4096:
            raise ValueError(f"batch_size must be in 1..4096, got {self.batch_size!r}")
        for what, value in (
            ("fetch_timeout", self.fetch_timeout),
            ("ack_wait", self.ack_wait),
            ("lease_ttl", self.lease_ttl),
            ("snapshot_interval", self.snapshot_interval),
            ("rollout_interval", self.rollout_interval),
            ("max_clock_skew", self.max_clock_skew),
            ("max_window_age", self.max_window_age),
        ):
            if not value > 0:
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        if self.lease_ttl < 1:
            raise ValueError(f"lease_ttl must be >= 1 s (KV TTL granularity), got {self.lease_ttl!r}")
        if self.max_seq_jump < 1:
            raise ValueError(f"max_seq_jump must be >= 1, got {self.max_seq_jump!r}")
        if self.max_pending_seqs < 16:
            raise ValueError(f"max_pending_seqs must be >= 16, got {self.max_pending_seqs!r}")

    @property
    def connect_options(self) -> ConnectOptions:
        """The TLS settings as ``ConnectOptions`` (``ValueError`` for a cert without a key)."""
        return ConnectOptions.of(self)
