"""The function a legacy refresh function is replaced with, and the record of each replacement.

The replacement runs ``auth.refresh(force=False)`` whatever arguments it is given: a token a
peer already rotated, or one refreshed less than ``min_token_age`` ago, is adopted without
spending anything, so ``refresh_ml_token(force=True)`` at the start of three pipelines that
cron starts together spends the refresh token once. It returns True, or logs the error and
returns False, as a legacy ``refresh() -> bool`` does, and leaves the module's
``ML_ACCESS_TOKEN`` and ``HEADERS["Authorization"]`` as the legacy function would have
(:func:`~mlauth.integrations.globals_writer.write_module_globals`).

The automatic replacements follow :func:`mlauth.install`: while nothing is installed (after
``uninstall()``) they call the original, since a module may have kept a reference to one.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from mlauth.errors import MLAuthError
from mlauth.integrations.globals_writer import write_module_globals, writers_of

if TYPE_CHECKING:
    from mlauth.integrations.adapter import AuthAdapter

__all__ = [
    "def_line",
    "is_redirect",
    "mark",
    "original_of",
    "redirect_defined",
    "refresh_now",
    "replace",
    "restore_all",
    "use_auth",
]

log = logging.getLogger("mlauth")

Namespace = MutableMapping[str, Any]

# The auth the automatic replacements use: the installed one, or None.
_auth: AuthAdapter | None = None
# Every replacement made by this module or by redirect_refresh(), to recognise one.
_replacements: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
# (namespace, name, original, replacement) of each automatic replacement, for uninstall().
_made: list[tuple[Namespace, str, Any, Callable[..., Any]]] = []
_logged: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A thread of the parent may have been recording a replacement at the fork.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def use_auth(auth: AuthAdapter | None) -> None:
    global _auth
    _auth = auth


def is_redirect(value: object) -> bool:
    try:
        return value in _replacements
    except TypeError:  # unhashable: not ours
        return False


def original_of(value: object) -> object:
    return getattr(value, "__wrapped__", value) if is_redirect(value) else value


def refresh_now(auth: AuthAdapter, label: str, namespace: Namespace | None) -> bool:
    """One redirected call: mlauth's locked refresh, then the module's globals written."""
    try:
        tokens = auth.refresh(force=False)
    except MLAuthError as exc:
        log.error("%s() redirected to mlauth: refresh failed: %s", label, exc)
        return False
    if namespace is not None:
        write_module_globals(namespace, tokens)
    for writer in writers_of(auth):
        writer(auth)  # the token may have been adopted, which calls no on_refresh
    return True


def mark(replacement: Callable[..., Any], original: object) -> None:
    """Make ``replacement`` look like ``original`` (name, doc, ``__wrapped__``), and ours."""
    functools.update_wrapper(replacement, original)  # type: ignore[arg-type]
    replacement.__wrapped__ = original  # type: ignore[attr-defined]
    _replacements.add(replacement)


def _replacement(original: Callable[..., Any], label: str, namespace: Namespace | None) -> Any:
    def refresh_via_mlauth(*args: object, **kwargs: object) -> object:
        auth = _auth
        if auth is None:  # uninstalled: the program's own function again
            return original(*args, **kwargs)
        return refresh_now(auth, label, namespace)

    mark(refresh_via_mlauth, original)
    return refresh_via_mlauth


def _module_namespace(value: object) -> Namespace | None:
    """The globals of the module that defined ``value`` (through decorators' __wrapped__)."""
    try:
        inner = inspect.unwrap(value)  # type: ignore[arg-type]
    except ValueError:  # a __wrapped__ cycle
        return None
    namespace = getattr(inner, "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


def _redirect(
    value: object, namespace: Namespace, module: str, name: str, where: str
) -> Callable[..., Any] | None:
    """The replacement for ``value``, bound to ``name`` in ``module``; None to leave it."""
    if value is None or not callable(value) or is_redirect(value) or isinstance(value, type):
        return None
    if inspect.iscoroutinefunction(inspect.unwrap(value)):
        log.warning(
            "%s:%s (%s) is a coroutine function: not redirected, since its callers await it",
            module,
            name,
            where,
        )
        return None
    replacement: Callable[..., Any] = _replacement(value, f"{module}.{name}", namespace)
    with _lock:
        _made.append((namespace, name, value, replacement))
        first = (module, name) not in _logged
        _logged.add((module, name))
    if first:
        log.info(
            "%s:%s (%s) now runs mlauth's locked refresh instead of its own; "
            "`mlauth run --no-redirect` or install(redirect=False) leaves it alone",
            module,
            name,
            where,
        )
    return replacement


def replace(
    namespace: Namespace, name: str, module: str, where: str, *, defined: bool = False
) -> bool:
    """Replace ``namespace[name]`` with mlauth's refresh; returns whether it did.

    ``defined``: the caller knows that module's own ``def`` bound the name (the script
    watch saw it run, or the module's source has it), so whatever that bound is replaced,
    a decorator's wrapper with its code elsewhere included. Otherwise only a callable whose
    code the module holds (through ``__wrapped__``) is: a function imported from another
    module is left to that module. Coroutine functions and classes are always left alone. In
    a copy of the namespace the script ran in (``__mp_main__``), it is replaced in both.
    """
    value = namespace.get(name)
    owner = _module_namespace(value)
    if owner is not None and owner is not namespace:
        if _copied_from(namespace, owner) and owner.get(name) is value:
            return _replace_in_run(owner, namespace, name, module, where)
        if not defined:
            return False  # imported from another module: redirected there, if at all
    replacement = _redirect(value, namespace, module, name, where)
    if replacement is None:
        return False
    namespace[name] = replacement
    return True


def _copied_from(namespace: Namespace, run: Namespace) -> bool:
    """Whether ``namespace`` is a copy of the dict a script ran in: ``runpy.run_path``
    returns one, which multiprocessing's spawn and forkserver processes make ``__mp_main__``."""
    name, filename = namespace.get("__name__"), namespace.get("__file__")
    return filename is not None and (name, filename) == (run.get("__name__"), run.get("__file__"))


def _replace_in_run(
    run: Namespace, namespace: Namespace, name: str, module: str, where: str
) -> bool:
    # The script's functions read their globals from the dict it ran in: the replacement
    # goes there (and writes the globals there), and the copy gets the same one.
    if not replace(run, name, module, where):
        return False
    namespace[name] = run[name]
    return True


def redirect_defined(
    value: object, namespace: Namespace, module: str, name: str, line: object = None
) -> object:
    """What a rewritten module binds right after its ``def NAME`` at ``line`` (see
    ``imports.py``): the replacement of whatever the ``def`` and its decorators bound."""
    try:
        if _auth is None:
            return value
        where = f"{namespace.get('__file__')}, line {def_line(value) if line is None else line}"
        replacement = _redirect(value, namespace, module, name, where)
        return value if replacement is None else replacement
    except Exception:  # this runs inside the program's own module: never break it
        log.debug("could not redirect %s:%s", module, name, exc_info=True)
        return value


def def_line(value: object) -> object:
    code = getattr(inspect.unwrap(value), "__code__", None)  # type: ignore[arg-type]
    return getattr(code, "co_firstlineno", "?")


def restore_all() -> None:
    """Put every automatically replaced function back where it still is ours (uninstall)."""
    with _lock:
        made, _made[:] = list(_made), []
    for namespace, name, original, replacement in made:
        if namespace.get(name) is replacement:
            namespace[name] = original
