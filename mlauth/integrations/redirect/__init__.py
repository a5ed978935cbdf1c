"""Legacy refresh functions redirected to mlauth's locked refresh, with no wrapper script.

:func:`mlauth.install` (and so ``mlauth run``) starts this: every top-level function named
``refresh_ml_token`` in the program's own modules (``own.py`` says which those are), and every
``MODULE:FUNCTION`` named with ``--redirect``/``install(redirect=[...])``, is replaced by a
function that runs mlauth's single-flight refresh (``functions.py``), as soon as its ``def``
has run. The rule is "what the module's ``def`` bound to the name", whatever decorators made
of it:

- in modules imported from then on, ``python -m`` included: an import hook (``imports.py``);
- in the script itself: a watch of the script's frame until the ``def`` has run
  (``script.py``);
- in the copy of the script that multiprocessing's spawn and forkserver processes run
  (``workers.py``);
- in modules imported before: at once.

A name given with ``--redirect`` that its module does not define gets a warning
(``missing.py``), and so does a module the program does not have (``absent.py``).
:func:`mlauth.uninstall` removes the hook and the watch and puts the original functions back.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import absent, functions, workers
from .defs import read_defs
from .imports import RedirectFinder
from .missing import warn_unless_defined
from .own import OwnFiles
from .plan import DEFAULT_NAME, MAIN, MP_MAIN, Plan, script_aliases
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
    _start_finder(plan, _own)
    try:
        _redirect_imported(plan, _own)
        _watch = watch_script(plan, _own)
        absent.check(plan, _own)
    except Exception as exc:  # noqa: BLE001 (install() itself must not fail for this)
        log.warning("could not look for legacy refresh functions to redirect: %r", exc)


def add(redirect: Redirect) -> None:
    """A later ``install(redirect=[...])``: add its named functions (the default stays)."""
    if _plan is None or _own is None or isinstance(redirect, bool):
        return
    if not _plan.add([redirect] if isinstance(redirect, str) else redirect):
        return
    if _finder is None:
        _start_finder(_plan, _own)
    _redirect_imported(_plan, _own)
    try:
        absent.check(_plan, _own)
    except Exception as exc:  # noqa: BLE001 (install() itself must not fail for a warning)
        log.warning("could not look for the modules named to redirect: %r", exc)


def _start_finder(plan: Plan, own: OwnFiles) -> None:
    global _finder
    _finder = RedirectFinder(plan, own, patches={workers.MODULE: workers.patch})
    sys.meta_path.insert(0, _finder)
    workers.start(plan, own)


def stop() -> None:
    global _plan, _finder, _watch
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    if _watch is not None:
        _watch.stop()
    workers.stop()
    absent.stop()
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
        script = name in (MAIN, MP_MAIN)
        aliases = script_aliases(filename, name) if script and isinstance(filename, str) else [name]
        names = set(plan.names(aliases, own=False))
        if plan.default and DEFAULT_NAME in namespace and filename in own:
            names.add(DEFAULT_NAME)
        if not names:
            continue
        if not script:  # the script's names are checked by the watch, from its source
            callables = {key for key, value in namespace.items() if callable(value)}
            warn_unless_defined(plan.named_in(aliases), callables, str(filename))
        # A def in its source bound the name, whatever a decorator made of it.
        defs = read_defs(filename) if isinstance(filename, str) else None
        lines = {node.name: node.lineno for node in defs or ()}  # the last def of each name
        for function in names & set(namespace):
            line = lines.get(function)
            where = f"{filename}, line {line}" if line else str(filename)
            functions.replace(namespace, function, name, where, defined=line is not None)
