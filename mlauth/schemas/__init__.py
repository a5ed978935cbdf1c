"""JSON Schemas of what mlauth prints for machines: ``status.schema.json`` is the shape of
``mlauth status --json`` (``mlauth-status/1``), shipped in the wheel so that a monitoring
script validates against the schema of the mlauth it runs."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, cast

__all__ = ["status_schema"]


def status_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``mlauth status --json``, as a dict."""
    text = resources.files(__name__).joinpath("status.schema.json").read_text(encoding="utf-8")
    return cast("dict[str, Any]", json.loads(text))
