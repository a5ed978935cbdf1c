"""mlauth for httpx: ``from mlauth.httpx import HttpxAuth`` (``pip install 'mlauth[httpx]'``).

See :class:`~mlauth.integrations.httpx_auth.HttpxAuth` and docs/httpx.md.
"""

from __future__ import annotations

try:
    import httpx as _httpx  # noqa: F401 (the check that the extra is installed)
except ImportError as exc:  # pragma: no cover - exercised in a venv without httpx
    raise ImportError("mlauth.httpx needs httpx: pip install 'mlauth[httpx]'") from exc

from mlauth.integrations.httpx_auth import HttpxAuth

__all__ = ["HttpxAuth"]
