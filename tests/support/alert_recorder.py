"""An alert command that records what it was given (mlauth.alerts): a real ``/bin/sh -c``
that writes its stdin, its environment and its arguments into ``$MLAUTH_TEST_OUT``, one
file each, named by its pid; and the readers of those files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RECORDER = (
    'cat > "$MLAUTH_TEST_OUT/alert.$$.json"; env > "$MLAUTH_TEST_OUT/alert.$$.env"; '
    'printf "%s\\n" "$0" "$@" > "$MLAUTH_TEST_OUT/alert.$$.args"'
)


def alerts_in(folder: Path) -> list[dict[str, Any]]:
    """The JSON documents the recorder was given on stdin, one per run."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("alert.*.json"))]


def everything_given(folder: Path) -> str:
    """All the recorder was given, as one text (to look for secrets in)."""
    return "\n".join(path.read_text() for path in sorted(folder.glob("alert.*")))


def alert_variables(folder: Path) -> list[dict[str, str]]:
    """The ``MLAUTH_ALERT*`` variables of each run (ordered as :func:`alerts_in`)."""
    runs = []
    for path in sorted(folder.glob("alert.*.env")):
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        runs.append({k: v for k, v in pairs if k.startswith("MLAUTH_ALERT")})
    return runs
