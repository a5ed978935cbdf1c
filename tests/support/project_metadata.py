"""Shared by the packaging tests: pyproject.toml as data, and the versions the classifiers claim."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def classified_pythons() -> set[str]:
    """The ``3.N`` versions named by the ``Programming Language :: Python :: 3.N`` classifiers."""
    found = (
        re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", classifier)
        for classifier in pyproject()["project"]["classifiers"]
    )
    return {match[1] for match in found if match}
