"""The int8 variant of a bundle, with ``onnxruntime.quantization.quantize_dynamic``.

Several quantization settings are tried and the one that agrees best with the fp32 model on
the evaluation texts wins (then the smaller one). On the default classifier the embedding
(``Gather``) holds ~all the bytes and quantizes almost losslessly, while dynamic quantization
of the ``MatMul`` (activations quantized at run time) moved probabilities by up to 0.25 here,
so per-tensor/per-channel ``Gather``-only settings usually win.

The int8 manifest gets variant ``int8``, ``parent_version`` = the fp32 version, smoke tests
re-derived from the int8 model itself, and a reference profile re-measured on the held-out
data when it is given (a node's int8 traffic is compared against int8 behaviour).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.cloud.factory.profile import reference_profile, smoke_tests
from slmops.shared.bundle import Bundle, check_hash, read_bundle, write_bundle
from slmops.shared.preprocess import featurize
from slmops.shared.runtime import Session, load_session

__all__ = ["SETTINGS", "QuantizeReport", "Setting", "compare", "quantize"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Setting:
    op_types: tuple[str, ...]
    per_channel: bool

    @property
    def label(self) -> str:
        return f"{'+'.join(self.op_types)}/{'per-channel' if self.per_channel else 'per-tensor'}"


#: Tried in this order; ties in agreement and error go to the earlier, then the smaller one.
SETTINGS: tuple[Setting, ...] = (
    Setting(("Gather",), per_channel=False),
    Setting(("Gather",), per_channel=True),
    Setting(("Gather", "MatMul"), per_channel=True),
)


@dataclass(frozen=True, slots=True)
class Comparison:
    agreement: float
    max_prob_diff: float


@dataclass(frozen=True, slots=True)
class QuantizeReport:
    bundle: Bundle
    setting: str
    fp32_bytes: int
    int8_bytes: int
    fp32_us: float
    int8_us: float
    agreement: float
    max_prob_diff: float
    eval_size: int

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def speed_ratio(self) -> float:
        """int8 per-call time over fp32 per-call time (below 1: int8 is faster)."""
        return self.int8_us / self.fp32_us


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    # quantize_dynamic logs an advisory "consider pre-processing" warning on the root logger
    # on every call; it does not apply to this graph (static shapes, no fusions to make).
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_file(src: Path, dst: Path, setting: Setting) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_root_logger():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=setting.per_channel,
            op_types_to_quantize=list(setting.op_types),
        )


def _probs(session: Session, feeds: dict[str, npt.NDArray[np.generic]]) -> npt.NDArray[np.float32]:
    (probs,) = session.ort.run(["probs"], feeds)
    return np.asarray(probs, dtype=np.float32)


def compare(fp32: Session, int8: Session, texts: Sequence[str]) -> Comparison:
    """Top-1 agreement and the largest absolute probability difference on ``texts``."""
    feeds = featurize(list(texts), fp32.manifest.preprocessing).feeds()
    a, b = _probs(fp32, feeds), _probs(int8, feeds)
    return Comparison(
        agreement=float((a.argmax(axis=1) == b.argmax(axis=1)).mean()),
        max_prob_diff=float(np.abs(a - b).max()),
    )


def time_per_call(
    sessions: Sequence[Session], text: str, *, calls: int = 500, rounds: int = 5
) -> list[float]:
    """Median microseconds of one single-text ORT call per session, rounds interleaved so
    machine noise hits every session alike. Featurization is excluded (it is the same)."""
    feeds = featurize([text], sessions[0].manifest.preprocessing).feeds()
    samples: list[list[float]] = [[] for _ in sessions]
    for s in sessions:
        for _ in range(50):  # warm-up: first calls allocate
            _probs(s, feeds)
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            for _ in range(calls):
                _probs(s, feeds)
            samples[i].append((time.perf_counter() - t0) / calls * 1e6)
    return [statistics.median(x) for x in samples]


def quantize(
    bundle_dir: Path,
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    eval_texts: Sequence[str],
    held_out: tuple[Sequence[str], Sequence[int]] | None = None,
    min_memory_mb: int | None = None,
    # int8 kernels may round differently on other CPUs than where the tests were derived.
    smoke_tolerance: float = 1e-3,
) -> QuantizeReport:
    """Write the int8 variant of the fp32 bundle at ``bundle_dir`` into ``out_dir``.

    ``eval_texts`` choose the setting and measure agreement; ``held_out`` (texts, true label
    indices) re-measures the reference profile, else the parent's is kept. The parent's hash is
    checked first (its signature is the registry's business at push)."""
    parent = read_bundle(Path(bundle_dir))
    check_hash(parent)
    pm = parent.manifest
    if pm.files or pm.preprocessing.kind != "hashed_ngrams":
        raise ValueError(
            f"{str(bundle_dir)!r} is a transformer bundle: its int8 variants are built by "
            "`slmops models build` (--variants), with the head fitted after quantizing"
        )
    if pm.variant != "fp32":
        raise ValueError(f"can only quantize an fp32 bundle, {str(bundle_dir)!r} is {pm.variant!r}")
    if not eval_texts:
        raise ValueError("eval_texts must not be empty")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output directory {str(out_dir)!r} is not empty")
    fp32 = load_session(parent.model_path, pm)
    int8_manifest = msgspec.structs.replace(
        pm,
        variant="int8",
        parent_version=pm.version,
        min_memory_mb=pm.min_memory_mb // 2 if min_memory_mb is None else min_memory_mb,
        reference=None,
        smoke_tests=[],
        created=datetime.now(UTC),
        notes=f"{pm.notes}; int8 of {pm.name} v{pm.version} fp32".lstrip("; "),
    )
    with tempfile.TemporaryDirectory(prefix="slmops-quantize-") as tmp:
        results: list[tuple[float, float, int, int, Setting, Path, Session]] = []
        for i, setting in enumerate(SETTINGS):
            path = Path(tmp) / f"int8-{i}.onnx"
            _quantize_file(parent.model_path, path, setting)
            session = load_session(path, int8_manifest)
            cmp = compare(fp32, session, eval_texts)
            log.debug(
                "quantize_candidate",
                setting=setting.label,
                agreement=cmp.agreement,
                max_prob_diff=cmp.max_prob_diff,
                size_bytes=path.stat().st_size,
            )
            results.append(
                (-cmp.agreement, cmp.max_prob_diff, i, path.stat().st_size, setting, path, session)
            )
        results.sort(key=lambda r: (r[0], round(r[1], 3), r[3], r[2]))
        neg_agreement, max_diff, _, int8_bytes, setting, path, int8 = results[0]
        fp32_us, int8_us = time_per_call([fp32, int8], eval_texts[0])
        reference = pm.reference
        if held_out is not None:
            reference = reference_profile(int8, held_out[0], held_out[1], pm.edges)
        smoke = smoke_tests(int8, [t.text for t in pm.smoke_tests] or eval_texts, tolerance=smoke_tolerance)
        int8_manifest = msgspec.structs.replace(int8_manifest, reference=reference, smoke_tests=smoke)
        bundle = write_bundle(out_dir, path.read_bytes(), int8_manifest, key)
    report = QuantizeReport(
        bundle=bundle,
        setting=setting.label,
        fp32_bytes=pm.size_bytes,
        int8_bytes=int8_bytes,
        fp32_us=fp32_us,
        int8_us=int8_us,
        agreement=-neg_agreement,
        max_prob_diff=max_diff,
        eval_size=len(eval_texts),
    )
    log.info(
        "model_quantized",
        name=pm.name,
        version=pm.version,
        setting=report.setting,
        size_ratio=round(report.size_ratio, 3),
        speed_ratio=round(report.speed_ratio, 3),
        agreement=report.agreement,
        max_prob_diff=round(report.max_prob_diff, 5),
    )
    return report
