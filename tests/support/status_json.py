"""``mlauth status --json`` run as a real process, its document checked against the JSON
Schema the package ships (with the ``jsonschema`` library), and what it must never hold."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema

from mlauth.schemas import status_schema

from .cli import mlauth_cli

VALIDATOR = jsonschema.Draft202012Validator(status_schema())


def status_json(
    *args: str, cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Run ``mlauth status --json ARGS``; the process, and its document once validated."""
    done = mlauth_cli("status", "--json", *args, cwd=cwd)
    assert "Traceback" not in done.stderr, done.stderr
    document = json.loads(done.stdout)
    VALIDATOR.validate(document)
    return done, document


def assert_hides(text: str, secrets: list[str]) -> None:
    """None of ``secrets`` (tokens, the client secret, a Redis password) appears in ``text``."""
    assert secrets and all(secrets)
    for secret in secrets:
        assert secret not in text
