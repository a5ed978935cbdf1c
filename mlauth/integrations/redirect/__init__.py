"""Legacy refresh functions redirected to mlauth's locked refresh, with no wrapper script.

:func:`mlauth.install` (and so ``mlauth run``) starts this: every top-level function named
``refresh_ml_token`` in the program's own modules (``own.py`` says which those are), and every
``MODULE:FUNCTION`` named with ``--redirect``/``install(redirect=[...])``, is replaced by a
function that runs mlauth's single-flight refresh (``functions.py``), as soon as its ``def``
has run:

- in modules imported from then on, ``python -m`` included: an import hook (``imports.py``);
- in the script itself: a watch of the script's frame until the ``def`` has run
  (``script.py``);
- in modules imported before: at once.

:func:`mlauth.uninstall` removes the hook and the watch and puts the original functions back.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import functions
from .imports import RedirectFinder
from .own import OwnFiles
from .plan import DEFAULT_NAME, MAIN, Plan
from .script import ScriptWatch, watch_script

if TYPE_CHECKING:
    from mlauth.integrations.adapter import AuthAdapter

__all__ = ["DEFAULT_NAME", "add", "plan_for", "start", "stop"]

log = logging.getLogger("mlauth")

Redirect = bool | Iterable[str]

_plan: Plan | None = None
_own: OwnFiles | None = None
_finder: RedirectFinder | None = None
_watch: ScriptWatch | None = None


def plan_for(redirect: Redirect) -> Plan:
    """``install(redirect=...)``: True (the default name), False (nothing), or ``MODULE:FUNCTION``
    strings, redirected besides the default name. ConfigError for a malformed one."""
    if isinstance(redirect, bool):
        return Plan(redirect)
    if isinstance(redirect, str):
        redirect = [redirect]  # one name, not its characters
    return Plan(True, list(redirect))


def start(auth: AuthAdapter, plan: Plan) -> None:
    """Redirect as ``plan`` says, to ``auth``, until :func:`stop` (called with install's lock)."""
    global _plan, _own, _finder, _watch
    functions.use_auth(auth)
    _plan, _own = plan, OwnFiles()
    if not plan:
        return
    _finder = RedirectFinder(plan, _own)
    sys.meta_path.insert(0, _finder)
    try:
        _redirect_imported(plan, _own)
        _watch = watch_script(plan, _own)
    except Exception as exc:  # noqa: BLE001 (install() itself must not fail for this)
        log.warning("could not look for legacy refresh functions to redirect: %r", exc)


def add(redirect: Redirect) -> None:
    """A later ``install(redirect=[...])``: add its named functions (the default stays)."""
    global _finder
    if _plan is None or _own is None or isinstance(redirect, bool):
        return
    if not _plan.add([redirect] if isinstance(redirect, str) else redirect):
        return
    if _finder is None:
        _finder = RedirectFinder(_plan, _own)
        sys.meta_path.insert(0, _finder)
    _redirect_imported(_plan, _own)


def stop() -> None:
    global _plan, _finder, _watch
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    if _watch is not None:
        _watch.stop()
    _plan = _finder = _watch = None
    functions.use_auth(None)
    functions.restore_all()


def _redirect_imported(plan: Plan, own: OwnFiles) -> None:
    """Redirect the functions of the modules imported before install()."""
    for name, module in list(sys.modules.items()):
        try:
            # Not vars(module): that would load a module that importlib's LazyLoader left lazy.
            namespace = object.__getattribute__(module, "__dict__")
        except AttributeError:
            continue
        if not isinstance(namespace, dict):
            continue
        filename = namespace.get("__file__")
        aliases = [name]
        if name == MAIN and isinstance(filename, str):
            aliases.append(os.path.splitext(os.path.basename(filename))[0])
        names = set(plan.names(aliases, own=False))
        if plan.default and DEFAULT_NAME in namespace and filename in own:
            names.add(DEFAULT_NAME)
        for function in names:
            functions.replace(namespace, function, name, str(filename))
