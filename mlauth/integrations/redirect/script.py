"""Redirecting a refresh function defined in the script itself (``python main2.py``).

The interpreter compiles and runs the script as ``__main__`` without the import system, so
the finder of ``imports.py`` never sees it, and the function is often called right after its
``def`` or from ``main()`` at start-up. So, only when the script's text names a function to
redirect and :mod:`ast` finds its ``def`` at the top level, the script's own frame is watched
line by line until a line after the last such ``def`` starts (or the frame returns). Each
time a ``def`` of the name has run (the line before was one of its lines, decorators
included, and the name holds something new), whatever it bound is replaced before the next
line runs: the rule is "what the module's ``def`` bound to the name", as the import hook's, so
a decorator's wrapper whose code lives in another module is replaced too, and a function
imported under the name is not. Then the watch is removed, whether a ``def`` ran or not: no
cost remains, and a program without such a function never pays for more than reading its
script once.

``workers.py`` uses the same watch for the copy of the script that multiprocessing's spawn
and forkserver processes run as ``__mp_main__`` (its frame is then known by its file name).

How the frame is watched:

- Python 3.12+: :mod:`sys.monitoring`, with a tool id of its own (4, or 3; ids 0-2 and 5 are
  the debugger's, coverage's, the profiler's and the optimizer's). ``PY_START`` events until
  the script starts (each other function is disabled at its first event), then ``LINE`` and
  ``PY_RETURN`` events of the script's code object alone. Other tools and ``sys.settrace``
  users are not disturbed.
- Python 3.10 and 3.11 (or when both ids are taken): ``sys.settrace``, whose global function
  lets every other frame go untraced and whose local function follows the script's frame
  alone. If a trace function is already set (a debugger, coverage), mlauth steps aside: it
  does not replace or chain theirs (coverage's C tracer reinstalls itself when called from
  another tracer), and warns that this script's function is not redirected.

A ``--redirect`` name for the script that it does not define gets its warning here, at
start-up (``missing.py``). Nothing is changed in the script: not its code, ``__file__``,
``sys.argv``, tracebacks or exit code.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import types
import zipfile
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .defs import parse, top_level_defs
from .functions import is_redirect, replace
from .missing import warn_unless_defined
from .own import OwnFiles
from .plan import MAIN, MP_MAIN, Plan, script_aliases

__all__ = ["ScriptWatch", "watch_run", "watch_script"]

log = logging.getLogger("mlauth")

# sys.monitoring ids left for tools other than a debugger, coverage, a profiler, an optimizer.
_TOOL_IDS = (4, 3)

TraceFunction = Callable[[types.FrameType, str, Any], Any]


@dataclass(frozen=True)
class Definition:
    """A top-level ``def`` of a watched name, by the lines it runs in the module's frame."""

    name: str
    first: int  # the first decorator's line, or the def's own
    last: int
    line: int  # the def's own line, for the log


def _definitions(defs: list[ast.FunctionDef], names: frozenset[str]) -> list[Definition]:
    return [
        Definition(
            node.name,
            min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)]),
            node.end_lineno or node.lineno,
            node.lineno,
        )
        for node in defs
        if node.name in names
    ]


