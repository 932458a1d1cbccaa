"""The wire messages: msgspec Structs, encoded as maps with named fields.

Rules (docs/architecture.md §4): every message carries ``v`` (schema version); new fields get defaults and a
field never changes type; wire messages accept unknown fields so old and new nodes live side by
side. Telemetry travels as msgpack, everything meant for people and other languages as JSON.
Encoders and decoders are built once here and reused.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal, TypeVar

import msgspec

from slmops.shared.histogram import Histogram
from slmops.shared.vocabulary import DP_SENSITIVITY

__all__ = [
    "OOS_CELLS",
    "OOS_FOREIGN_SCRIPT",
    "OOS_LOW_CONFIDENCE",
    "OOS_UNKNOWN_TOKEN",
    "STOP_REASONS",
    "WIRE_TYPES",
    "Assignment",
    "BundleFile",
    "BundleIndex",
    "DeviceProfile",
    "DriftEvent",
    "EmbeddingHistograms",
    "EmbeddingStats",
    "GenerationEdges",
    "GenerationHistograms",
    "GenerationQualityCase",
    "GenerationSmoke",
    "GenerationSpec",
    "HeldOutScores",
    "HistogramEdges",
    "ModelManifest",
    "ModelRef",
    "NodeStatus",
    "OpsEvent",
    "Optimization",
    "OutOfScopeSpec",
    "Preprocessing",
    "Privacy",
    "QualityScore",
    "ReferenceProfile",
    "Requirements",
    "RolloutEvent",
    "Signature",
    "SmokeTest",
    "TelemetryAggregate",
    "TensorSpec",
    "decode_each",
    "decode_json",
    "decode_telemetry",
    "encode_json",
    "encode_telemetry",
    "json_schemas",
]

SCHEMA_VERSION = 1


class Wire(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of wire messages: named-field maps, unknown fields ignored."""


class ModelRef(Wire, kw_only=True):
    name: str
    version: int
    variant: str = "fp32"


class Privacy(Wire, kw_only=True):
    """What the edge applied before publishing: k-anonymity bound and optional DP noise."""

    k: int
    epsilon: float | None = None
    #: "none" or "geometric" (two-sided geometric noise on every histogram and class count).
    mechanism: str = "none"
    #: Counts one inference changes (the noise is scaled to it): ``DP_SENSITIVITY`` (5)
    #: before out-of-scope counts, 6 with them. The default is what older senders meant.
    sensitivity: int = DP_SENSITIVITY


#: Out-of-scope signs an inference can show (bits of ``OOS_CELLS``): its top probability is
#: below the manifest's threshold; its text has a character outside the training scripts;
#: its tokens include the tokenizer's unknown token.
OOS_LOW_CONFIDENCE = 1
OOS_FOREIGN_SCRIPT = 2
OOS_UNKNOWN_TOKEN = 4
#: ``TelemetryAggregate.out_of_scope`` has one count per combination of the three signs.
OOS_CELLS = 8


class OutOfScopeSpec(Wire, kw_only=True):
    """How nodes count out-of-scope inputs of this model, and how often held-out data did.

    ``threshold``: an inference whose top probability is below it is "low confidence"; chosen
    on held-out data so that ``rate`` of it falls below. ``scripts``: the Unicode scripts of
    the training text (first word of a character's Unicode name: "LATIN", "CYRILLIC", "CJK",
    ...; digits, punctuation and symbols are never foreign). The shares are what held-out
    data showed (the signals' reference)."""

    threshold: float
    rate: float
    scripts: list[str] = []
    low_confidence_share: float
    foreign_script_share: float = 0.0
    unknown_token_share: float | None = None
    count: int


class EmbeddingHistograms(Wire, kw_only=True):
    """An embedding model's traffic, privacy-safe: per fixed direction of
    ``ModelManifest.embedding``, the histogram of the embeddings' projections on it, and the
    histogram of their norms before normalisation."""

    projections: list[Histogram]
    norm: Histogram


