"""Text -> model input, as a bundle's manifest declares. The edge and the model factory both
call this, so a model sees at serving time exactly what it saw in training.

``tokenizer``: the HF ``tokenizers`` library (Rust) reads the bundle's ``tokenizer.json``;
whatever padding the file configures is switched off and truncation set to ``max_tokens``
(special tokens included). ``TokenizerFeaturizer.encode`` returns unpadded token rows;
``TokenizerFeaturizer.feeds`` pads a group of rows to its longest, so the runtime can group
texts by length before padding. A text's input length is its token count as fed (special
tokens included, after truncation).

``hashed_ngrams``: lower-cased word tokens, word n-grams and character n-grams of each word,
hashed (CRC-32, stable across processes and platforms) into ``buckets - 1`` ids; id 0 is
padding. Each row gets ``max_tokens`` ids and matching weights ``1/n`` (0 for padding), so the
model's weighted sum of embeddings is their mean.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from slmops.shared.messages import Preprocessing

__all__ = ["TOKEN_ROLES", "Features", "TokenRows", "TokenizerFeaturizer", "featurize", "tokenize"]

#: Graph input roles the tokenizer featurizer can feed.
TOKEN_ROLES = ("input_ids", "attention_mask", "token_type_ids")

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


class TokenRows:
    """Unpadded token ids (and type ids) of a batch of texts; ``unknown``: per text, how many
    of its tokens are the tokenizer's unknown token (``[UNK]``), [] when it has none."""

    __slots__ = ("ids", "lengths", "types", "unknown")

    def __init__(
        self, ids: list[list[int]], types: list[list[int]], unknown: list[int] | None = None
    ) -> None:
        self.ids = ids
        self.types = types
        self.lengths = [len(r) for r in ids]
        self.unknown = unknown if unknown is not None else []


class TokenizerFeaturizer:
    """The ``tokenizer`` preprocessing: one ``tokenizers.Tokenizer`` from a bundle file.

    ``input_names`` maps roles (``TOKEN_ROLES``) to graph input names; ``dtypes`` gives each
    graph input's numpy integer type. Raises ``ValueError`` for a file the library cannot read.
    Thread-safe after construction (encoding does not mutate the tokenizer)."""

    def __init__(
        self, path: Path, pp: Preprocessing, input_names: dict[str, str], dtypes: dict[str, type[np.integer]]
    ) -> None:
        from tokenizers import Tokenizer  # the edge's only extra dependency; imported when used

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for a bad file
            raise ValueError(f"tokenizer {path.name}: cannot read it: {exc}") from exc
        padding = tok.padding
        pad = padding.get("pad_id") if padding else None
        if not isinstance(pad, int):
            pad = tok.token_to_id("[PAD]")
        self.pad_id = pad if isinstance(pad, int) else 0
        #: The id of the model's unknown token (WordPiece/BPE/Unigram name one; None: none).
        unk = getattr(tok.model, "unk_token", None)
        unk_id = tok.token_to_id(unk) if isinstance(unk, str) else None
        self.unk_id: int | None = unk_id if isinstance(unk_id, int) else None
        tok.no_padding()
        tok.enable_truncation(max_length=pp.max_tokens)
        self._tok = tok
        self.input_names = dict(input_names)
        self._dtypes = dtypes

    def encode(self, texts: Sequence[str]) -> TokenRows:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=True)
        ids = [e.ids for e in encs]
        unk = self.unk_id
        unknown = [r.count(unk) for r in ids] if unk is not None else None
        return TokenRows(ids, [e.type_ids for e in encs], unknown)

    def feeds(self, rows: TokenRows, index: Sequence[int]) -> dict[str, npt.NDArray[np.generic]]:
        """Graph feeds for rows ``index`` of ``rows``, padded to their longest (at least 1)."""
        width = max(1, max((rows.lengths[i] for i in index), default=1))
        n = len(index)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        for r, i in enumerate(index):
            k = rows.lengths[i]
            ids[r, :k] = rows.ids[i]
            mask[r, :k] = 1
            types[r, :k] = rows.types[i]
        by_role = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {
            name: by_role[role].astype(self._dtypes.get(name, np.int64), copy=False)
            for role, name in self.input_names.items()
        }
