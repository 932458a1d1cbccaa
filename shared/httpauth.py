"""Bearer tokens of the HTTP APIs (the edge API and the cloud console; issue 17): reading a
token file, judging an ``Authorization`` header, comparing a token in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

__all__ = ["MIN_TOKEN_CHARS", "bearer_refusal", "check_token", "read_token", "same_token"]

#: Shortest token accepted: 16 characters (the cloud console's rule too).
MIN_TOKEN_CHARS = 16


def check_token(token: str, where: str) -> str:
    """``token`` if it is long enough; ``ValueError`` naming ``where`` (never the token)."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where}: a bearer token needs {MIN_TOKEN_CHARS}+ characters, got {len(token)}")
    if any(c.isspace() for c in token):
        raise ValueError(f"{where}: a bearer token may not contain whitespace")
    return token


def read_token(path: Path) -> str:
    """The token in file ``path`` (surrounding whitespace dropped); ``ValueError`` naming the
    file when it cannot be read or holds no usable token."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"http token file {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return check_token(text.strip(), f"http token file {str(path)!r}")


def same_token(given: str, token: str) -> bool:
    """Whether ``given`` is ``token``, in the same time whatever ``given`` holds."""
    return hmac.compare_digest(given.encode(), token.encode())


def bearer_refusal(header: str | None, token: str) -> str | None:
    """Why a request with this ``Authorization`` header is refused, or None when it carries
    ``Bearer <token>``. The comparison takes the same time whatever the header holds."""
    if not header:
        return "missing bearer token: send the header 'Authorization: Bearer <token>'"
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "the Authorization header is not of the form 'Bearer <token>'"
    if not same_token(given.strip(), token):
        return "wrong bearer token"
    return None