#: Why a generation ended (``GenerationHistograms.stop_reasons`` keys, and the class names a
#: generation model's aggregates count in ``class_counts``): the model's end-of-sequence token,
#: one of the request's stop strings, the new-token limit, the client went away, a failure.
STOP_REASONS: tuple[str, ...] = ("eos", "stop", "length", "cancelled", "error")


class GenerationHistograms(Wire, kw_only=True):
    """A generation model's traffic beyond the common histograms, privacy-safe (numbers only).

    For task "generation" the common fields mean: ``input_length`` = prompt tokens,
    ``latency_ms`` = time to first token, ``confidence`` = the prompt's likelihood under the
    model, exp(mean token log-likelihood) in (0, 1] (only the sampled requests:
    ``loglik_sampled`` of ``count``), ``class_counts`` = stop reasons (``STOP_REASONS``)."""

    output_tokens: Histogram
    tokens_per_s: Histogram
    #: Stop reason -> count, every reason of ``STOP_REASONS`` (errors included).
    stop_reasons: dict[str, int] = {}
    #: Answers with no visible text.
    empty: int = 0
    #: Declared refusal category (``GenerationSpec.refusals``) -> answers matching it.
    refusals: dict[str, int] = {}
    #: Requests whose prompt likelihood was computed (the ``confidence`` histogram's total).
    loglik_sampled: int = 0


class TelemetryAggregate(Wire, kw_only=True):
    """One window of one node's privacy-filtered inference statistics (msgpack)."""

    v: int = SCHEMA_VERSION
    fleet: str
    node: str
    model: ModelRef
    #: Per-node, monotonic from 1; with ``node`` it identifies the aggregate exactly once.
    seq: int
    window_start: datetime
    window_end: datetime
    #: Inferences in the window (exact, never noised: it is what fleet counts are built on).
    count: int
    errors: int = 0
    #: Predicted label -> count.
    class_counts: dict[str, int] = {}
    confidence: Histogram
    input_length: Histogram
    latency_ms: Histogram
    #: Ground truth from apps: true label -> predicted label -> count.
    feedback: dict[str, dict[str, int]] = {}
    privacy: Privacy
    #: How many original windows were merged into this one (outbox compaction, docs/architecture.md §5).
    windows: int = 1
    #: Loss receipt: inferences and aggregates the node could not keep (outbox full) or
    #: could not store (disk full/failing). Client-answered == counted + these receipts.
    dropped_inferences: int = 0
    dropped_aggregates: int = 0
    #: The node install (uuid4 hex, 32 chars) that numbered ``seq``: made once per data
    #: directory in the same SQLite database as ``seq``, so a wiped or quarantined database
    #: starts a new ``seq`` epoch. "" = an old node (the legacy epoch).
    install: str = ""
    #: Embedding models (``ModelManifest.embedding``): the served embeddings' statistics.
    #: None for classifiers and old nodes.
    embedding: EmbeddingHistograms | None = None
    #: Inferences per combination of out-of-scope signs (index = OR of the ``OOS_*`` bits,
    #: ``OOS_CELLS`` counts, DP-noised like the histograms); [] = not counted (an old node,
    #: or a model without ``ModelManifest.out_of_scope``).
    out_of_scope: list[int] = []
    #: Generation models: output tokens, tokens/s, stop reasons, empty answers, refusals.
    #: None for other models and old nodes.
    generation: GenerationHistograms | None = None


class DeviceProfile(Wire, kw_only=True):
    arch: str = ""
    os: str = ""
    cores: int = 0
    memory_mb: int = 0
    free_disk_mb: int = 0
    ort_version: str = ""
    providers: list[str] = []
    #: A name for a class of device, e.g. "gateway-small"; free text. A node configured with
    #: a device profile (``shared.profiles``) reports its name: the cloud assigns it the
    #: variant made for that profile (``slmops models optimize`` names it so).
    profile: str = ""
    #: The profile's budgets (0 = not stated): the serving process's peak RSS (MB) and p95
    #: latency as a multiple of L6 fp32's on the same host (``ProfileSpec``); the cloud's
    #: device-fit check compares a variant's measured figures with them.
    model_memory_mb: int = 0
    latency_factor: float = 0.0
    #: What this node's runtime can run (``shared.capabilities``): preprocessing kinds, tasks,
    #: "multi_file", and "runtime:<level>". Empty = an old node (n-gram classifiers only).
    capabilities: list[str] = []


