"""The warning for a function named with ``--redirect`` that its module does not define.

``--redirect main2:renew_tokn`` (a typo) must not leave the legacy refresh live without a
word: when the module is imported (or the script starts) and has no top-level function of
that name, one WARNING names the module, the name, and the functions it does define that
look like the one meant (close spellings, names with refresh, renew or token in them).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Collection, Iterable

__all__ = ["lookalikes", "warn_missing", "warn_unless_defined"]

log = logging.getLogger("mlauth")

_REFRESH_LIKE = re.compile(r"refresh|renew|token|reauth", re.IGNORECASE)
_warned: set[tuple[str, str]] = set()


def lookalikes(missing: str, defined: Iterable[str]) -> list[str]:
    """The names of ``defined`` that may be the one meant: close spellings first."""
    names = sorted({name for name in defined if not name.startswith("__")})
    close = difflib.get_close_matches(missing, names, n=3, cutoff=0.6)
    alike = [name for name in names if _REFRESH_LIKE.search(name) and name not in close]
    return [*close, *alike][:5]


def warn_missing(module: str, function: str, where: str, defined: Iterable[str]) -> None:
    """Warn, once per process for each pair, that ``module`` (``where``) lacks ``function``."""
    if (module, function) in _warned:
        return  # two threads importing it at once may both warn: harmless, and no lock
    _warned.add((module, function))
    similar = lookalikes(function, defined)
    hint = (
        "functions it defines that look like a refresh function: "
        + ", ".join(f"{name}()" for name in similar)
        if similar
        else "it defines no function that looks like a refresh function"
    )
    log.warning(
        "redirect %s:%s: %s (%s) has no top-level function %s, so nothing was redirected for "
        "it; %s. Correct the name given to --redirect or install(redirect=[...])",
        module,
        function,
        module,
        where,
        function,
        hint,
    )


def warn_unless_defined(
    named: Iterable[tuple[str, str]], defined: Collection[str], where: str
) -> None:
    """Warn for each named ``(module, function)`` whose function is not in ``defined``."""
    for module, function in named:
        if function not in defined:
            warn_missing(module, function, where, defined)
