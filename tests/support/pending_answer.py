"""A refresh whose answer reached the journal but not the ``.env`` (a writer killed between
the two): what ``mlauth status`` and ``status --json`` must report as pending."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlauth
from mlauth.secret import Secret
from mlauth.stores.journal import Journal


def answer_pending(env: Path, label: str) -> tuple[Secret, mlauth.TokenSet]:
    """Journal an answer for ``env``'s refresh token that the file does not hold: (the
    stored refresh token, the unsaved tokens, named after ``label``)."""
    stored = mlauth.EnvFileStore(env).load()[0].refresh_token
    assert stored is not None
    unsaved = mlauth.TokenSet(
        access_token=mlauth.Secret(f"APP_USR-unsaved-access-for-{label}"),
        refresh_token=mlauth.Secret(f"TG-unsaved-refresh-for-{label}"),
        expires_at=time.time() + 21600,
    )
    journal = Journal(os.path.realpath(env))
    journal.intent(stored)
    journal.answer(stored, unsaved)
    return stored, unsaved