class RefreshResult(Wire, kw_only=True):
    model: ModelRef
    ok: bool
    #: Machine-readable reason when not ok: bad_signature, unknown_key, hash_mismatch,
    #: truncated, load_failed, smoke_failed, incompatible, too_large, download_failed.
    code: str = ""
    reason: str = ""
    at: datetime | None = None


class QualityScore(Wire, kw_only=True):
    """A generation model's quality set (``GenerationSpec.quality``) as run on a node once
    after the model was installed: ``passed`` of ``total`` cases, greedy."""

    model: ModelRef
    passed: int
    total: int


class NodeStatus(Wire, kw_only=True):
    """A node's self-report (JSON), on connect and periodically."""

    v: int = SCHEMA_VERSION
    fleet: str
    node: str
    time: datetime
    #: "connect", "periodic", "model_installed", "model_rejected", "rollback", "shutdown".
    event: str = "periodic"
    device: DeviceProfile = msgspec.field(default_factory=DeviceProfile)
    model: ModelRef | None = None
    previous_model: ModelRef | None = None
    #: Every model the node serves side by side, default (``model``) first; [] from a
    #: single-model node (then ``model`` is all it serves).
    models: list[ModelRef] = msgspec.field(default_factory=list)
    #: The previous version of each model in ``models`` that has one (a rollout controller
    #: sees a side-by-side model the node rolled back on its own); [] from older nodes.
    previous_models: list[ModelRef] = msgspec.field(default_factory=list)
    outbox_depth: int = 0
    buffer_bytes: int = 0
    dropped_inferences: int = 0
    dropped_aggregates: int = 0
    served: int = 0
    last_seq: int = 0
    last_sync: datetime | None = None
    last_error: str | None = None
    refresh: RefreshResult | None = None
    #: The node install whose ``seq`` ``last_seq`` counts (see ``TelemetryAggregate.install``).
    install: str = ""
    #: "ok", or "degraded" while the node's disk fails (answers go on; what cannot be stored
    #: is counted in the loss receipt). "" = an old node that does not say.
    storage: str = ""
    #: File names of unreadable databases the node set aside (renamed) and replaced.
    quarantined: list[str] = []
    #: Pushed fleet configuration (``shared.fleetconfig``): the version in effect (None: only
    #: the node's own settings), and what happened to the last version it saw
    #: (``config_seen``): ``config_state`` "applied", "probation" (applied, being watched),
    #: "rejected" or "rolled_back" (with ``config_reason``); "" from a node that does not say.
    config_version: int | None = None
    config_seen: int | None = None
    config_state: str = ""
    config_reason: str | None = None
    #: What the node did not take as pushed: unknown keys of a newer schema, pinned keys, keys
    #: held at the node's privacy floor.
    config_warnings: list[str] = []
    #: Version of the signed key list the node holds (``shared.keylist``); 0 = none.
    key_list_version: int = 0
    #: Quality sets of the generation models it serves, once run ([] until then, and for
    #: models without one).
    quality: list[QualityScore] = []


class TensorSpec(Wire, kw_only=True):
    name: str
    dtype: str
    shape: list[int | str]


class Preprocessing(Wire, kw_only=True):
    """How text becomes model input; run by ``shared.preprocess`` at the edge and factory.

    ``kind`` is "hashed_ngrams" (``buckets``, n-gram settings) or "tokenizer" (the HF
    ``tokenizers`` file at bundle path ``tokenizer``, truncated at ``max_tokens``, padded to the
    longest text of each length-grouped micro-batch)."""

    kind: str = "hashed_ngrams"
    buckets: int = 4096
    #: Truncation length (n-gram features or tokens, special tokens included).
    max_tokens: int = 64
    #: Bundle path of the tokenizer file (kind "tokenizer").
    tokenizer: str = "tokenizer.json"
    #: Role ("input_ids", "attention_mask", "token_type_ids") -> graph input name (kind
    #: "tokenizer"); a role left out is not fed. Empty = the role names themselves, those the
    #: graph has.
    input_names: dict[str, str] = {}
    word_ngrams: list[int] = msgspec.field(default_factory=lambda: [1, 2])
    char_ngrams: list[int] = msgspec.field(default_factory=lambda: [3])
    lowercase: bool = True


