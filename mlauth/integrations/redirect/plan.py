"""Which functions to redirect: ``refresh_ml_token`` in the program's own modules by default,
and the ``MODULE:FUNCTION`` pairs named with ``--redirect`` or ``install(redirect=[...])``."""

from __future__ import annotations

import os
from collections.abc import Iterable

from mlauth.errors import ConfigError

__all__ = ["DEFAULT_NAME", "MAIN", "MP_MAIN", "Plan", "parse_spec", "script_aliases"]

DEFAULT_NAME = "refresh_ml_token"
MAIN = "__main__"
# The name multiprocessing's spawn and forkserver processes run the parent's script under.
MP_MAIN = "__mp_main__"


def script_aliases(path: str, module: str = MAIN) -> list[str]:
    """The names the script at ``path`` goes by in ``--redirect``: ``__main__``, its file name
    without ``.py``, and the module it runs as (``__mp_main__`` in a spawned process)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return [MAIN, stem] if module == MAIN else [MAIN, module, stem]


def parse_spec(text: str) -> tuple[str, str]:
    """``"MODULE:FUNCTION"`` as (module, function); ConfigError naming the form if it is not."""
    module, colon, function = str(text).strip().partition(":")
    dotted = module.split(".")
    if not colon or not function.isidentifier() or not all(p.isidentifier() for p in dotted):
        raise ConfigError(
            f"redirect {text!r}: give MODULE:FUNCTION, the module as it is imported and a "
            "function defined at its top level (e.g. legacy_pipeline:renew_token; the "
            f"script itself is {MAIN}, or its file name without .py)"
        )
    return module, function


class Plan:
    """The functions to redirect. Named pairs can be added later (by install(), under its
    lock); ``default`` never changes."""

    def __init__(self, default: bool, named: Iterable[str] = ()) -> None:
        self.default = default
        self._named: dict[str, frozenset[str]] = {}
        self.add(named)

    def add(self, named: Iterable[str]) -> list[tuple[str, str]]:
        """Add ``MODULE:FUNCTION`` pairs (checked first, all or none); returns the new ones."""
        pairs = [parse_spec(text) for text in named]
        new = []
        for module, function in pairs:
            known = self._named.get(module, frozenset())
            if function not in known:
                self._named[module] = known | {function}  # replaced whole: read without a lock
                new.append((module, function))
        return new

    def names(self, modules: Iterable[str], own: bool) -> frozenset[str]:
        """The names to redirect in a module known by ``modules`` (its name, its aliases)."""
        found = frozenset({DEFAULT_NAME}) if own and self.default else frozenset()
        named = self._named
        for module in modules:
            found |= named.get(module, frozenset())
        return found

    def named_in(self, modules: Iterable[str]) -> list[tuple[str, str]]:
        """The ``(module, function)`` pairs named for a module known by ``modules``, as given."""
        named = self._named
        return [(module, name) for module in modules for name in sorted(named.get(module, ()))]

    def by_module(self) -> dict[str, list[str]]:
        """Each named module's ``MODULE:FUNCTION`` pairs, as given."""
        return {
            module: [f"{module}:{name}" for name in sorted(names)]
            for module, names in self._named.items()
        }

    def __bool__(self) -> bool:
        return self.default or bool(self._named)
