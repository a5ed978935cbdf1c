"""The top-level ``def``s of a module's source, as :mod:`ast` reads them.

"Top level" is what runs in the module's own namespace: the module's body and the bodies of
its if/try/with/for/while/match statements, not classes or functions. The import hook adds
its statement after these, the script watch follows them, and a ``--redirect`` name that is
not among them gets a warning.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

__all__ = ["module_level_blocks", "parse", "read_defs", "top_level_defs"]


def parse(source: bytes, filename: str) -> ast.Module | None:
    """The module's tree; None if it does not parse (Python reports that itself)."""
    try:
        return ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return None


def module_level_blocks(node: ast.stmt) -> Iterator[list[ast.stmt]]:
    """The statement lists inside if/try/with/for/while/match: still module level."""
    for field in ("body", "orelse", "finalbody"):
        value = getattr(node, field, None)
        if isinstance(value, list):
            yield value
    for part in [*getattr(node, "handlers", ()), *getattr(node, "cases", ())]:
        yield part.body  # an except clause, a match case


def top_level_defs(body: list[ast.stmt]) -> Iterator[ast.FunctionDef]:
    """Each top-level ``def`` (not ``async def``), in the order of the source."""
    for node in body:
        if isinstance(node, ast.FunctionDef):
            yield node
        elif not isinstance(node, (ast.AsyncFunctionDef, ast.ClassDef)):
            for block in module_level_blocks(node):
                yield from top_level_defs(block)


def read_defs(filename: str) -> list[ast.FunctionDef] | None:
    """The top-level ``def``s of a source file; None if it cannot be read or parsed."""
    try:
        with open(filename, "rb") as handle:
            source = handle.read()
    except (OSError, ValueError):
        return None
    tree = parse(source, filename)
    return None if tree is None else list(top_level_defs(tree.body))