class ScriptWatch:
    """Replaces what the watched ``def``s bind in the script's namespace, as they run.

    ``namespace`` is the script's (``__main__``'s), or None for a run whose namespace is
    made as it starts (``runpy.run_path``): its frame is then the ``<module>`` code of
    ``path`` run as ``run_name``."""

    def __init__(
        self,
        path: str,
        module: str,
        definitions: list[Definition],
        namespace: MutableMapping[str, Any] | None = None,
        run_name: str | None = None,
    ) -> None:
        self.path = path
        self.module = module  # the name its redirects are logged under
        self.definitions = definitions
        self.last_line = max(definition.last for definition in definitions)
        self.run_name = run_name
        self.namespace: MutableMapping[str, Any] | None = None
        # What each name held at the previous line: only a new binding by a def counts.
        self._seen: dict[str, Any] = {}
        self._previous: int | None = None
        self.stopped = False
        self._stop: Callable[[], None] = lambda: None
        if namespace is not None:
            self._attach(namespace)

    def _attach(self, namespace: MutableMapping[str, Any]) -> None:
        self.namespace = namespace
        self._seen = {name: namespace.get(name) for name in {d.name for d in self.definitions}}

    def matches(self, frame: types.FrameType) -> bool:
        """Whether a frame that starts runs the watched module code (and then watch it)."""
        if frame.f_code.co_name != "<module>":
            return False
        if self.namespace is not None:
            return frame.f_globals is self.namespace
        code, name = frame.f_code, frame.f_globals.get("__name__")
        if code.co_filename != self.path or name != self.run_name:
            return False
        self._attach(frame.f_globals)
        return True

    def line(self, lineno: int | None) -> bool:
        """At each line of the script (None: its frame returns): redirect what a ``def``
        bound; False once there is no more to watch (the caller then removes the watch).
        Never raises: an exception here would surface in the script, at its line."""
        try:
            return self._check(lineno)
        except Exception:  # a watch must never break the script
            log.debug("stopped watching %s", self.path, exc_info=True)
            return False

    def _check(self, lineno: int | None) -> bool:
        namespace = self.namespace
        if namespace is None:
            return False
        previous, self._previous = self._previous, lineno
        for definition in self.definitions:
            if previous is not None and definition.first <= previous <= definition.last:
                self._redirect(namespace, definition)
        for name in self._seen:
            self._seen[name] = namespace.get(name)
        return lineno is not None and lineno <= self.last_line

    def _redirect(self, namespace: MutableMapping[str, Any], definition: Definition) -> None:
        """The line before was the def's: if the name holds something new, the def bound it."""
        value = namespace.get(definition.name)
        if value is self._seen[definition.name] or is_redirect(value):
            return  # the def raised (in a decorator, say): nothing new is bound
        where = f"{self.path}, line {definition.line}"
        replace(namespace, definition.name, self.module, where, defined=True)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._stop()

    # -- sys.monitoring (3.12+) ----------------------------------------------------------

    def start_monitoring(self, code: types.CodeType | None) -> bool:
        monitoring: Any = getattr(sys, "monitoring", None)
        if monitoring is None:
            return False
        tool = next((i for i in _TOOL_IDS if monitoring.get_tool(i) is None), None)
        if tool is None:
            return False
        events = monitoring.events
        monitoring.use_tool_id(tool, "mlauth")
        watched: list[types.CodeType] = []

        def watch(code: types.CodeType) -> None:
            watched.append(code)
            monitoring.set_events(tool, 0)  # no more PY_START, for any function
            monitoring.set_local_events(tool, code, events.LINE | events.PY_RETURN)

        def on_start(code: types.CodeType, offset: int) -> object:
            # The script's module code (the frame that started is the caller's).
            if code.co_name == "<module>" and self.matches(sys._getframe(1)):
                try:
                    watch(code)
                except Exception:  # never into the script
                    log.debug("not watching %s", self.path, exc_info=True)
                    self.stop()
                return None
            return monitoring.DISABLE  # this function never reports a start again

        def on_line(code: types.CodeType, lineno: int) -> object:
            if not self.line(lineno):
                self.stop()
            return None

        def on_return(code: types.CodeType, offset: int, value: object) -> object:
            self.line(None)  # a def on the last lines: what it bound is redirected still
            self.stop()
            return None

        def stop() -> None:
            monitoring.set_events(tool, 0)
            for code in watched:
                monitoring.set_local_events(tool, code, 0)
            for event in (events.PY_START, events.LINE, events.PY_RETURN):
                monitoring.register_callback(tool, event, None)
            monitoring.free_tool_id(tool)

        self._stop = stop
        monitoring.register_callback(tool, events.LINE, on_line)
        monitoring.register_callback(tool, events.PY_RETURN, on_return)
        if code is not None:
            watch(code)
        else:
            monitoring.register_callback(tool, events.PY_START, on_start)
            monitoring.set_events(tool, events.PY_START)
        return True

    # -- sys.settrace (3.10, 3.11) ---------------------------------------------------------

    def start_tracing(self, frame: types.FrameType | None) -> bool:
        if sys.gettrace() is not None:
            return False

        def untraced(frame: types.FrameType, event: str, arg: object) -> None:
            return None  # every frame but the script's runs without a local trace

        def on_call(frame: types.FrameType, event: str, arg: object) -> TraceFunction | None:
            if frame.f_code.co_name == "<module>" and self.matches(frame):
                sys.settrace(untraced)
                return local
            return None

        def local(frame: types.FrameType, event: str, arg: object) -> TraceFunction | None:
            if event == "exception" or (event == "line" and self.line(frame.f_lineno)):
                return local
            if event == "return":
                self.line(None)  # a def on the last lines: what it bound is redirected still
            frame.f_trace = None
            self.stop()
            return None

        def stop() -> None:
            if sys.gettrace() in (untraced, on_call):  # not a tracer someone set since
                sys.settrace(None)

        self._stop = stop
        if frame is not None:
            frame.f_trace = local
            sys.settrace(untraced)
        else:
            sys.settrace(on_call)
        return True