class HistogramEdges(Wire, kw_only=True):
    """Bin edges every aggregate of a model uses, so aggregates merge by adding counts."""

    confidence: list[float]
    input_length: list[float]
    latency_ms: list[float]


class HeldOutScores(Wire, kw_only=True):
    """Per-example model outputs on the held-out set (numbers, never text), so the cloud can
    re-derive an exact reference after changing the model's priors (recalibration)."""

    #: True label index of each example.
    true: list[int]
    #: The model's probabilities for each example (rounded to 6 digits).
    probs: list[list[float]]
    #: Input length (tokens) of each example.
    lengths: list[int]


class ReferenceProfile(Wire, kw_only=True):
    """What the model's traffic looked like on held-out data (drift reference)."""

    count: int
    class_counts: dict[str, int]
    confidence: Histogram
    input_length: Histogram
    latency_ms: Histogram | None = None
    accuracy: float | None = None
    #: Held-out confusion: true label -> predicted label -> count (for BBSE).
    confusion: dict[str, dict[str, int]] = {}
    #: Class priors of the held-out data (true labels).
    priors: dict[str, float] = {}
    source: str = "held-out"
    held_out: HeldOutScores | None = None
    #: Embedding models: the held-out texts' projection and norm histograms (as in aggregates).
    embedding: EmbeddingHistograms | None = None


class SmokeTest(Wire, kw_only=True):
    text: str
    label: str
    probs: list[float]
    tolerance: float = 1e-3


class Signature(Wire, kw_only=True):
    key_id: str
    algorithm: str = "ed25519"
    #: Base64 of the signature over ``shared.bundle.canonical_bytes(manifest)``.
    value: str


class BundleFile(Wire, kw_only=True):
    """One file of a multi-file bundle; the manifest's signature covers its hash and size."""

    #: Relative path inside the bundle ("/"-separated, no "..", no leading "/").
    path: str
    sha256: str
    size_bytes: int
    #: "model", "head", "tokenizer" or "data" (e.g. external weights).
    role: str = ""


class Requirements(Wire, kw_only=True):
    """What a node must be able to do to run a bundle (matched against
    ``DeviceProfile.capabilities`` before assignment and before download)."""

    preprocessing: str = "hashed_ngrams"
    task: str = "classification"
    multi_file: bool = False
    #: Node runtime capability level: 1 = the n-gram-only runtime, 2 = this build.
    min_runtime: int = 1


class EmbeddingStats(Wire, kw_only=True):
    """What an embedding model's aggregates watch (privacy-safe: marginal histograms only):
    projections of the served, L2-normalised embeddings on a few fixed random unit
    ``directions`` ([k][dim], seeded, made at build/import time) binned by
    ``projection_edges`` (the same for each direction), and the embeddings' norms before
    normalisation binned by ``norm_edges``. Edges come from held-out quantiles."""

    directions: list[list[float]]
    projection_edges: list[float]
    norm_edges: list[float]


class GenerationEdges(Wire, kw_only=True):
    """Bin edges of ``GenerationHistograms`` (prompt tokens, TTFT and likelihood use
    ``ModelManifest.edges``: input_length, latency_ms, confidence)."""

    output_tokens: list[float]
    tokens_per_s: list[float]


class GenerationSmoke(Wire, kw_only=True):
    """A greedy smoke test: ``prompt`` as one user message through the chat template; the
    first ``k`` generated token ids must be ``token_ids`` (int4/int8 kernels differ across
    CPUs, so only a prefix is compared)."""

    prompt: str
    k: int
    token_ids: list[int]


