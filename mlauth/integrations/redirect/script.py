"""Redirecting a refresh function defined in the script itself (``python main2.py``).

The interpreter compiles and runs the script as ``__main__`` without the import system, so
the finder of ``imports.py`` never sees it, and the function is often called right after its
``def`` or from ``main()`` at start-up. So, only when the script's text names a function to
redirect and :mod:`ast` finds its ``def`` at the top level, the script's own frame is watched
line by line until the ``def`` has run (the name is bound to a new function: it is replaced
before the next line runs) or the last top-level statement holding such a ``def`` is over.
Then the watch is removed: no cost remains, and a program without such a function never
pays for more than reading its script once.

How the frame is watched:

- Python 3.12+: :mod:`sys.monitoring`, with a tool id of its own (4, or 3; ids 0-2 and 5 are
  the debugger's, coverage's, the profiler's and the optimizer's). ``PY_START`` events until
  the script starts (each other function is disabled at its first event), then ``LINE``
  events of the script's code object alone. Other tools and ``sys.settrace`` users are not
  disturbed.
- Python 3.10 and 3.11 (or when both ids are taken): ``sys.settrace``, whose global function
  lets every other frame go untraced and whose local function follows the script's frame
  alone. If a trace function is already set (a debugger, coverage), mlauth steps aside: it
  does not replace or chain theirs (coverage's C tracer reinstalls itself when called from
  another tracer), and warns that this script's function is not redirected.

Nothing is changed in the script: not its code, ``__file__``, ``sys.argv``, tracebacks or
exit code.
"""

from __future__ import annotations

import ast
import logging
import os
import sys
import types
import zipfile
from collections.abc import Callable, MutableMapping
from typing import Any

from .functions import def_line, is_redirect, replace
from .imports import module_level_blocks
from .own import OwnFiles
from .plan import MAIN, Plan

__all__ = ["ScriptWatch", "watch_script"]

log = logging.getLogger("mlauth")

# sys.monitoring ids left for tools other than a debugger, coverage, a profiler, an optimizer.
_TOOL_IDS = (4, 3)

TraceFunction = Callable[[types.FrameType, str, Any], Any]


def _top_level_defs(source: bytes, filename: str, names: frozenset[str]) -> int | None:
    """The last line of the last top-level statement holding a ``def`` of ``names`` (a
    ``def``, or an if/try/with/... around one); None if there is none."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return None  # Python reports it when it compiles the script

    def holds(node: ast.stmt) -> bool:
        if isinstance(node, ast.FunctionDef):
            return node.name in names
        if isinstance(node, (ast.AsyncFunctionDef, ast.ClassDef)):
            return False
        return any(holds(child) for block in module_level_blocks(node) for child in block)

    last = [node.end_lineno or node.lineno for node in tree.body if holds(node)]
    return max(last) if last else None


class ScriptWatch:
    """Replaces the watched names in the script's namespace as their ``def``s bind them."""

    def __init__(
        self, namespace: MutableMapping[str, Any], names: frozenset[str], last_line: int, path: str
    ) -> None:
        self.namespace = namespace
        self.last_line = last_line
        self.path = path
        self._waiting = set(names)
        # What the names held before (an import, a placeholder): only a new binding counts.
        self._before = {name: namespace.get(name) for name in names}
        self.stopped = False
        self._stop: Callable[[], None] = lambda: None

    def line(self, lineno: int | None) -> bool:
        """At each line of the script: redirect what is bound; False once there is no more
        to watch (the caller then removes the watch). Never raises: an exception here would
        surface in the script, at its line."""
        try:
            return self._check(lineno)
        except Exception:  # a watch must never break the script
            log.debug("stopped watching %s", self.path, exc_info=True)
            return False

    def _check(self, lineno: int | None) -> bool:
        for name in list(self._waiting):
            value = self.namespace.get(name)
            if value is self._before[name] or not callable(value):
                continue
            where = f"{self.path}, line {def_line(value)}"
            if is_redirect(value) or replace(self.namespace, name, MAIN, where):
                self._waiting.discard(name)
            else:
                self._before[name] = value  # imported from elsewhere: wait for the def
        return bool(self._waiting) and (lineno is None or lineno <= self.last_line)

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
            monitoring.set_local_events(tool, code, events.LINE)

        def on_start(code: types.CodeType, offset: int) -> object:
            # The script's module code, run in __main__'s namespace: the frame that started.
            if code.co_name == "<module>" and sys._getframe(1).f_globals is self.namespace:
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

        def stop() -> None:
            monitoring.set_events(tool, 0)
            for code in watched:
                monitoring.set_local_events(tool, code, 0)
            monitoring.register_callback(tool, events.PY_START, None)
            monitoring.register_callback(tool, events.LINE, None)
            monitoring.free_tool_id(tool)

        self._stop = stop
        monitoring.register_callback(tool, events.LINE, on_line)
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
            if frame.f_code.co_name == "<module>" and frame.f_globals is self.namespace:
                sys.settrace(untraced)
                return local
            return None

        def local(frame: types.FrameType, event: str, arg: object) -> TraceFunction | None:
            if event == "return" or (event == "line" and not self.line(frame.f_lineno)):
                frame.f_trace = None
                self.stop()
                return None
            return local

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


def _script() -> tuple[str, types.FrameType | None] | None:
    """The script's path, and its frame if it is running already (install() called from the
    script); None for ``-c``, ``-m`` (see imports.py), a folder or zip, the REPL."""
    main = sys.modules.get(MAIN)
    if main is None:
        return None
    frame: types.FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_globals is vars(main) and frame.f_code.co_name == "<module>":
            return frame.f_code.co_filename, frame
        frame = frame.f_back
    if "__file__" in vars(main):
        return None  # it ran already, or runpy runs it: the import hook's and the scan's
    path = sys.argv[0] if sys.argv else ""
    return (path, None) if path not in ("", "-", "-c", "-m") else None


def watch_script(plan: Plan, own: OwnFiles) -> ScriptWatch | None:
    """Start watching the script for the functions to redirect; None if there are none."""
    found = _script()
    if found is None:
        return None
    path, frame = found
    stem = os.path.splitext(os.path.basename(path))[0]
    names = plan.names([MAIN, stem], path in own)
    if not names or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as handle:
            source = handle.read()
    except OSError:
        return None
    if not any(name.encode() in source for name in names) or zipfile.is_zipfile(path):
        return None
    last_line = _top_level_defs(source, path, names)
    if last_line is None:
        return None
    watch = ScriptWatch(vars(sys.modules[MAIN]), names, last_line, path)
    code = frame.f_code if frame is not None else None
    if sys.version_info >= (3, 12) and watch.start_monitoring(code):
        return watch
    if watch.start_tracing(frame):
        return watch
    log.warning(
        "%s defines %s, but a trace function is already set (a debugger, coverage?), so "
        "mlauth cannot redirect it before it runs: move it into a module the script imports "
        "(imported modules need no tracing), or run without the tracer",
        path,
        " and ".join(f"{name}()" for name in sorted(names)),
    )
    return None
