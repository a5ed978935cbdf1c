"""JSON Schemas of what mlauth prints for machines, shipped in the wheel so that a monitoring
script validates against the schema of the mlauth it runs: ``status.schema.json`` is the shape
of ``mlauth status --json`` (``mlauth-status/1``), ``sellers.schema.json`` the shape of
``mlauth sellers --json`` (``mlauth-sellers/1``)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, cast

__all__ = ["sellers_schema", "status_schema"]


def _schema(name: str) -> dict[str, Any]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return cast("dict[str, Any]", json.loads(text))


def status_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``mlauth status --json``, as a dict."""
    return _schema("status.schema.json")


def sellers_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``mlauth sellers --json``, as a dict."""
    return _schema("sellers.schema.json")
