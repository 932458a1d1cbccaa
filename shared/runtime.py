"""Running a bundle's model with ONNX Runtime: session creation, batched prediction through the
manifest's preprocessing, output binding, smoke tests, and the one bundle verification that
both ``slmops models push`` and the edge use (``verify_bundle``).

Binding comes from the manifest, never from constants:

- preprocessing ``hashed_ngrams`` feeds ``ids``/``weights``; ``tokenizer`` feeds the graph
  inputs ``Preprocessing.input_names`` maps (default: the roles the graph has by name). Texts
  are grouped by token length into micro-batches, each padded to its own longest text, so one
  long text does not pad a batch of short ones.
- a bundle with a "head" file runs the "model" file (the encoder, output ``embedding``
  [batch, dim]) and feeds that to the head's input.
- the output read is ``ModelManifest.output`` of the last graph; ``output_kind`` "logits" is
  turned into probabilities (softmax), "probs" used as is, "embedding" L2-normalised.

A row with a non-finite value (NaN, inf) is not an answer: ``Outputs.ok`` is False for it and
the edge reports it as an inference error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from slmops.shared.bundle import Bundle, TrustStore, check_files
from slmops.shared.capabilities import CAPABILITIES, requirements_of, unmet
from slmops.shared.errors import BundleError
from slmops.shared.generation import GenerationSession, load_generation
from slmops.shared.messages import EmbeddingStats, ModelManifest
from slmops.shared.preprocess import TOKEN_ROLES, TokenizerFeaturizer, featurize
from slmops.shared.vocabulary import BundleCode

__all__ = ["HOSTILE_TEXTS", "Outputs", "Prediction", "Session", "load_session", "verify_bundle"]

#: Inputs every bundle must answer with finite numbers before it is accepted (fault 7):
#: empty, whitespace, very long, non-Latin scripts, emoji, control characters.
HOSTILE_TEXTS: tuple[str, ...] = (
    "",
    "   \t\n ",
    "word " * 2000,
    "日本語のテキストです",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "😀🔥👍🏽 🚀",
    "\x00\x01\x7f",
)
_OUTPUT_KINDS = ("probs", "logits", "embedding")
_TASKS = ("classification", "embedding")
_INT_TYPES: dict[str, type[np.integer]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class Prediction(msgspec.Struct, frozen=True):
    label: str
    index: int
    confidence: float
    probs: list[float]
    input_length: int


@dataclass(slots=True, eq=False)
class Outputs:
    """One batch's results, in input order: ``values`` float32 [n, k] (probabilities, or
    L2-normalised embeddings), ``ok`` bool [n] (False: the model gave a non-finite value for
    that text), ``lengths`` (input length per text, in tokens or n-gram tokens) and, for
    embeddings, ``norms`` [n] before normalisation; ``unknown``: for tokenizer models whose
    tokenizer has an unknown token, how many of each text's tokens are it (None otherwise)."""

    values: npt.NDArray[np.float32]
    ok: npt.NDArray[np.bool_]
    lengths: list[int]
    norms: npt.NDArray[np.float32] | None = None
    unknown: list[int] | None = None


def _softmax(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with np.errstate(all="ignore"):
        z = x - x.max(axis=1, keepdims=True)
        e = np.exp(z)
        out: npt.NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)
        return out


