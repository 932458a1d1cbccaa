"""The default training corpus: the English topic files of ``chatterbot-corpus`` (BSD licence).

Every utterance of a topic file, question or answer, is a labelled example of that topic.
Utterances are whitespace-normalised and deduplicated; one that occurs in several topics is
dropped (its label would be a coin toss). Topics that keep fewer than ``min_utterances``
distinct utterances are left out (about 12 of 21 remain at 40).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slmops.cloud.factory.errors import FactoryInputError

__all__ = ["CorpusError", "Split", "default_corpus_dir", "load_topics", "split_topics"]


class CorpusError(FactoryInputError):
    """The corpus cannot be found or read, or too little of it is left to train on."""

    what = "corpus"


@dataclass(frozen=True, slots=True)
class Split:
    """A stratified train/held-out split; labels are indices into ``labels``."""

    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    held_out_texts: list[str]
    held_out_labels: list[int]

    @property
    def majority_accuracy(self) -> float:
        """Accuracy on the held-out data of always answering the most frequent class."""
        counts = np.bincount(self.held_out_labels, minlength=len(self.labels))
        return float(counts.max() / max(1, counts.sum()))


def default_corpus_dir() -> Path:
    """``chatterbot_corpus/data/english`` of the installed package (cloud extra)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "chatterbot_corpus", "package not installed; install the cloud extra: pip install 'slmops[cloud]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def _normalise(text: object) -> str:
    return " ".join(str(text).split())


def _read_topic(path: Path) -> set[str]:
    import yaml  # cloud-only dependency, imported where it is needed

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CorpusError(str(path), f"cannot read topic file: {exc}") from exc
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(conversations, list):
        raise CorpusError(str(path), "no 'conversations' list in the topic file")
    utterances: set[str] = set()
    for conversation in conversations:
        for utterance in conversation if isinstance(conversation, list) else [conversation]:
            text = _normalise(utterance)
            if text:
                utterances.add(text)
    return utterances


def load_topics(corpus_dir: Path | None = None, *, min_utterances: int = 40) -> dict[str, list[str]]:
    """Topic name (the file's stem) -> its sorted distinct utterances, for topics with at least
    ``min_utterances`` after dropping utterances shared between topics. Sorted by topic name."""
    if min_utterances < 1:
        raise ValueError(f"min_utterances must be at least 1, got {min_utterances!r}")
    corpus_dir = default_corpus_dir() if corpus_dir is None else Path(corpus_dir)
    files = sorted(corpus_dir.glob("*.yml"))
    if not files:
        raise CorpusError(str(corpus_dir), "no *.yml topic files")
    raw = {f.stem: _read_topic(f) for f in files}
    seen_in: dict[str, int] = {}
    for utterances in raw.values():
        for text in utterances:
            seen_in[text] = seen_in.get(text, 0) + 1
    topics = {
        topic: sorted(t for t in utterances if seen_in[t] == 1) for topic, utterances in sorted(raw.items())
    }
    kept = {topic: texts for topic, texts in topics.items() if len(texts) >= min_utterances}
    if len(kept) < 2:
        raise CorpusError(
            str(corpus_dir), f"only {len(kept)} topic(s) have >= {min_utterances} distinct utterances"
        )
    return kept


def split_topics(topics: Mapping[str, list[str]], *, seed: int, held_out_fraction: float = 0.25) -> Split:
    """Stratified, deterministic split: each topic's utterances are shuffled with ``seed`` and
    ``round(n * held_out_fraction)`` (at least one) of them are held out."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    rng = np.random.default_rng(seed)
    labels = sorted(topics)
    split = Split(labels=labels, train_texts=[], train_labels=[], held_out_texts=[], held_out_labels=[])
    for index, topic in enumerate(labels):
        texts = sorted(topics[topic])
        order = rng.permutation(len(texts))
        n_held = max(1, round(len(texts) * held_out_fraction))
        for rank, i in enumerate(order):
            if rank < n_held:
                split.held_out_texts.append(texts[i])
                split.held_out_labels.append(index)
            else:
                split.train_texts.append(texts[i])
                split.train_labels.append(index)
    return split
