"""What a runtime can run, and what a bundle needs (``Requirements`` in its manifest).

A node reports ``CAPABILITIES`` in ``DeviceProfile.capabilities``; a node that reports none is
an old one (n-gram classifiers from single-file bundles, runtime level 1). The cloud assigns
and the node downloads only bundles whose requirements the node meets (``unmet``).
"""

from __future__ import annotations

from collections.abc import Iterable

from slmops.shared.generation import available as _genai_available
from slmops.shared.messages import ModelManifest, Requirements

__all__ = ["CAPABILITIES", "LEGACY_CAPABILITIES", "RUNTIME_LEVEL", "requirements_of", "unmet"]

#: The runtime level of this build: 1 = the n-gram-only runtime, 2 = tokenizers, tasks, files.
RUNTIME_LEVEL = 2
CAPABILITIES: list[str] = [
    "hashed_ngrams",
    "tokenizer",
    "classification",
    "embedding",
    "multi_file",
    f"runtime:{RUNTIME_LEVEL}",
    # Generation models (ONNX Runtime GenAI folders) only where the optional extra is installed.
    *(["genai", "generation"] if _genai_available() else []),
]
#: What a node that reports no capabilities can run.
LEGACY_CAPABILITIES: list[str] = ["hashed_ngrams", "classification", "runtime:1"]


def requirements_of(manifest: ModelManifest) -> Requirements:
    """What running ``manifest`` needs: its own ``requires`` if it has one, else derived from
    its fields (level 1 only for what the n-gram runtime ran)."""
    if manifest.requires is not None:
        return manifest.requires
    multi = bool(manifest.files)
    legacy = (
        not multi
        and manifest.preprocessing.kind == "hashed_ngrams"
        and manifest.task == "classification"
        and manifest.output_kind == "probs"
        and not manifest.output
        # A field build 06cfd20 did not know, set away from its default (e.g. out_of_scope),
        # cannot be carried by the legacy signature form: such a bundle needs this runtime.
        and manifest.out_of_scope is None
        and manifest.optimization is None
    )
    return Requirements(
        preprocessing=manifest.preprocessing.kind,
        task=manifest.task,
        multi_file=multi,
        min_runtime=1 if legacy else RUNTIME_LEVEL,
    )


def _level(caps: set[str]) -> int:
    levels = [int(c.split(":", 1)[1]) for c in caps if c.startswith("runtime:") and c[8:].isdigit()]
    return max(levels, default=1)


def unmet(requires: Requirements, capabilities: Iterable[str]) -> list[str]:
    """The requirements a runtime with ``capabilities`` does not meet (empty: it can run it);
    each item says what is missing, e.g. "preprocessing 'tokenizer'"."""
    caps = set(capabilities) or set(LEGACY_CAPABILITIES)
    missing = []
    if requires.preprocessing not in caps:
        missing.append(f"preprocessing {requires.preprocessing!r}")
    if requires.task not in caps:
        missing.append(f"task {requires.task!r}")
    if requires.multi_file and "multi_file" not in caps:
        missing.append("multi-file bundles")
    if requires.min_runtime > _level(caps):
        missing.append(f"runtime level {requires.min_runtime} (has {_level(caps)})")
    return missing
