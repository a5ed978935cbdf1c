"""Redirecting a refresh function as its module is imported (``python -m`` included).

A ``sys.meta_path`` finder asks the finders after it for the module, as the import system
would, and hands back what they found. Only when that is a plain source file whose text
mentions a name to redirect (the program's own module, or one named with ``--redirect``),
the module is compiled here, with one statement added after each top-level ``def NAME``::

    NAME = <mlauth's redirect_defined>(NAME, globals(), "module", "NAME", LINE)

so a call right after the ``def``, at import time, already runs mlauth's refresh, whatever
object the ``def`` and its decorators bound to the name. The added
statement carries the ``def``'s line number and nothing else moves, so tracebacks, line
numbers and ``inspect.getsource`` are the file's own. The compiled code is handed over by
the loader and never written to ``__pycache__``: the file's cached bytecode stays what
Python compiled, and a run without mlauth gets the original function.

Everything else (other modules, a file that does not parse, an extension module, a zip)
goes through untouched; a syntax error is raised by Python's own loader, as it would be.
runpy (``python -m pkg.mod``) asks the same finder and the loader's ``get_code``, so the
module run as ``__main__`` is rewritten too. A module named with ``--redirect`` that has no
top-level ``def`` of the name gets a warning (``missing.py``) as it is imported.

The finder also lets ``__init__`` patch a module as soon as it is loaded (``patches``):
``workers.py`` uses it for ``multiprocessing.spawn``.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from importlib.machinery import ModuleSpec

from . import absent
from .defs import module_level_blocks, parse, top_level_defs
from .missing import warn_unless_defined
from .own import OwnFiles
from .plan import Plan

__all__ = ["RedirectFinder", "rewrite", "rewrite_tree"]

log = logging.getLogger("mlauth")

HOOK_MODULE = "mlauth.integrations.redirect.functions"


def _hook_call(name: str, module: str, line: int) -> ast.expr:
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
        ast.Constant(line),  # the def's: a decorator's wrapper may have its code elsewhere
    ]
    return ast.Call(func=hook, args=arguments, keywords=[])


def _redirecting(definition: ast.FunctionDef, module: str) -> ast.stmt:
    statement = ast.Assign(
        targets=[ast.Name(id=definition.name, ctx=ast.Store())],
        value=_hook_call(definition.name, module, definition.lineno),
    )
    # On the def's own line, which has run already: no line is shown as run that was not.
    for node in ast.walk(statement):
        if "lineno" in node._attributes:
            node.lineno = node.end_lineno = definition.lineno  # type: ignore[attr-defined]
            node.col_offset = node.end_col_offset = definition.col_offset  # type: ignore[attr-defined]
    return statement


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
    tree = parse(source, filename)
    return None if tree is None else rewrite_tree(tree, filename, names, module)


def rewrite_tree(
    tree: ast.Module, filename: str, names: frozenset[str], module: str
) -> types.CodeType | None:
    """:func:`rewrite` of a parsed module (``tree`` is changed); None if nothing was added."""
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


class _PatchedAfterExec(importlib.abc.Loader):
    """A module's own loader, then ``patch(module)``. The module's ``__loader__`` and
    ``__spec__.loader`` are put back to its own loader before it runs: only the finder's
    answer ever held this one."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[types.ModuleType], None]):
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.patch(module)
        except Exception:  # the import itself succeeded: it must not fail because of us
            log.debug("could not patch %s", module.__name__, exc_info=True)


Patches = Mapping[str, Callable[[types.ModuleType], None]]


class RedirectFinder(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: finds modules as the finders after it do, and rewrites
    the few that define a function to redirect (see the module docstring)."""

    # absent.py looks modules up without this finder: asking it reads and rewrites.
    mlauth_skip_in_lookups = True

    def __init__(self, plan: Plan, own: OwnFiles, patches: Patches | None = None) -> None:
        self.plan = plan
        self.own = own
        self.patches: Patches = patches or {}

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: types.ModuleType | None = None,
    ) -> ModuleSpec | None:
        spec = self._find_after_us(fullname, path, target)
        if spec is not None and absent.waiting():
            absent.importing(fullname, spec.origin)  # looks like a misspelt --redirect one?
        if spec is not None and self.plan:
            try:
                self._rewrite(fullname, spec)
            except Exception:  # an import must never fail because of us
                log.debug("not redirecting in %s", fullname, exc_info=True)
        patch = self.patches.get(fullname)
        if spec is not None and patch is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchedAfterExec(spec.loader, patch)  # type: ignore[arg-type]
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
        named = self.plan.named_in([fullname])
        source = loader.get_data(origin)
        if not named and not any(name.encode() in source for name in names):
            return  # the common case: read once (from the page cache), not parsed
        tree = parse(source, origin)
        if tree is None:
            return
        if named:  # a name given by the user: say so if the module has no such def
            warn_unless_defined(named, {node.name for node in top_level_defs(tree.body)}, origin)
        code = rewrite_tree(tree, origin, names, fullname)
        if code is not None:
            spec.loader = _RewrittenLoader(fullname, origin, code)
