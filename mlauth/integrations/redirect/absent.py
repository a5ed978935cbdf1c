"""The warning for a module named with ``--redirect`` that the program does not have.

``--redirect pipline:refresh_token`` (``pipeline`` meant) must not leave the legacy refresh
live without a word. Nothing here imports the named module: its code is the program's, to
run when the program imports it, so it is only *looked for*, as the import system would
(``sys.meta_path``'s finders, a package's submodules in the folders its spec names).

- At start-up, a named module that can be found, or is imported already, is left alone: if
  the program imports it, however late, it is redirected; if it never does, its function
  never runs here. The script itself (``__main__``, its file name) is always there.
- One that cannot be found is a typo, or a folder the program puts on ``sys.path`` itself.
  To tell the two apart without a false alarm, the verdict waits for evidence:

  - a module that looks like it (``pipeline`` for ``pipline``, ``pkg.main2`` for ``main2``)
    is imported, or is the script about to run: the WARNING comes then, before that module's
    code runs, unless the named one can now be found;
  - at exit, the named module was never imported and still cannot be found: the WARNING
    comes then, in the process the user started (not in ``multiprocessing`` workers, nor in
    other Python processes the command started: a tool of its own that never imports the
    module would be a false alarm there).

``mlauth run`` installs from ``sitecustomize``, before the interpreter puts the script's
folder first on ``sys.path``: that folder (the current one for ``-m``) is searched too.
"""

from __future__ import annotations

import atexit
import difflib
import logging
import os
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from importlib.machinery import ModuleSpec, PathFinder

from .defs import read_defs
from .own import OwnFiles
from .plan import MAIN, MP_MAIN, Plan

__all__ = ["check", "findable", "importing", "lookalikes", "stop", "waiting"]

log = logging.getLogger("mlauth")

# A finder with this attribute set is mlauth's own (imports.RedirectFinder): asking it would
# read and rewrite, not just look.
SKIP_FINDER = "mlauth_skip_in_lookups"

# Module -> (its MODULE:FUNCTION pairs, the program's modules that look like it).
_pending: dict[str, tuple[list[str], list[str]]] = {}
_registered = False
_forked = False  # this process is a child of os.fork since check() found something pending


def _run_by_python() -> list[str]:
    """What the interpreter will put first on ``sys.path`` and has not yet (install() from
    ``sitecustomize`` runs before that), and the script's name without ``.py``."""
    main = sys.modules.get(MAIN)
    argv0 = sys.argv[0] if sys.argv else ""
    if main is None or "__file__" in vars(main) or getattr(sys.flags, "safe_path", False):
        return []
    if argv0 in ("", "-", "-c", "-m"):
        try:
            return [os.getcwd()]
        except OSError:  # the working folder was removed: Python puts nothing there either
            return []
    # Python resolves the script's symbolic link; the link's own folder costs nothing.
    return [os.path.dirname(os.path.abspath(argv0)), os.path.dirname(os.path.realpath(argv0))]


def _script_stem() -> str | None:
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 in ("", "-", "-c", "-m"):
        return None
    return os.path.splitext(os.path.basename(argv0))[0]  # as plan.script_aliases names it


def _spec(name: str, folders: Sequence[str]) -> ModuleSpec | None:
    """Where ``name`` would be imported from; nothing is imported (a parent package in
    ``sys.modules`` lends its ``__path__``, else its spec's search locations)."""
    module = sys.modules.get(name)
    if module is not None:
        spec = ModuleSpec(name, None, is_package=hasattr(module, "__path__"))
        if hasattr(module, "__path__"):
            spec.submodule_search_locations = list(module.__path__)
        return spec
    parent = name.rpartition(".")[0]
    path: list[str] | None = None
    if parent:
        outer = _spec(parent, folders)
        if outer is None or outer.submodule_search_locations is None:
            return None
        path = list(outer.submodule_search_locations)
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or getattr(finder, SKIP_FINDER, False):
            continue
        spec = find_spec(name, path)
        if spec is not None:
            return spec  # type: ignore[no-any-return]
    return PathFinder.find_spec(name, list(folders)) if not parent and folders else None


def findable(name: str, folders: Sequence[str] = ()) -> bool:
    """Whether ``name`` is imported, or the import system would find it (``folders`` searched
    besides ``sys.path`` for a top-level name). A finder that fails proves nothing: True."""
    try:
        return _spec(name, folders) is not None
    except Exception:  # a third-party finder's error: no false alarm
        log.debug("could not look for %s", name, exc_info=True)
        return True


def _program_modules(folders: Iterable[str], own: OwnFiles) -> set[str]:
    """The names of the program's own modules: in its folders (a package's too, one level
    down), and those imported from its own files."""
    names = {
        name
        for name, module in list(sys.modules.items())
        if getattr(module, "__file__", None) in own
    }
    for folder in dict.fromkeys(os.path.abspath(entry or os.curdir) for entry in folders):
        if not os.path.isdir(folder) or os.path.join(folder, "_") not in own:
            continue
        for info in pkgutil.iter_modules([folder]):
            names.add(info.name)
            if info.ispkg:
                inner = os.path.join(folder, info.name)
                names.update(f"{info.name}.{sub.name}" for sub in pkgutil.iter_modules([inner]))
    return names - {MAIN, MP_MAIN}


