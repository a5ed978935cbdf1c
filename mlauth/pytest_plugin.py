"""pytest fixtures for code that uses mlauth: a fake MercadoLibre and a ``.env`` for it.

Registered as the ``mlauth`` pytest plugin (a ``pytest11`` entry point), so the fixtures are
available in any project that installs mlauth, with no ``conftest.py`` import. It lives apart
from :mod:`mlauth.testing` because only this module may import pytest, which is not a runtime
dependency of mlauth.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .testing import FakeMercadoLibre

__all__ = ["fake_ml", "fake_ml_env"]


@pytest.fixture
def fake_ml() -> Iterator[FakeMercadoLibre]:
    """A started :class:`~mlauth.testing.FakeMercadoLibre` on loopback, stopped at teardown."""
    with FakeMercadoLibre() as fake:
        yield fake


@pytest.fixture
def fake_ml_env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    """A complete ``.env`` (mode 0600) in ``tmp_path`` holding fresh tokens from ``fake_ml``."""
    path = tmp_path / ".env"
    fake_ml.write_env(path)
    return path