def _script() -> tuple[str, types.FrameType | None, str] | None:
    """The script's path, its frame if it is running already (install() called from the
    script), and the name it runs as: ``__main__``, or ``__mp_main__`` for the copy that a
    spawn or forkserver process runs. None for ``-c``, ``-m`` (see imports.py), a folder or
    zip, the REPL."""
    main = sys.modules.get(MAIN)
    if main is None:
        return None
    frame: types.FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            if frame.f_globals is vars(main):
                return frame.f_code.co_filename, frame, MAIN
            if frame.f_globals.get("__name__") == MP_MAIN:
                return frame.f_code.co_filename, frame, MP_MAIN
        frame = frame.f_back
    if "__file__" in vars(main):
        return None  # it ran already, or runpy runs it: the import hook's and the scan's
    path = sys.argv[0] if sys.argv else ""
    return (path, None, MAIN) if path not in ("", "-", "-c", "-m") else None


def _read(path: str, names: frozenset[str], named: list[tuple[str, str]]) -> list[Definition]:
    """The script's top-level ``def``s of ``names``; a warning for each ``named`` pair whose
    function it does not define."""
    if not names or not os.path.isfile(path):
        return []
    try:
        with open(path, "rb") as handle:
            source = handle.read()
    except OSError:
        return []
    if not named and not any(name.encode() in source for name in names):
        return []  # the common case: no need to parse
    if zipfile.is_zipfile(path):
        return []
    tree = parse(source, path)
    if tree is None:
        return []  # Python reports it when it compiles the script
    defs = list(top_level_defs(tree.body))
    warn_unless_defined(named, {node.name for node in defs}, path)
    return _definitions(defs, names)


def _start(watch: ScriptWatch, frame: types.FrameType | None) -> ScriptWatch | None:
    code = frame.f_code if frame is not None else None
    if sys.version_info >= (3, 12) and watch.start_monitoring(code):
        return watch
    if watch.start_tracing(frame):
        return watch
    log.warning(
        "%s defines %s, but a trace function is already set (a debugger, coverage?), so "
        "mlauth cannot redirect it before it runs: move it into a module the script imports "
        "(imported modules need no tracing), or run without the tracer",
        watch.path,
        " and ".join(sorted({f"{definition.name}()" for definition in watch.definitions})),
    )
    return None


def watch_script(plan: Plan, own: OwnFiles) -> ScriptWatch | None:
    """Start watching the script for the functions to redirect; None if there are none."""
    found = _script()
    if found is None:
        return None
    path, frame, module = found
    aliases = script_aliases(path, module)
    # The copy a spawned process runs gets no warnings: the parent gave them.
    named = plan.named_in(aliases) if module == MAIN else []
    definitions = _read(path, plan.names(aliases, path in own), named)
    if not definitions:
        return None
    namespace = frame.f_globals if frame is not None else vars(sys.modules[MAIN])
    return _start(ScriptWatch(path, module, definitions, namespace=namespace), frame)


def watch_run(path: str, plan: Plan, own: OwnFiles) -> ScriptWatch | None:
    """Start watching the script at ``path`` that is about to run as ``__mp_main__`` (through
    ``runpy.run_path``); None if it defines nothing to redirect. Its ``--redirect`` names get
    no warning here: the process that ran it as ``__main__`` gave it."""
    aliases = script_aliases(path, MP_MAIN)
    definitions = _read(path, plan.names(aliases, path in own), [])
    if not definitions:
        return None
    return _start(ScriptWatch(path, MP_MAIN, definitions, run_name=MP_MAIN), None)
