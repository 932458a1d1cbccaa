"""Listing the keys of a KV bucket, without nats-py's ``KeyValue.keys()``.

``keys()`` (and a ``watch`` used to list) replays the bucket through an ordered consumer and
ends at its "no more" marker, which it can send too early: it decides from ``consumer_info``
that nothing is pending while the entries already delivered still wait for its callback (seen
here as ``registry assign: ... (versions: [])`` right after three versions were pushed, on a
loaded machine). ``kv_keys`` asks the stream for its subjects instead (``STREAM.INFO`` with a
subject filter): one request, nothing to race. The answer holds every key written and not
purged, deleted ones too (their last entry is a delete marker): read a key to know.
"""

from __future__ import annotations

from nats.js import JetStreamContext

__all__ = ["kv_keys"]


async def kv_keys(js: JetStreamContext, bucket: str, key_filter: str = ">") -> list[str]:
    """Sorted keys of KV ``bucket`` matching the subject-style ``key_filter`` (``>``, ``a.*``).

    Raises nats-py's ``NotFoundError`` when the bucket does not exist, and its request errors.
    The server returns up to 100,000 subjects per request; buckets here hold far fewer.
    """
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + key_filter)
    subjects = info.state.subjects or {}
    return sorted(s[len(prefix) :] for s in subjects if s.startswith(prefix))