class GenerationQualityCase(Wire, kw_only=True):
    """One case of a generation model's quality set: ``prompt`` (one user message through the
    chat template, greedy, at most ``max_new_tokens``) passes when the answer equals ``expect``
    (``match`` "exact": both stripped of surrounding whitespace) or contains it (``match``
    "contains": case-insensitive)."""

    prompt: str
    expect: str
    match: str = "contains"
    max_new_tokens: int = 32


class GenerationSpec(Wire, kw_only=True):
    """How a generation model (task "generation", an ONNX Runtime GenAI folder) is run and watched.

    Files: role "model" (the decoder), "data" (external weights), "genai_config" (the GenAI
    ``genai_config.json``), "tokenizer" (``tokenizer.json``, ``tokenizer_config.json``).
    Defaults apply when a request does not set them; requests may lower, never raise, the
    limits. ``temperature`` 0 is greedy."""

    genai_config: str = "genai_config.json"
    max_new_tokens: int = 128
    max_prompt_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = []
    #: Jinja chat template; "" = the tokenizer_config.json's own.
    chat_template: str = ""
    #: Declared refusal categories: name -> phrases, matched case-insensitively in the answer.
    refusals: dict[str, list[str]] = {}
    #: Share of requests (0-1) whose prompt log-likelihood is computed (a logits read of
    #: [prompt tokens x vocabulary] floats each).
    loglik_share: float = 0.25
    edges: GenerationEdges
    smoke: list[GenerationSmoke] = []
    #: The held-out prompts' generation statistics (the drift reference beside
    #: ``ModelManifest.reference``).
    reference: GenerationHistograms | None = None
    #: Held-out prompts the reference was computed from.
    reference_prompts: int = 0
    #: The optional quality set (exact match / containment): each node runs it once after
    #: installing the model and reports its score (``NodeStatus.quality``); a rollout with
    #: ``RolloutConfig.min_quality`` holds the canary nodes' score to that threshold.
    quality: list[GenerationQualityCase] = []


class BundleIndex(Wire, kw_only=True):
    """KV ``slmops_manifests`` ``_files.<name>.<version>.<variant>``: the few fields a node
    reads before it downloads a bundle (a few hundred bytes, unlike the manifest with its
    reference profile). Not trusted: the signed manifest, fetched by ``manifest_sha256`` from
    the object store (``files/<sha256>``), is what the node verifies before any other file."""

    v: int = SCHEMA_VERSION
    name: str
    version: int
    variant: str
    manifest_sha256: str
    manifest_size: int
    min_memory_mb: int = 0
    requires: Requirements | None = None
    #: Sum of the sizes of the files the manifest lists.
    files_bytes: int = 0


class Optimization(Wire, kw_only=True):
    """How a variant was made for a device profile by ``slmops models optimize``: the chain of
    passes applied to the teacher (the fp32 bundle it started from) and the figures measured
    on the written bundle. Latency and RSS were measured on the factory host pinned to the
    profile's cores and threads; ``latency_ratio`` is p95 (batch 1) over the teacher's p95 in
    the same run. Accuracies are on the held-out split (``held_out`` texts, seed ``seed``)."""

    profile: str
    candidate: str
    chain: list[str] = []
    teacher_sha256: str = ""
    seed: int = 0
    held_out: int = 0
    accuracy: float = 0.0
    teacher_accuracy: float = 0.0
    agreement: float = 0.0
    max_prob_gap: float = 0.0
    ece: float = 0.0
    latency_ratio: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    batch32_p50_ms: float = 0.0
    peak_rss_mb: float = 0.0
    size_bytes: int = 0
    gzip_bytes: int = 0
    notes: list[str] = []


