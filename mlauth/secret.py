"""Masking for secrets: a wrapper whose ``repr`` never shows the value, and fingerprints.

Holding tokens and the client secret in :class:`Secret` closes the doors a plain ``str``
leaves open: ``repr(auth)``, ``vars(auth)``, tracebacks that print locals, f-strings in log
calls. The value is read only where it must go on the wire, through :meth:`Secret.reveal`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["Secret", "fingerprint", "mask"]

# What MercadoLibre's access (APP_USR-...) and refresh (TG-...) tokens look like.
_TOKEN_SHAPE = re.compile(r"\b(?:APP_USR|TG)-[A-Za-z0-9_-]+")


def fingerprint(value: str | None) -> str:
    """A short, stable, one-way label for a token: ``sha256:1a2b3c4d``.

    Eight hex digits of SHA-256 identify a token in logs and in ``mlauth status`` without
    giving away anything usable; the prefix of an ML token is deliberately not shown, since
    it embeds the client id and user id.
    """
    if not value:
        return "<none>"
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]


def mask(text: str, secrets: Iterable[Secret | None] = ()) -> str:
    """``text`` with each of ``secrets``, and anything shaped like an ML token, fingerprinted.

    For messages made from someone else's exception, which may quote a value it was given.
    """
    for secret in secrets:
        if secret is not None and secret.reveal():
            text = text.replace(secret.reveal(), secret.fingerprint)
    return _TOKEN_SHAPE.sub(lambda match: fingerprint(match.group()), text)


class Secret:
    """A string that refuses to be printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret wants a str, got {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The real value, for the one place that puts it on the wire or on disk."""
        return self._value

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode("utf-8"), other._value.encode("utf-8"))

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickling would write the value out in clear; a Secret is not meant to travel.
        raise TypeError("a Secret cannot be pickled")
