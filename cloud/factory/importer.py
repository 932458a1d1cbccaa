"""Bring your own model: ``slmops models import`` turns an ONNX model and its HF
``tokenizer.json`` into a signed slmops bundle, after checking that they fit together and fit
the runtime, and measures the reference profile and smoke tests on held-out data.

Checks, each a one-line ``ImportRefused`` naming the file, the model input/output or the data
line: the model loads; every model input is one the tokenizer produces (``input_ids``,
``attention_mask``, ``token_type_ids``), integer, [batch, tokens] with a dynamic token axis
(the runtime pads to the longest text); the tokenizer's vocabulary fits the model's embedding
table; the output read is [batch, k] with k = the number of labels (classification); every
held-out line is a JSON object with a ``text`` (and, for classification, a ``label`` among the
labels); the model gives finite values for every held-out text.

Whether the output holds probabilities or logits is measured, not guessed from its name: rows
that are all in [0, 1] and sum to 1 are probabilities, anything else logits (softmax applied
by the runtime). External weight files the model references are shipped as "data" files.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.embedding import embedding_histograms, embedding_stats
from slmops.cloud.factory.profile import DEFAULT_EDGES, reference_profile, smoke_tests
from slmops.shared.bundle import Bundle, FileData, TrustStore, read_bundle, write_bundle
from slmops.shared.errors import BundleError
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    EmbeddingHistograms,
    EmbeddingStats,
    HistogramEdges,
    ModelManifest,
    Preprocessing,
    ReferenceProfile,
    SmokeTest,
    TensorSpec,
)
from slmops.shared.names import validate_model_name
from slmops.shared.preprocess import TOKEN_ROLES
from slmops.shared.runtime import Session, load_session, verify_bundle

__all__ = ["TOKEN_EDGES", "HeldOut", "ImportRefused", "ImportReport", "import_model", "read_held_out"]

#: Histogram edges of an imported model's aggregates; input lengths in tokens.
TOKEN_EDGES = HistogramEdges(
    confidence=DEFAULT_EDGES.confidence,
    input_length=[0, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1_000_000],
    latency_ms=[0, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 1_000_000],
)
_INT = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


class ImportRefused(ValueError):
    """The model, tokenizer or data do not fit; the message is one line naming what."""


@dataclass(frozen=True)
class HeldOut:
    texts: list[str]
    #: Label per text ("" where a line has none: embedding models).
    labels: list[str]
    #: 1-based line number of each text in the file.
    lines: list[int]


@dataclass(frozen=True)
class ImportReport:
    bundle: Bundle
    output: str
    output_kind: str
    inputs: dict[str, str]
    accuracy: float | None
    held_out: int


def read_held_out(path: Path, labels: list[str] | None) -> HeldOut:
    """``{"text": ..., "label": ...}`` lines (blank lines skipped). With ``labels`` every line
    needs a label among them; without (embedding), a label is optional."""
    texts: list[str] = []
    found: list[str] = []
    lines: list[int] = []
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"{path.name}: cannot read it: {exc}") from exc
    for n, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ImportRefused(f"{where}: not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise ImportRefused(f'{where}: expected a JSON object with "text", got {type(obj).__name__}')
        text = obj.get("text")
        if not isinstance(text, str):
            raise ImportRefused(f'{where}: "text" must be a string, got {type(text).__name__}')
        label = obj.get("label")
        if labels is not None:
            if not isinstance(label, str):
                raise ImportRefused(f'{where}: "label" is missing or not a string (classification needs one)')
            if label not in labels:
                raise ImportRefused(f"{where}: label {label!r} is not one of --labels {labels}")
        elif label is not None and not isinstance(label, str):
            raise ImportRefused(f'{where}: "label" must be a string when given')
        texts.append(text)
        found.append(label or "")
        lines.append(n)
    if not texts:
        raise ImportRefused(f"{path.name}: no held-out lines")
    return HeldOut(texts, found, lines)


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _check_inputs(model: onnx.ModelProto, onnx_name: str) -> dict[str, str]:
    """Graph inputs (initializers excluded) -> their role; refuses what the tokenizer cannot feed."""
    inits = {i.name for i in model.graph.initializer}
    roles: dict[str, str] = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        where = f"{onnx_name}: input {value.name!r}"
        if value.name not in TOKEN_ROLES:
            raise ImportRefused(
                f"{where} is not one the tokenizer produces ({', '.join(TOKEN_ROLES)}); rename it at export"
            )
        elem = value.type.tensor_type.elem_type
        if elem not in _INT:
            name = onnx.TensorProto.DataType.Name(elem)
            raise ImportRefused(f"{where} is {name}, the tokenizer produces int64 token ids")
        shape = _shape(value)
        if len(shape) != 2:
            raise ImportRefused(f"{where} has shape {shape}, expected [batch, tokens]")
        if isinstance(shape[1], int) and shape[1] > 0:
            raise ImportRefused(
                f"{where} has a fixed length of {shape[1]} tokens; the runtime pads each batch to its "
                "longest text: export with a dynamic token axis"
            )
        roles[value.name] = value.name
    if "input_ids" not in roles:
        raise ImportRefused(f"{onnx_name}: the model has no input 'input_ids' (inputs: {sorted(roles)})")
    return roles


def _embedding_rows(model: onnx.ModelProto) -> int | None:
    """Rows of the embedding table ``input_ids`` indexes (a Gather on an initializer), if found."""
    inits = {i.name: i for i in model.graph.initializer}
    frontier = {"input_ids"}
    for node in model.graph.node:  # follow casts/reshapes of the ids to the first Gather
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in frontier:
            table = inits.get(node.input[0])
            return int(table.dims[0]) if table is not None and table.dims else None
        if (
            node.op_type in ("Cast", "Reshape", "Unsqueeze", "Identity")
            and node.input
            and node.input[0] in frontier
        ):
            frontier.update(node.output)
    return None


def _external_files(model: onnx.ModelProto, onnx_path: Path) -> list[str]:
    """Relative paths of external weight files the model references (shipped as "data")."""
    found: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is None:
                raise ImportRefused(
                    f"{onnx_path.name}: initializer {t.name!r} is external without a location"
                )
            if not (onnx_path.parent / loc).is_file():
                raise ImportRefused(f"{onnx_path.name}: external weights {loc!r} not found next to the model")
            found.add(loc)
    return sorted(found)


def _output_kind(values: np.ndarray) -> str:
    with np.errstate(all="ignore"):
        in_range = bool(np.all(values >= -1e-6) and np.all(values <= 1 + 1e-6))
        sums = np.abs(values.sum(axis=1) - 1.0)
    return "probs" if in_range and bool(np.all(sums < 1e-3)) else "logits"


def _first_bad_line(session: Session, held: HeldOut, onnx_name: str, output: str, data_name: str) -> None:
    """Refuse naming the first held-out line whose output is not finite."""
    for start in range(0, len(held.texts), 64):
        chunk = held.texts[start : start + 64]
        ok = session.run(chunk).ok
        for k, good in enumerate(ok.tolist()):
            if not good:
                line = held.lines[start + k]
                raise ImportRefused(
                    f"{data_name} line {line}: {onnx_name} output {output!r} is not finite for this text"
                )


def _embedding_reference(
    session: Session, held: HeldOut, edges: HistogramEdges
) -> tuple[ReferenceProfile, EmbeddingStats]:
    out = session.run(held.texts)
    assert out.norms is not None
    stats = embedding_stats(out.values, out.norms)
    projections, norm = embedding_histograms(stats, out.values, out.norms)
    counts: dict[str, int] = {}
    for label in held.labels:
        if label:
            counts[label] = counts.get(label, 0) + 1
    profile = ReferenceProfile(
        count=len(held.texts),
        class_counts=dict(sorted(counts.items())),
        confidence=Histogram.empty(edges.confidence),
        input_length=Histogram.of(edges.input_length, out.lengths),
        source="held-out (embedding)",
        embedding=EmbeddingHistograms(projections=projections, norm=norm),
    )
    return profile, stats


#: Smoke-test tolerance on output values: float graphs repeat to ~1e-6; a quantized graph
#: (dynamic int8: the activation scale is the batch's, and int8 kernels round differently on
#: CPUs without the instructions used here) moved a probability by 1.1e-3 between the batched
#: profile and the node's one-text check on the factory's own int8-l3 (the factory's bound).
FLOAT_TOLERANCE = 1e-3
QUANTIZED_TOLERANCE = 5e-2


def _smoke_tolerance(model: onnx.ModelProto) -> float:
    """``QUANTIZED_TOLERANCE`` for a graph with integer/quantize operators, else
    ``FLOAT_TOLERANCE``."""
    quantized = any("Integer" in n.op_type or "QuantizeLinear" in n.op_type for n in model.graph.node)
    return QUANTIZED_TOLERANCE if quantized else FLOAT_TOLERANCE


def _embedding_smoke(session: Session, texts: list[str], tolerance: float) -> list[SmokeTest]:
    chosen = texts[:4]
    out = session.run(chosen)
    return [
        SmokeTest(text=t, label="", probs=[round(float(x), 6) for x in v], tolerance=tolerance)
        for t, v in zip(chosen, out.values, strict=True)
    ]


def import_model(
    *,
    onnx_path: Path,
    tokenizer_path: Path,
    data_path: Path,
    name: str,
    version: int,
    key: Ed25519PrivateKey,
    out_dir: Path,
    labels: list[str] | None = None,
    task: str = "classification",
    output: str = "",
    max_tokens: int = 128,
    min_memory_mb: int = 0,
    edges: HistogramEdges = TOKEN_EDGES,
    created: datetime | None = None,
) -> ImportReport:
    """Check, profile, sign and write the bundle into ``out_dir`` (must be empty or absent).
    Raises ``ImportRefused`` (one line naming file, input/output or line) for every mismatch."""
    validate_model_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ImportRefused(f"--version must be a positive integer, got {version!r}")
    if task not in ("classification", "embedding"):
        raise ImportRefused(f"--task {task!r}: use classification (with --labels) or embedding")
    if task == "classification":
        if not labels:
            raise ImportRefused("give --labels a,b,c (classification) or --task embedding")
        if len(set(labels)) != len(labels) or any(not x for x in labels):
            raise ImportRefused(f"--labels must be distinct and non-empty, got {labels}")
    elif labels:
        raise ImportRefused("--labels and --task embedding exclude each other")
    if max_tokens < 1:
        raise ImportRefused(f"--max-tokens must be >= 1, got {max_tokens}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ImportRefused(f"output directory {str(out_dir)!r} is not empty")
    onnx_name = onnx_path.name
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ImportRefused(f"{onnx_name}: not a readable ONNX model: {exc}") from exc
    inputs = _check_inputs(model, onnx_name)
    outputs = [o.name for o in model.graph.output]
    chosen = output or (outputs[0] if outputs else "")
    if chosen not in outputs:
        raise ImportRefused(f"{onnx_name}: no output {chosen!r} (outputs: {outputs})")
    out_shape = _shape(next(o for o in model.graph.output if o.name == chosen))
    if len(out_shape) != 2:
        hint = (
            " (a [batch, tokens, dim] output: export the pooled [batch, dim] one)"
            if len(out_shape) == 3
            else ""
        )
        raise ImportRefused(
            f"{onnx_name}: output {chosen!r} has shape {out_shape}, expected [batch, k]{hint}"
        )
    if task == "classification" and labels and isinstance(out_shape[1], int) and out_shape[1] != len(labels):
        raise ImportRefused(
            f"{onnx_name}: output {chosen!r} has {out_shape[1]} values per text, --labels gives {len(labels)}"
        )
    try:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # the library raises a bare Exception for a bad file
        raise ImportRefused(f"{tokenizer_path.name}: not a readable tokenizers file: {exc}") from exc
    rows = _embedding_rows(model)
    if rows is not None and vocab > rows:
        raise ImportRefused(
            f"{tokenizer_path.name}: vocabulary of {vocab} tokens, but {onnx_name} input 'input_ids' "
            f"indexes an embedding table of {rows} rows (a different model's tokenizer?)"
        )
    held = read_held_out(data_path, labels if task == "classification" else None)
    data_files = _external_files(model, onnx_path)

    files = [
        FileData("model.onnx", onnx_path, "model"),
        FileData("tokenizer.json", tokenizer_path, "tokenizer"),
    ]
    files += [FileData(p, onnx_path.parent / p, "data") for p in data_files]
    pp = Preprocessing(
        kind="tokenizer", max_tokens=max_tokens, tokenizer="tokenizer.json", input_names=inputs
    )
    specs = [
        TensorSpec(name=v.name, dtype=_INT[v.type.tensor_type.elem_type], shape=["N", "T"])
        for v in model.graph.input
        if v.name in inputs
    ]
    k: int | str = out_shape[1] if isinstance(out_shape[1], int) and out_shape[1] > 0 else "K"
    manifest = ModelManifest(
        name=name,
        version=version,
        sha256="",
        size_bytes=0,
        inputs=specs,
        outputs=[TensorSpec(name=chosen, dtype="float32", shape=["N", k])],
        preprocessing=pp,
        labels=list(labels or []),
        edges=edges,
        min_memory_mb=min_memory_mb,
        created=created or datetime.now(UTC),
        notes=f"imported from {onnx_name} + {tokenizer_path.name}; held-out {len(held.texts)} texts",
        task=task,
        output=chosen,
        output_kind="embedding" if task == "embedding" else "probs",
    )
    with tempfile.TemporaryDirectory(prefix="slmops-import-") as tmp:
        work = write_bundle(Path(tmp) / "b", files, manifest, key)
        try:
            session = load_session(work)
        except BundleError as exc:
            raise ImportRefused(f"{onnx_name}: {exc.reason}") from exc
        try:
            session.run(["word " * (2 * max_tokens)])
        except Exception as exc:  # ORT raises several unrelated types
            first = str(exc).splitlines()[0][:200]
            raise ImportRefused(
                f"{onnx_name} fails on a text of {max_tokens} tokens (--max-tokens): {first}; "
                "give a --max-tokens the model supports"
            ) from exc
        probe = session.run(held.texts[:64])
        if task == "classification" and probe.values.shape[1] != len(labels or []):
            raise ImportRefused(
                f"{onnx_name}: output {chosen!r} gives {probe.values.shape[1]} values per text, "
                f"--labels gives {len(labels or [])}"
            )
        if task == "classification":
            finite = probe.values[probe.ok]
            kind = _output_kind(finite) if len(finite) else "logits"
            manifest = msgspec.structs.replace(manifest, output_kind=kind)
            session = load_session(write_bundle(Path(tmp) / "b", files, manifest, key))
        _first_bad_line(session, held, onnx_name, chosen, data_path.name)
        try:
            session.smoke_test()  # the hostile inputs every node will try
        except BundleError as exc:
            raise ImportRefused(f"{onnx_name}: {exc.reason}") from exc
        if task == "classification":
            assert labels is not None
            index = {label: i for i, label in enumerate(labels)}
            profile = reference_profile(session, held.texts, [index[x] for x in held.labels], edges)
            smoke = smoke_tests(session, held.texts, tolerance=_smoke_tolerance(model))
        else:
            profile, stats = _embedding_reference(session, held, edges)
            smoke = _embedding_smoke(session, held.texts, _smoke_tolerance(model))
            manifest = msgspec.structs.replace(manifest, embedding=stats)
    manifest = msgspec.structs.replace(manifest, reference=profile, smoke_tests=smoke)
    bundle = write_bundle(out_dir, files, manifest, key)
    try:
        verify_bundle(read_bundle(out_dir), TrustStore([key.public_key()]))
    except BundleError as exc:
        raise ImportRefused(
            f"{onnx_name}: the written bundle fails verification [{exc.code}]: {exc.reason}"
        ) from exc
    return ImportReport(
        bundle=bundle,
        output=chosen,
        output_kind=manifest.output_kind,
        inputs=inputs,
        accuracy=profile.accuracy,
        held_out=len(held.texts),
    )
