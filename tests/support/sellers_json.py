"""``mlauth sellers --json`` run as a real process, its document checked against the JSON
Schema the package ships (with the ``jsonschema`` library)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema

from mlauth.schemas import sellers_schema

from .cli import mlauth_cli

VALIDATOR = jsonschema.Draft202012Validator(sellers_schema())


def valid(document: Any) -> Any:
    """``document`` once it validates against ``mlauth/schemas/sellers.schema.json``."""
    VALIDATOR.validate(document)
    return document


def sellers_json(
    *args: str, cwd: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], Any]:
    """Run ``mlauth sellers --json ARGS``; the process, and its document once validated."""
    done = mlauth_cli("sellers", "--json", *args, cwd=cwd)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    return done, valid(json.loads(done.stdout))
