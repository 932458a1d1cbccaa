"""The contract's words: the values of the wire fields that are typed ``str`` (bundle error
codes, node status events, rollout states and events, drift event kinds, signals and
references) as
``StrEnum``s. Wire fields stay ``str`` — a field never changes type (msgspec's
schema-evolution rule), and an old node may send a word a new cloud does not know — so a
member compares equal to, and encodes as, its plain string.

The one DP sensitivity constant lives here too: both the edge (which adds the noise) and the
cloud (whose drift null allows for it) must agree on it.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "DP_SENSITIVITY",
    "RETRYABLE_CODES",
    "BundleCode",
    "ConfigRolloutStatus",
    "DriftKind",
    "DriftReference",
    "DriftSignal",
    "NodeEvent",
    "RolloutEventState",
    "RolloutStatus",
]

#: Counts one inference changes under differential privacy, each by one: its class, one bin of
#: each of the three histograms, one feedback cell. The edge draws noise with
#: ``alpha = exp(-epsilon / DP_SENSITIVITY)``; the cloud's drift null allows for that noise.
DP_SENSITIVITY = 5


class BundleCode(StrEnum):
    """``BundleError.code`` and ``RefreshResult.code``: why a bundle was refused."""

    INVALID = "invalid"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    #: Signed by a key the fleet's key list retired (no new installs) or marked compromised.
    REVOKED_KEY = "revoked_key"
    HASH_MISMATCH = "hash_mismatch"
    TRUNCATED = "truncated"
    LOAD_FAILED = "load_failed"
    SMOKE_FAILED = "smoke_failed"
    NON_FINITE_OUTPUT = "non_finite_output"
    INCOMPATIBLE = "incompatible"
    TOO_LARGE = "too_large"
    DOWNLOAD_FAILED = "download_failed"
    NO_PREVIOUS = "no_previous"


#: Codes worth trying again later: the bundle may be fine, the way to it was not.
RETRYABLE_CODES = frozenset({BundleCode.DOWNLOAD_FAILED})


class NodeEvent(StrEnum):
    """``NodeStatus.event``: why a node sent a status."""

    CONNECT = "connect"
    PERIODIC = "periodic"
    MODEL_INSTALLED = "model_installed"
    MODEL_REJECTED = "model_rejected"
    ROLLBACK = "rollback"
    SHUTDOWN = "shutdown"
    #: A model served side by side was unloaded: its per-model assignment keys were deleted.
    MODEL_REMOVED = "model_removed"
    #: Pushed fleet configuration (``shared.fleetconfig``): taken, refused, undone.
    CONFIG_APPLIED = "config_applied"
    CONFIG_REJECTED = "config_rejected"
    CONFIG_ROLLED_BACK = "config_rolled_back"
    #: A newer signed key list was accepted (``NodeStatus.key_list_version``).
    KEYS_UPDATED = "keys_updated"
    #: A key list was refused (bad signature, older version...): ``last_error`` says why.
    KEYS_REFUSED = "keys_refused"
    #: A model's signer became compromised: the node fell back to a version whose signer is
    #: still trusted, or stopped serving it (``last_error`` says which). Not a safety
    #: rollback: pushed configuration is not blamed for it.
    KEYS_FALLBACK = "keys_fallback"


class RolloutStatus(StrEnum):
    """Where a rollout stands (its stored state)."""

    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class ConfigRolloutStatus(StrEnum):
    """Where a staged fleet-configuration rollout stands (``cloud.fleetconfig.rollout``)."""

    RUNNING = "running"
    COMPLETED = "completed"
    #: A node refused the version or rolled it back: the rollout waits for the operator.
    HALTED = "halted"


class RolloutEventState(StrEnum):
    """``RolloutEvent.state``: what just happened to a rollout."""

    STARTED = "started"
    STAGE_STARTED = "stage_started"
    STAGE_PASSED = "stage_passed"
    GATE_FAILED = "gate_failed"
    ROLLED_BACK = "rolled_back"
    COMPLETED = "completed"
    PAUSED = "paused"
    RESUMED = "resumed"
    ABORTED = "aborted"
    NODE_ROLLBACK = "node_rollback"  #: a node left the version on its own
    NODE_FAILED = "node_failed"  #: a node refused the bundle


class DriftSignal(StrEnum):
    """``DriftEvent.signal``: which distribution moved."""

    CLASS_PRIOR = "class_prior"
    CONFIDENCE = "confidence"
    INPUT_LENGTH = "input_length"
    LATENCY = "latency"
    ERROR_RATE = "error_rate"
    ACCURACY = "accuracy"
    #: Out-of-scope shares (``TelemetryAggregate.out_of_scope``): top probability below the
    #: manifest's threshold; a letter outside the training scripts; an unknown token.
    OOS_LOW_CONFIDENCE = "oos_low_confidence"
    OOS_FOREIGN_SCRIPT = "oos_foreign_script"
    #: Tokenizer models: the share of inferences with a token the tokenizer does not know.
    OOS_UNKNOWN_TOKEN = "oos_unknown_token"
    #: Embedding models (``TelemetryAggregate.embedding``): the histograms of the served
    #: embeddings' projections on the manifest's fixed directions, all directions' bins as
    #: one count vector; and the histogram of their norms before normalisation.
    EMBEDDING_PROJECTION = "embedding_projection"
    EMBEDDING_NORM = "embedding_norm"
    #: Generation models (``TelemetryAggregate.generation``): the output-token histogram, the
    #: share of empty answers and the share of answers in a declared refusal category (both
    #: one-sided). Their prompt likelihood is ``confidence``, their stop reasons ``class_prior``,
    #: their time to first token ``latency``.
    OUTPUT_TOKENS = "output_tokens"
    EMPTY_OUTPUT = "empty_output"
    REFUSAL = "refusal"


class DriftKind(StrEnum):
    """``DriftEvent.kind``: what an event on a drift subject reports (issue 14)."""

    #: A change against the reference (the default for senders older than ``kind``).
    DRIFT = "drift"
    #: The first windows of a model version differ from its manifest's reference: reported
    #: once per version, never acted on. Its ``signal`` is the signal that differs most.
    SKEW = "skew"
    #: A production baseline was accepted (automatic or by an analyst); the event's
    #: ``signal`` is ``"baseline"`` too, as it concerns no single signal.
    BASELINE = "baseline"


class DriftReference(StrEnum):
    """``DriftEvent.reference``: what a window was compared with."""

    MANIFEST = "manifest"  #: the bundle's held-out profile
    FIRST_WINDOWS = "first_windows"  #: the first rounds of fleet traffic (state before issue 14)
    NODE_BASELINE = "node_baseline"  #: the node's own first tested windows
    #: A fleet's production baseline is named ``baseline:<id>`` (``auto-<n>``, ``analyst-<n>``).
    BASELINE_PREFIX = "baseline:"
