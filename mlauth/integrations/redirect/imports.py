"""Redirecting a refresh function as its module is imported (``python -m`` included).

A ``sys.meta_path`` finder asks the finders after it for the module, as the import system
would, and hands back what they found. Only when that is a plain source file whose text
mentions a name to redirect (the program's own module, or one named with ``--redirect``),
the module is compiled here, with one statement added after each top-level ``def NAME``::

    NAME = <mlauth's redirect_defined>(NAME, globals(), "module", "NAME")

so a call right after the ``def``, at import time, already runs mlauth's refresh. The added
statement carries the ``def``'s line number and nothing else moves, so tracebacks, line
numbers and ``inspect.getsource`` are the file's own. The compiled code is handed over by
the loader and never written to ``__pycache__``: the file's cached bytecode stays what
Python compiled, and a run without mlauth gets the original function.

Everything else (other modules, a file that does not parse, an extension module, a zip)
goes through untouched; a syntax error is raised by Python's own loader, as it would be.
runpy (``python -m pkg.mod``) asks the same finder and the loader's ``get_code``, so the
module run as ``__main__`` is rewritten too.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec

from .own import OwnFiles
from .plan import Plan

__all__ = ["RedirectFinder", "module_level_blocks", "rewrite"]

log = logging.getLogger("mlauth")

HOOK_MODULE = "mlauth.integrations.redirect.functions"

# The statements whose bodies are still at module level.
_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _hook_call(name: str, module: str) -> ast.expr:
    """``__import__(HOOK_MODULE, fromlist=["_"]).redirect_defined(NAME, globals(), ...)``."""
    hook = ast.Attribute(
        value=ast.Call(
            func=ast.Name(id="__import__", ctx=ast.Load()),
            args=[ast.Constant(HOOK_MODULE)],
            keywords=[ast.keyword(arg="fromlist", value=ast.List([ast.Constant("_")], ast.Load()))],
        ),
        attr="redirect_defined",
        ctx=ast.Load(),
    )
    arguments: list[ast.expr] = [
        ast.Name(id=name, ctx=ast.Load()),
        ast.Call(func=ast.Name(id="globals", ctx=ast.Load()), args=[], keywords=[]),
        ast.Constant(module),
        ast.Constant(name),
    ]
    return ast.Call(func=hook, args=arguments, keywords=[])


def _redirecting(definition: ast.FunctionDef, module: str) -> ast.stmt:
    statement = ast.Assign(
        targets=[ast.Name(id=definition.name, ctx=ast.Store())],
        value=_hook_call(definition.name, module),
    )
    # On the def's own line, which has run already: no line is shown as run that was not.
    for node in ast.walk(statement):
        if "lineno" in node._attributes:
            node.lineno = node.end_lineno = definition.lineno  # type: ignore[attr-defined]
            node.col_offset = node.end_col_offset = definition.col_offset  # type: ignore[attr-defined]
    return statement


def module_level_blocks(node: ast.stmt) -> Iterator[list[ast.stmt]]:
    """The statement lists inside if/try/with/for/while/match: still module level."""
    for field in ("body", "orelse", "finalbody"):
        value = getattr(node, field, None)
        if isinstance(value, list):
            yield value
    for part in [*getattr(node, "handlers", ()), *getattr(node, "cases", ())]:
        yield part.body  # an except clause, a match case


def _insert(body: list[ast.stmt], names: frozenset[str], module: str) -> int:
    """Add the redirecting statement after each top-level ``def`` of a name; returns how many."""
    added = 0
    for index in range(len(body) - 1, -1, -1):
        node = body[index]
        if isinstance(node, ast.FunctionDef):
            if node.name in names:
                body.insert(index + 1, _redirecting(node, module))
                added += 1
        elif not isinstance(node, (ast.AsyncFunctionDef, ast.ClassDef)):
            for block in module_level_blocks(node):
                added += _insert(block, names, module)
    return added


def rewrite(
    source: bytes, filename: str, names: frozenset[str], module: str
) -> types.CodeType | None:
    """The module's code with its top-level ``def``s of ``names`` redirected; None if it has
    none, or does not parse (Python's own loader then reports it as usual)."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return None
    if not _insert(tree.body, names, module):
        return None
    code: types.CodeType = compile(tree, filename, "exec", dont_inherit=True)
    return code


class _RewrittenLoader(importlib.machinery.SourceFileLoader):
    """Python's source loader, with the code compiled by :func:`rewrite` handed over as is."""

    def __init__(self, fullname: str, path: str, code: types.CodeType) -> None:
        super().__init__(fullname, path)
        self._code = code

    def get_code(self, fullname: str) -> types.CodeType:
        # Neither read from nor written to __pycache__: that bytecode is the file's own.
        return self._code


class RedirectFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds modules as the finders after it do, and rewrites
    the few that define a function to redirect (see the module docstring)."""

    def __init__(self, plan: Plan, own: OwnFiles) -> None:
        self.plan = plan
        self.own = own

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> ModuleSpec | None:
        spec = self._find_after_us(fullname, path, target)
        if spec is not None and self.plan:
            try:
                self._rewrite(fullname, spec)
            except Exception:  # an import must never fail because of us
                log.debug("not redirecting in %s", fullname, exc_info=True)
        return spec

    def _find_after_us(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None
    ) -> ModuleSpec | None:
        finders = list(sys.meta_path)
        rest = finders[finders.index(self) + 1 :] if self in finders else finders
        for finder in rest:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                return None  # a legacy finder: let the import system ask them all, in order
            spec: ModuleSpec | None = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _rewrite(self, fullname: str, spec: ModuleSpec) -> None:
        loader, origin = spec.loader, spec.origin
        if type(loader) is not importlib.machinery.SourceFileLoader or not origin:
            return
        names = self.plan.names([fullname], origin in self.own)
        if not names:
            return
        source = loader.get_data(origin)
        if not any(name.encode() in source for name in names):
            return  # the common case: read once (from the page cache), not parsed
        code = rewrite(source, origin, names, fullname)
        if code is not None:
            spec.loader = _RewrittenLoader(fullname, origin, code)
