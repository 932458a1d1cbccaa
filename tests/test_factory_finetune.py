"""The optional ``finetune`` extra (issue 11): the layer-dropped MiniLM student trained with a
CPU torch, its tensors written back through the numpy graph writer (no ``torch.onnx``).

Without torch (dev and CI install no torch: the extra is optional) the build names the extra
to install. With torch, the torch student computes what the ONNX encoder computes, and the
trained tensors, written as ONNX, give what the trained torch student gives."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from slmops.cloud.factory.encoder import build_encoder
from slmops.cloud.factory.finetune import FinetuneUnavailable, finetune_student
from slmops.cloud.factory.minilm import INPUT_NAMES, embed, preprocessing
from slmops.cloud.factory.weights import load_weights
from slmops.shared.preprocess import TokenizerFeaturizer

TEXTS = [
    "hello",
    "what is the weather like today",
    "tell me a joke about computers and their programmers",
    "who wrote hamlet",
    "I like to play chess on sundays with my friends",
    "do you know any good books",
    "how old are you",
    "what is the capital of France",
]
LABELS = [0, 1, 2, 3, 2, 3, 0, 1]
HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_without_torch_the_finetuned_variant_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    head = (np.zeros((384, 4), np.float32), np.zeros(4, np.float32))
    with pytest.raises(FinetuneUnavailable, match=r"pip install 'slmops\[finetune\]'") as err:
        finetune_student({}, None, TEXTS, LABELS, head)  # type: ignore[arg-type]
    assert "torch==2.13.0" in str(err.value)


@pytest.fixture(scope="module")
def student(minilm_weights_dir: Path | None, tmp_path_factory: pytest.TempPathFactory) -> tuple:  # type: ignore[type-arg]
    weights = load_weights(minilm_weights_dir, download=False)
    tok_path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok_path.write_bytes(weights.tokenizer_json)
    return weights, TokenizerFeaturizer(tok_path, preprocessing(), dict(INPUT_NAMES), {})


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.skipif(not HAS_TORCH, reason="the optional finetune extra (torch) is not installed")
def test_the_torch_student_matches_the_onnx_encoder_and_its_trained_tensors_export(student: tuple) -> None:  # type: ignore[type-arg]
    import torch

    from slmops.cloud.factory.finetune import student_forward

    weights, tokenizer = student
    rows = tokenizer.encode(TEXTS)
    feeds = {k: torch.from_numpy(v) for k, v in tokenizer.feeds(rows, list(range(len(TEXTS)))).items()}

    def torch_embed(tensors: dict) -> np.ndarray:  # type: ignore[type-arg]
        params = {k: torch.tensor(np.array(v, dtype=np.float32)) for k, v in tensors.items()}
        with torch.no_grad():
            return student_forward(torch, params, feeds, 3).numpy()  # type: ignore[no-any-return]

    # Before training: the torch student is the ONNX encoder (batched with padding).
    onnx_before = embed(build_encoder(weights.tensors, layers=3), tokenizer, TEXTS)
    assert _cosines(torch_embed(weights.tensors), onnx_before).min() >= 0.9999

    head = (np.random.default_rng(0).normal(0, 1, (384, 4)).astype(np.float32), np.zeros(4, np.float32))
    tuned = finetune_student(weights.tensors, tokenizer, TEXTS, LABELS, head, batch=4, epochs=2, threads=1)
    assert tuned.steps == 4
    assert len(tuned.losses) == 2
    changed = {k for k in weights.tensors if tuned.tensors[k] is not weights.tensors[k]}
    assert changed
    assert all(k.startswith("encoder.layer.2.") for k in changed)  # only the last kept layer
    assert any(not np.array_equal(tuned.tensors[k], weights.tensors[k]) for k in changed)
    # After: the trained tensors written as ONNX give what the trained torch student gives.
    onnx_after = embed(build_encoder(tuned.tensors, layers=3), tokenizer, TEXTS)
    assert _cosines(torch_embed(tuned.tensors), onnx_after).min() >= 0.9999
    assert _cosines(onnx_before, onnx_after).min() < 0.99999  # and it did move