class ModelManifest(Wire, kw_only=True):
    """Everything a node needs to trust, load, feed and watch a model.

    ``sha256``/``size_bytes`` describe ``model.onnx`` of a legacy single-file bundle (``files``
    empty); a multi-file bundle lists every file in ``files`` and repeats its "model" file's
    hash and size there for old readers."""

    v: int = SCHEMA_VERSION
    name: str
    version: int
    variant: str = "fp32"
    sha256: str
    size_bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: Preprocessing
    labels: list[str]
    edges: HistogramEdges
    reference: ReferenceProfile | None = None
    smoke_tests: list[SmokeTest] = []
    min_memory_mb: int = 0
    parent_version: int | None = None
    created: datetime
    notes: str = ""
    signature: Signature | None = None
    #: Every file of the bundle; empty = the legacy single-file bundle (``model.onnx``).
    files: list[BundleFile] = []
    #: "classification" (``labels``) or "embedding" (pooled, L2-normalised vector).
    task: str = "classification"
    #: Graph output to read (of the head when there is one); "" = the first graph output,
    #: except in a legacy single-file bundle, where it is the last manifest output ("probs").
    output: str = ""
    #: "probs", "logits" (softmax applied by the runtime) or "embedding".
    output_kind: str = "probs"
    requires: Requirements | None = None
    #: Embedding drift statistics (task "embedding").
    embedding: EmbeddingStats | None = None
    #: How nodes count out-of-scope inputs; None: they do not.
    out_of_scope: OutOfScopeSpec | None = None
    #: The device profile this variant was optimised for and how (None: not optimised).
    optimization: Optimization | None = None
    #: Task "generation": how the model is run and watched (None otherwise).
    generation: GenerationSpec | None = None

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, variant=self.variant)


class Assignment(Wire, kw_only=True):
    """KV ``slmops_assignments`` value: the model version a node (or whole fleet) should run."""

    v: int = SCHEMA_VERSION
    fleet: str
    node: str | None = None
    model: str
    version: int
    #: A fixed variant, or None: the node picks from ``variants`` by its device profile.
    variant: str | None = None
    variants: list[str] = msgspec.field(default_factory=lambda: ["fp32"])
    rollout: str | None = None
    assigned_at: datetime
    #: Set by ``slmops models yank`` when the yanked version had no earlier good one: nodes
    #: stop serving this model (their API answers 503 ``no_model`` naming this reason).
    withdrawn: str | None = None


DriftState = Literal["opened", "updated", "resolved"]


class DriftEvent(Wire, kw_only=True):
    """A drift finding for analysts (JSON on ``slmops.drift.<fleet>``)."""

    v: int = SCHEMA_VERSION
    id: str
    fleet: str
    scope: Literal["fleet", "node"]
    node: str | None = None
    model: ModelRef
    #: "class_prior", "confidence", "input_length", "latency", "error_rate", "accuracy".
    signal: str
    statistic: str
    value: float
    p_value: float | None = None
    evidence: float | None = None
    effect_size: float
    window_start: datetime
    window_end: datetime
    windows: int = 1
    state: DriftState
    severity: Literal["info", "warning", "critical"] = "warning"
    #: Reference tested against: "manifest", "baseline:<id>" (the fleet's production
    #: baseline), "first_windows" (no manifest, before a baseline existed) or "node_baseline".
    reference: str = "manifest"
    estimated_priors: dict[str, float] | None = None
    expected_accuracy: float | None = None
    suggested_action: str = ""
    proposed_version: int | None = None
    time: datetime
    #: "drift" (a change against the reference, the default for older senders), "skew" (the
    #: first windows of a model version differ from its manifest's reference: reported once,
    #: never acted on) or "baseline" (a production baseline was accepted: automatic or set by
    #: an analyst; ``reference`` names it, ``reference_start``/``reference_end`` its period).
    kind: str = "drift"
    #: One line for people, e.g. "class mix moved toward sports (+9 pts) since the baseline of
    #: 10:02–10:12".
    summary: str = ""
    #: Skew: signal -> effect (total-variation distance net of noise) against the manifest.
    differences: dict[str, float] = {}
    #: The period of the baseline named in ``reference`` (aggregate window times, UTC).
    reference_start: datetime | None = None
    reference_end: datetime | None = None
    #: The id of the still-open event of this unit and signal that this new episode follows
    #: (a further shift, larger or in another direction, while it was open).
    supersedes: str | None = None


