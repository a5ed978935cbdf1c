"""The script's copy in multiprocessing's *spawn* and *forkserver* processes.

Both start methods start a new interpreter (``python -c 'from multiprocessing.spawn import
spawn_main; ...'``, or the forkserver that forks the workers) and re-run the parent's script
there as ``__mp_main__``, so that the functions pickled by name can be found:
``multiprocessing.spawn._fixup_main_from_path`` calls ``runpy.run_path``, which compiles the
file itself, past the import hook. So the script's own ``refresh_ml_token()`` would run as
written in every worker (spawn is macOS's default start method, and forkserver Linux's from
Python 3.14).

That interpreter inherits ``mlauth run``'s environment, so it installs mlauth too
(``sitecustomize``), and the import hook wraps ``_fixup_main_from_path`` as soon as
``multiprocessing.spawn`` is imported: while it runs, the script's frame is watched as the
script's is in the parent (``script.py``), so its ``def`` is redirected as it runs, before
any module-level call; when it returns the watch is gone. A forkserver's workers are forked
from the server after it ran the script (its ``__main__`` preload) and inherit the redirected
function. A script run with ``python -m`` is re-run through the import system, where the
hook rewrites it as any module.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from typing import Any

from .own import OwnFiles
from .plan import Plan
from .script import watch_run

__all__ = ["MODULE", "patch", "start", "stop"]

log = logging.getLogger("mlauth")

MODULE = "multiprocessing.spawn"
_FIXUP = "_fixup_main_from_path"

_plan: Plan | None = None
_own: OwnFiles | None = None
# (the module, its function, our wrapper) once patched: it stays patched, and passes
# through while nothing is installed, unless uninstall() can put the original back.
_patched: tuple[types.ModuleType, Any, Any] | None = None


def start(plan: Plan, own: OwnFiles) -> None:
    """Redirect in the scripts the processes started from here run (called by install())."""
    global _plan, _own
    _plan, _own = plan, own
    module = sys.modules.get(MODULE)
    if module is not None:  # imported before install(); otherwise the import hook calls patch
        patch(module)


def patch(module: types.ModuleType) -> None:
    """Wrap ``module._fixup_main_from_path`` (once)."""
    global _patched
    original = getattr(module, _FIXUP, None)
    if not callable(original) or (_patched is not None and _patched[2] is original):
        return

    @functools.wraps(original)
    def fixup_main_from_path(main_path: str) -> Any:
        plan, own = _plan, _own
        current = sys.modules.get("__main__")
        if plan is None or own is None or getattr(current, "__file__", None) == main_path:
            # Uninstalled, or the script has run here already (a forkserver's worker): it
            # does not run again, and what it defined was redirected when it did.
            return original(main_path)
        try:
            watch = watch_run(main_path, plan, own)
        except Exception:  # the worker must start whatever happens here
            log.debug("not watching %s", main_path, exc_info=True)
            watch = None
        try:
            return original(main_path)
        finally:
            if watch is not None:
                watch.stop()  # whatever happened: no watch is left behind

    setattr(module, _FIXUP, fixup_main_from_path)
    _patched = (module, original, fixup_main_from_path)


def stop() -> None:
    """Put the original back (uninstall()), unless someone wrapped ours since."""
    global _plan, _own, _patched
    _plan = _own = None
    if _patched is not None:
        module, original, wrapper = _patched
        if getattr(module, _FIXUP, None) is wrapper:
            setattr(module, _FIXUP, original)
            _patched = None
