"""Text -> model input, as a bundle's manifest declares. The edge and the model factory both
call this, so a model sees at serving time exactly what it saw in training.

``hashed_ngrams``: lower-cased word tokens, word n-grams and character n-grams of each word,
hashed (CRC-32, stable across processes and platforms) into ``buckets - 1`` ids; id 0 is
padding. Each row gets ``max_tokens`` ids and matching weights ``1/n`` (0 for padding), so the
model's weighted sum of embeddings is their mean.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from slmops.shared.messages import Preprocessing

__all__ = ["Features", "featurize", "tokenize"]

_WORD = re.compile(r"\w+", re.UNICODE)


class Features:
    """A featurized batch: ``ids`` int64 [n, T], ``weights`` float32 [n, T], token counts."""

    __slots__ = ("ids", "lengths", "weights")

    def __init__(
        self, ids: npt.NDArray[np.int64], weights: npt.NDArray[np.float32], lengths: list[int]
    ) -> None:
        self.ids = ids
        self.weights = weights
        self.lengths = lengths

    def feeds(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"ids": self.ids, "weights": self.weights}


def tokenize(text: str, pp: Preprocessing) -> list[str]:
    return _WORD.findall(text.lower() if pp.lowercase else text)


def _features(words: list[str], pp: Preprocessing) -> list[str]:
    feats: list[str] = []
    for n in pp.word_ngrams:
        feats.extend(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    for n in pp.char_ngrams:
        for w in words:
            padded = f"<{w}>"
            feats.extend("#" + padded[i : i + n] for i in range(len(padded) - n + 1))
    return feats


def featurize(texts: Sequence[str], pp: Preprocessing) -> Features:
    if pp.kind != "hashed_ngrams":
        raise ValueError(f"unknown preprocessing kind {pp.kind!r}; this build knows 'hashed_ngrams'")
    n, t = len(texts), pp.max_tokens
    ids = np.zeros((n, t), dtype=np.int64)
    weights = np.zeros((n, t), dtype=np.float32)
    lengths: list[int] = []
    mod = pp.buckets - 1
    for row, text in enumerate(texts):
        words = tokenize(text, pp)
        lengths.append(len(words))
        feats = _features(words, pp)[:t]
        if not feats:
            continue
        ids[row, : len(feats)] = [1 + zlib.crc32(f.encode()) % mod for f in feats]
        weights[row, : len(feats)] = 1.0 / len(feats)
    return Features(ids, weights, lengths)