class OpsEvent(Wire, kw_only=True):
    """An operational finding of the cloud about a node or a model (JSON on
    ``slmops.events.<fleet>``, stream ``SLMOPS_EVENTS``); drift findings stay ``DriftEvent``.

    ``kind``: "install_new" (a node started a new seq epoch: new or wiped data directory),
    "install_conflict" (two installs live on one node id), "cloned_device" (the same install
    and seq arrived with different content), "signal_quarantined" (a detector unit's state broke
    a test; ingest goes on, the unit is rebuilt later), "unregistered_model" (aggregates of a
    model the registry does not know: counted, not drift-tested), "seq_jump" (an aggregate's seq
    beyond ``max_seq_jump`` above its install's highest: dead-lettered, not counted as missing)."""

    v: int = SCHEMA_VERSION
    id: str
    fleet: str
    kind: str
    node: str | None = None
    install: str | None = None
    model: ModelRef | None = None
    signal: str | None = None
    detail: str = ""
    time: datetime


class RolloutEvent(Wire, kw_only=True):
    """A rollout's progress (JSON on ``slmops.rollout.<fleet>``)."""

    v: int = SCHEMA_VERSION
    rollout: str
    fleet: str
    model: str
    version: int
    previous_version: int | None = None
    #: "started", "stage_started", "stage_passed", "gate_failed", "rolled_back", "completed",
    #: "paused", "resumed", "aborted", "node_rollback" (a node left it on its own), "node_failed"
    #: (a node refused it: bundle rejected).
    state: str
    stage: int = 0
    percent: int = 0
    #: The nodes concerned, sorted; since issue 18 at most the first 100 of them (a stage of
    #: a large fleet would pass the stream's 256 KiB message limit): ``node_count`` says how
    #: many there are, and ``slmops rollout status`` / the rollout's KV state list them all.
    nodes: list[str] = []
    reason: str = ""
    gates: dict[str, Any] = {}
    time: datetime
    #: How many nodes the event concerns (None: an event from before issue 18, whose
    #: ``nodes`` lists them all).
    node_count: int | None = None


WIRE_TYPES: tuple[type[Wire], ...] = (
    TelemetryAggregate,
    OpsEvent,
    NodeStatus,
    DriftEvent,
    RolloutEvent,
    ModelManifest,
    Assignment,
)

_msgpack_encoder = msgspec.msgpack.Encoder()
_telemetry_decoder = msgspec.msgpack.Decoder(TelemetryAggregate)
_json_encoder = msgspec.json.Encoder()
_json_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {t: msgspec.json.Decoder(t) for t in WIRE_TYPES}

T = TypeVar("T", bound=Wire)


def encode_telemetry(msg: TelemetryAggregate) -> bytes:
    return _msgpack_encoder.encode(msg)


def decode_telemetry(data: bytes) -> TelemetryAggregate:
    """Decode one aggregate; raises ``msgspec.ValidationError``/``DecodeError`` (with a path),
    also for input nested too deeply to decode (msgspec raises ``RecursionError`` there)."""
    try:
        return _telemetry_decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError("input nested too deeply to decode") from None


def encode_json(msg: Wire) -> bytes:
    return _json_encoder.encode(msg)


def decode_json(data: bytes, type_: type[T]) -> T:
    decoder = _json_decoders.get(type_)
    if decoder is None:
        decoder = _json_decoders[type_] = msgspec.json.Decoder(type_)
    try:
        result: T = decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError("input nested too deeply to decode") from None
    return result


def decode_each(values: Iterable[bytes], type_: type[T]) -> list[T]:
    """``decode_json`` of each of ``values``, leaving out those that do not decode (a stored
    value written by a newer or broken writer must not hide the others)."""
    out: list[T] = []
    for value in values:
        try:
            out.append(decode_json(value, type_))
        except msgspec.DecodeError:
            continue
    return out


def json_schemas() -> dict[str, Any]:
    """The JSON Schema of every wire message, keyed by message name (``slmops schema``)."""
    schemas, components = msgspec.json.schema_components(WIRE_TYPES, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "slmops wire messages",
        "schema_version": SCHEMA_VERSION,
        "messages": {t.__name__: s for t, s in zip(WIRE_TYPES, schemas, strict=True)},
        "$defs": components,
    }
