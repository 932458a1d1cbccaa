"""The factory's input errors: a corpus or pretrained weights that cannot be found, read or
verified. Each carries ``where`` (the file, directory or URL) and ``reason`` as attributes and
reads ``"<what> <where>: <reason>"``. They are ``ValueError``s: the input is wrong, not the
factory."""

from __future__ import annotations

from typing import ClassVar

__all__ = ["FactoryInputError"]


class FactoryInputError(ValueError):
    """An input of the factory is missing, unreadable or not what it must be."""

    #: What the input is, the first word of the message.
    what: ClassVar[str] = "input"

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{self.what} {where}: {reason}")