def _length_groups(lengths: Sequence[int], *, slack: float = 1.5, extra: int = 4) -> list[list[int]]:
    """Indices grouped by length: sorted, a new group whenever a text is longer than
    ``slack`` × the group's shortest + ``extra`` tokens (bounds the padding per group)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= slack * lengths[groups[-1][0]] + extra:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Session:
    """ONNX Runtime session(s) bound to a manifest. ``run``/``probs``/``predict`` are
    thread-safe (ORT's ``run`` and the tokenizer's encoding are) and meant for a worker
    thread. Built by ``load_session``."""

    def __init__(
        self,
        session: ort.InferenceSession,
        manifest: ModelManifest,
        *,
        head: ort.InferenceSession | None = None,
        tokenizer: TokenizerFeaturizer | None = None,
        output: str = "",
        encoder_output: str = "",
    ) -> None:
        self.ort = session
        self.head = head
        self.manifest = manifest
        self.tokenizer = tokenizer
        last = head if head is not None else session
        if output:
            self.output_name = output
        elif not manifest.files and manifest.outputs:
            self.output_name = manifest.outputs[-1].name  # legacy single-file bundles: "probs"
        else:
            self.output_name = last.get_outputs()[0].name
        self._encoder_output = encoder_output
        self._head_input = head.get_inputs()[0].name if head is not None else ""
        self.kind = manifest.output_kind

    @property
    def task(self) -> str:
        return self.manifest.task

    def _graph(self, feeds: dict[str, npt.NDArray[np.generic]]) -> npt.NDArray[np.float32]:
        if self.head is None:
            (out,) = self.ort.run([self.output_name], feeds)
        else:
            (emb,) = self.ort.run([self._encoder_output], feeds)
            (out,) = self.head.run([self.output_name], {self._head_input: np.asarray(emb, dtype=np.float32)})
        arr = np.asarray(out, dtype=np.float32)
        if arr.ndim != 2:
            raise ValueError(f"output {self.output_name!r} has shape {list(arr.shape)}, expected [batch, k]")
        return arr

    def _raw(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.float32], list[int], list[int] | None]:
        if self.tokenizer is None:
            feats = featurize(texts, self.manifest.preprocessing)
            return self._graph(feats.feeds()), feats.lengths, None
        rows = self.tokenizer.encode(texts)
        parts: list[tuple[list[int], npt.NDArray[np.float32]]] = []
        for group in _length_groups(rows.lengths):
            parts.append((group, self._graph(self.tokenizer.feeds(rows, group))))
        width = parts[0][1].shape[1] if parts else 0
        out = np.empty((len(texts), width), dtype=np.float32)
        for group, values in parts:
            out[group] = values
        return out, rows.lengths, rows.unknown if self.tokenizer.unk_id is not None else None

    def run(self, texts: Sequence[str]) -> Outputs:
        """Run ``texts`` (any number) and bind the output as the manifest says."""
        raw, lengths, unknown = self._raw(texts)
        with np.errstate(all="ignore"):
            if self.kind == "logits":
                values = _softmax(raw)
                norms = None
            elif self.kind == "embedding":
                norms = np.linalg.norm(raw, axis=1).astype(np.float32)
                values = (raw / np.maximum(norms, 1e-12)[:, None]).astype(np.float32)
            else:
                values, norms = raw, None
            ok: npt.NDArray[np.bool_] = np.asarray(
                np.isfinite(values).all(axis=1) & np.isfinite(raw).all(axis=1)
            )
        return Outputs(values, ok, lengths, norms, unknown)

    def probs(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.float32], list[int]]:
        """Probabilities [n, labels] and input lengths (rows may hold NaN: see ``run``)."""
        out = self.run(texts)
        return out.values, out.lengths

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """One ``Prediction`` per text (classification). Raises ``ValueError`` naming the
        texts for which the model gave non-finite values."""
        out = self.run(texts)
        bad = [i for i, good in enumerate(out.ok.tolist()) if not good]
        if bad:
            raise ValueError(f"model gave non-finite outputs for texts {bad}")
        probs = out.values
        idx = probs.argmax(axis=1)
        labels = self.manifest.labels
        return [
            Prediction(
                label=labels[int(i)] if labels else "",
                index=int(i),
                confidence=float(p[i]),
                probs=p.tolist(),
                input_length=n,
            )
            for i, p, n in zip(idx, probs, out.lengths, strict=True)
        ]

    def smoke_test(self) -> float:
        """Run the manifest's smoke tests, then ``HOSTILE_TEXTS`` (each must give finite
        values); raise ``BundleError(code='smoke_failed')`` on a mismatch. Returns the seconds
        the smoke-test batch took (for the device-fit check)."""
        tests = self.manifest.smoke_tests
        name = self.manifest.name
        took = 0.0
        if tests:
            t0 = time.perf_counter()
            out = self.run([t.text for t in tests])
            took = time.perf_counter() - t0
            for k, t in enumerate(tests):
                if not out.ok[k]:
                    raise BundleError(
                        name, f"smoke test {t.text!r}: non-finite output", BundleCode.SMOKE_FAILED
                    )
                got = out.values[k]
                if self.task == "classification":
                    label = self.manifest.labels[int(got.argmax())]
                    if label != t.label:
                        raise BundleError(
                            name,
                            f"smoke test {t.text!r}: expected {t.label!r}, got {label!r}",
                            BundleCode.SMOKE_FAILED,
                        )
                if t.probs and len(t.probs) != len(got):
                    raise BundleError(
                        name,
                        f"smoke test {t.text!r}: {len(t.probs)} expected values, model gives {len(got)}",
                        BundleCode.SMOKE_FAILED,
                    )
                diff = float(np.max(np.abs(got - np.asarray(t.probs, dtype=np.float32)))) if t.probs else 0.0
                if diff > t.tolerance:
                    raise BundleError(
                        name,
                        f"smoke test {t.text!r}: values differ by {diff:.4g} > {t.tolerance}",
                        BundleCode.SMOKE_FAILED,
                    )
        try:
            hostile = self.run(list(HOSTILE_TEXTS))
        except Exception as exc:  # ORT raises several unrelated types
            raise BundleError(
                name,
                f"hostile smoke inputs: the model fails: {str(exc).splitlines()[0][:300]}",
                BundleCode.SMOKE_FAILED,
            ) from exc
        for text, good in zip(HOSTILE_TEXTS, hostile.ok.tolist(), strict=True):
            if not good:
                raise BundleError(
                    name,
                    f"hostile smoke input {text[:40]!r}: the model gives non-finite output",
                    BundleCode.SMOKE_FAILED,
                )
        return took


def _options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def _ort(source: Path | bytes, opts: ort.SessionOptions, where: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            source if isinstance(source, bytes) else str(source), opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises several unrelated types (Fail, InvalidGraph, RuntimeError)
        raise BundleError(
            where, f"ONNX Runtime cannot load the model: {exc}", BundleCode.LOAD_FAILED
        ) from exc


def _incompatible(where: str, reason: str) -> BundleError:
    return BundleError(where, reason, BundleCode.INCOMPATIBLE)


def load_session(
    source: Path | bytes | Bundle,
    manifest: ModelManifest | None = None,
    *,
    intra_op_threads: int = 1,
) -> Session:
    """Load a bundle (or its "model" file at ``source``, or the serialized model itself, with
    the other files next to it) and check it against ``manifest``: inputs fed by the
    preprocessing, outputs named, output width equal to the labels. Raises ``BundleError``
    with code ``load_failed`` or ``incompatible`` (the message names the input/output)."""
    if isinstance(source, Bundle):
        manifest = manifest or source.manifest
        base: Path | None = source.path
        model: Path | bytes = source.model_path
    else:
        model = source
        base = None if isinstance(source, bytes) else Path(source).parent
    if manifest is None:
        raise TypeError("load_session needs the manifest when given a model file")
    where = "<in-memory model>" if isinstance(model, bytes) else str(model)
    pp = manifest.preprocessing
    if manifest.task not in _TASKS:
        raise _incompatible(where, f"task {manifest.task!r} is not one this runtime knows {list(_TASKS)}")
    if manifest.output_kind not in _OUTPUT_KINDS:
        raise _incompatible(
            where, f"output_kind {manifest.output_kind!r} is not one of {list(_OUTPUT_KINDS)}"
        )
    opts = _options(intra_op_threads)
    sess = _ort(model, opts, where)
    head: ort.InferenceSession | None = None
    head_file = next((f for f in manifest.files if f.role == "head"), None)
    if head_file is not None:
        if base is None:
            raise _incompatible(where, "a bundle with a head file needs its directory")
        head = _ort(base / head_file.path, opts, str(base / head_file.path))
    graph_in = {i.name: i for i in sess.get_inputs()}
    tokenizer: TokenizerFeaturizer | None = None
    if pp.kind == "hashed_ngrams":
        want_in = {"ids", "weights"}
        if set(graph_in) != want_in or (manifest.inputs and {t.name for t in manifest.inputs} != want_in):
            raise _incompatible(
                where, f"model inputs {sorted(graph_in)} are not the {sorted(want_in)} this runtime feeds"
            )
    elif pp.kind == "tokenizer":
        mapping = dict(pp.input_names) or {r: r for r in TOKEN_ROLES if r in graph_in}
        for role, name in mapping.items():
            if role not in TOKEN_ROLES:
                raise _incompatible(where, f"input_names role {role!r} is not one of {list(TOKEN_ROLES)}")
            if name not in graph_in:
                raise _incompatible(
                    where, f"model has no input {name!r} (mapped from {role!r}); has {sorted(graph_in)}"
                )
            if graph_in[name].type not in _INT_TYPES:
                raise _incompatible(
                    where, f"model input {name!r} is {graph_in[name].type}, expected int64 or int32"
                )
        fed = set(mapping.values())
        unfed = sorted(set(graph_in) - fed)
        if unfed:
            raise _incompatible(
                where, f"model inputs {unfed} are not fed by the tokenizer (input_names {mapping})"
            )
        if "input_ids" not in mapping:
            raise _incompatible(where, "no model input takes the tokenizer's input_ids")
        if base is None:
            raise _incompatible(where, "a tokenizer bundle needs its directory")
        try:
            tokenizer = TokenizerFeaturizer(
                base / pp.tokenizer, pp, mapping, {n: _INT_TYPES[graph_in[n].type] for n in fed}
            )
        except (ValueError, OSError) as exc:
            raise BundleError(where, str(exc), BundleCode.LOAD_FAILED) from exc
    else:
        raise _incompatible(where, f"preprocessing kind {pp.kind!r} is not one this runtime knows")
    encoder_output = ""
    if head is not None:
        outs = [o.name for o in sess.get_outputs()]
        encoder_output = "embedding" if "embedding" in outs else outs[0]
        if len(head.get_inputs()) != 1:
            raise _incompatible(where, f"head has inputs {[i.name for i in head.get_inputs()]}, expected one")
    last = head if head is not None else sess
    have_out = {o.name: o for o in last.get_outputs()}
    if manifest.output and manifest.output not in have_out:
        raise _incompatible(where, f"model has no output {manifest.output!r}; has {sorted(have_out)}")
    missing = {t.name for t in manifest.outputs} - set(have_out)
    if missing:
        raise _incompatible(where, f"model lacks outputs {sorted(missing)} named in the manifest")
    session = Session(
        sess, manifest, head=head, tokenizer=tokenizer, output=manifest.output, encoder_output=encoder_output
    )
    out_shape: list[Any] = list(have_out[session.output_name].shape)
    if manifest.task == "classification":
        if isinstance(out_shape[-1], int) and out_shape[-1] != len(manifest.labels):
            raise _incompatible(
                where,
                f"output {session.output_name!r} has {out_shape[-1]} classes, "
                f"manifest has {len(manifest.labels)} labels",
            )
        if manifest.output_kind == "embedding":
            raise _incompatible(where, "a classification model's output_kind cannot be 'embedding'")
    elif manifest.output_kind != "embedding":
        raise _incompatible(
            where, f"an embedding model's output_kind must be 'embedding', not {manifest.output_kind!r}"
        )
    if manifest.embedding is not None:
        _check_embedding_stats(manifest, manifest.embedding, out_shape[-1], where)
    return session


def _check_embedding_stats(manifest: ModelManifest, stats: EmbeddingStats, width: object, where: str) -> None:
    dims = {len(d) for d in stats.directions}
    if manifest.task != "embedding" or not stats.directions or len(dims) != 1:
        raise _incompatible(where, "embedding statistics need task 'embedding' and equally long directions")
    if isinstance(width, int) and dims != {width}:
        raise _incompatible(where, f"embedding directions have {dims.pop()} values, the output has {width}")
    for name, edges in (("projection_edges", stats.projection_edges), ("norm_edges", stats.norm_edges)):
        if len(edges) < 2 or any(not b > a for a, b in pairwise(edges)):
            raise _incompatible(where, f"embedding {name} must be at least 2 increasing values")
    if (len(stats.projection_edges) - 1) ** len(stats.directions) >= 2**62:
        raise _incompatible(where, "too many embedding directions or bins to pack in one event row")


def verify_bundle(
    bundle: Bundle,
    trust: TrustStore,
    *,
    memory_mb: int = 0,
    capabilities: Sequence[str] = CAPABILITIES,
    intra_op_threads: int = 1,
) -> Session | GenerationSession:
    """Everything a node checks before it serves a bundle, in this order: a trusted signature
    over the raw manifest, requirements this runtime meets, memory (``memory_mb`` 0 = not
    checked), every file's size and sha256, ONNX Runtime load with matching inputs/outputs,
    smoke tests and hostile inputs. The registry (``models push``) and the edge both call this.
    Returns the loaded session. Raises ``BundleError`` whose ``code`` names the failed check
    (``unknown_key``, ``bad_signature``, ``unsigned``, ``incompatible``, ``too_large``,
    ``truncated``, ``hash_mismatch``, ``load_failed``, ``smoke_failed``). CPU-bound."""
    where = str(bundle.path)
    if len(trust) == 0 and not trust.revoked:  # (with revocations, verify names the revoked signer)
        raise BundleError(
            where, "no trusted public key is configured to verify the signature", BundleCode.UNKNOWN_KEY
        )
    trust.verify(bundle, where)
    missing = unmet(requirements_of(bundle.manifest), capabilities)
    if missing:
        raise BundleError(
            where, f"this runtime cannot run it: needs {', '.join(missing)}", BundleCode.INCOMPATIBLE
        )
    need = bundle.manifest.min_memory_mb
    if memory_mb > 0 and need > memory_mb:
        raise BundleError(
            where, f"needs {need} MB of memory, this device has {memory_mb} MB", BundleCode.TOO_LARGE
        )
    check_files(bundle)
    if bundle.manifest.task == "embedding" and bundle.manifest.embedding is None:
        raise BundleError(
            where, "an embedding model's manifest needs its embedding statistics", BundleCode.INCOMPATIBLE
        )
    if bundle.manifest.task == "generation":
        gen = load_generation(bundle.path, bundle.manifest, intra_op_threads=intra_op_threads)
        gen.smoke_test()
        return gen
    session = load_session(bundle, intra_op_threads=intra_op_threads)
    session.smoke_test()
    return session
