"""Out-of-scope signs of an input, computed where the text is (the node) and by the model
factory on held-out data (the reference): the same code on both sides (issue 14).

A character's *script* is the first word of its Unicode name ("LATIN", "CYRILLIC", "GREEK",
"ARABIC", "CJK", "HIRAGANA", "HANGUL", ...); only letters have one — digits, punctuation,
spaces, symbols and emoji are never foreign. A text shows the foreign-script sign when one of
its letters is outside the training scripts.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

from slmops.shared.messages import OOS_FOREIGN_SCRIPT, OOS_LOW_CONFIDENCE, OOS_UNKNOWN_TOKEN, OutOfScopeSpec

__all__ = ["char_script", "flags", "foreign", "scripts_of"]


@lru_cache(maxsize=4096)
def char_script(ch: str) -> str:
    """The script of one character ("" for a non-letter or an unnamed one)."""
    if not ch.isalpha():
        return ""
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else ""


def scripts_of(texts: Iterable[str], min_share: float = 0.001) -> list[str]:
    """The scripts of ``texts``' letters, each holding at least ``min_share`` of them (so a
    stray foreign name in the training data does not make its whole script "trained")."""
    counts: dict[str, int] = {}
    total = 0
    for text in texts:
        for ch in text:
            s = "LATIN" if "a" <= ch.lower() <= "z" else char_script(ch)
            if s:
                counts[s] = counts.get(s, 0) + 1
                total += 1
    return sorted(s for s, n in counts.items() if total and n / total >= min_share)


def foreign(text: str, scripts: frozenset[str]) -> bool:
    """Whether a letter of ``text`` is outside ``scripts``."""
    if text.isascii():
        return "LATIN" not in scripts and any(ch.isalpha() for ch in text)
    for ch in text:
        s = char_script(ch)
        if s and s not in scripts:
            return True
    return False


def flags(
    texts: Sequence[str],
    confidence: Sequence[float],
    spec: OutOfScopeSpec,
    unknown: Sequence[int] | None = None,
) -> list[int]:
    """Per text, the OR of its out-of-scope signs (``OOS_*``): top probability below the
    spec's threshold, a letter outside its scripts (none when the spec names no script), and
    — for tokenizer models whose manifest counts it (``spec.unknown_token_share`` set) — a
    token that is the tokenizer's unknown token (``unknown``: per text, how many).
    An inference shows a sign or not (one count per inference: DP sensitivity stays 1 per
    cell), so the unknown-token signal is the share of inferences with an unknown token."""
    scripts = frozenset(spec.scripts)
    unk = unknown if unknown is not None and spec.unknown_token_share is not None else None
    out = []
    for i, (text, conf) in enumerate(zip(texts, confidence, strict=True)):
        f = OOS_LOW_CONFIDENCE if conf < spec.threshold else 0
        if scripts and foreign(text, scripts):
            f |= OOS_FOREIGN_SCRIPT
        if unk is not None and unk[i] > 0:
            f |= OOS_UNKNOWN_TOKEN
        out.append(f)
    return out