def lookalikes(missing: str, modules: Iterable[str]) -> list[str]:
    """The modules that may be the one meant: close spellings, then the same last part."""
    names = sorted(set(modules) - {missing})
    close = difflib.get_close_matches(missing, names, n=3, cutoff=0.75)
    last = missing.rpartition(".")[2]
    same = [name for name in names if name.rpartition(".")[2] == last and name not in close]
    return [*close, *same][:5]


def check(plan: Plan, own: OwnFiles) -> None:
    """At install(): look for each named module; warn, or wait for evidence (see above)."""
    global _registered
    folders = _run_by_python()
    stem = _script_stem()
    known = {MAIN, MP_MAIN, *([stem] if stem else [])}
    program: set[str] | None = None
    for module, pairs in plan.by_module().items():
        if module in known or module in _pending or findable(module, folders):
            continue
        if program is None:
            program = _program_modules([*sys.path, *folders], own)
            if stem:
                program.add(stem)
        similar = lookalikes(module, program)
        _pending[module] = (pairs, similar)
        for name in similar:
            if name == stem and sys.argv:
                origin: object = os.path.abspath(sys.argv[0])
            elif name in sys.modules:
                origin = getattr(sys.modules[name], "__file__", None)
            else:
                continue  # not here yet: the import hook asks when it comes
            if _defines(origin, pairs):
                _verdict(module, name)
                break
    if _pending and not _registered:
        _registered = True
        atexit.register(_at_exit)
        os.register_at_fork(after_in_child=_after_fork_in_child)


def waiting() -> bool:
    """Whether a named module is still looked for (the import hook's cheap test)."""
    return bool(_pending)


def importing(fullname: str, origin: str | None) -> None:
    """The import hook found ``fullname`` (its source at ``origin``), about to be imported:
    warn for a pending module that it looks like and that defines the function named with
    it, unless the named one can now be found (the program fixed its path)."""
    for module, (pairs, similar) in list(_pending.items()):
        if fullname in similar and _defines(origin, pairs):
            _verdict(module, fullname)


def _defines(origin: object, pairs: list[str]) -> bool:
    """Whether the source at ``origin`` defines, at its top level, a function some
    ``MODULE:FUNCTION`` pair names: only then is it evidence of a misspelt module (a launcher
    script named like the module it imports is not)."""
    if not isinstance(origin, str) or not origin.endswith(".py"):
        return False
    defs = read_defs(origin)
    names = {node.name for node in defs or ()}
    return any(pair.partition(":")[2] in names for pair in pairs)


def _verdict(module: str, seen: str | None) -> None:
    entry = _pending.pop(module, None)
    if entry is None or findable(module) or _worker():
        return
    parent = module.rpartition(".")[0]
    if seen is None and parent and parent not in sys.modules:
        # Its package never ran, so nothing of it could have; and where the package's
        # __init__ would look for it (pkgutil.extend_path) is known only once it runs.
        return
    pairs, similar = entry
    if seen is not None:
        meant = " ".join(f"--redirect {seen}:{pair.partition(':')[2]}" for pair in pairs)
        found = f"this program imports {seen} (or runs it as its script): did you mean {meant}?"
    elif similar:
        found = "modules of this program that look like it: " + ", ".join(similar) + "."
    else:
        found = "this program has no module that looks like it."
    log.warning(
        "redirect %s: no module %s can be found on this program's path%s, so nothing was "
        "redirected for it; %s Correct the module given to --redirect or "
        "install(redirect=[...]): the name the module is imported by (pkg.main2 for python "
        "-m pkg.main2), or %s or the script's file name without .py for the script itself",
        ", ".join(pairs),
        module,
        "" if seen is not None else " and the program never imported it",
        found,
        MAIN,
    )


def _worker() -> bool:
    """A multiprocessing worker, or a child of ``os.fork`` (a pre-fork server's worker): its
    parent warns (at exit, if nothing looking like the module ran there)."""
    if _forked:
        return True
    multiprocessing = sys.modules.get("multiprocessing")
    parent = getattr(multiprocessing, "parent_process", None)
    return callable(parent) and parent() is not None


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


def _at_exit() -> None:
    run_pid = os.environ.get("MLAUTH_RUN_PID")
    if run_pid is not None and run_pid != str(os.getpid()):
        _pending.clear()  # another Python the command started: see the module docstring
    try:
        for module in list(_pending):
            _verdict(module, None)
    except Exception:  # never a traceback at exit because of a warning
        log.debug("could not check the redirect modules", exc_info=True)


def stop() -> None:
    """uninstall(): nothing is waited for any more."""
    _pending.clear()
