"""The shape the package keeps: no import cycles, an engine that knows no HTTP client, short
functions on the refresh path, and stores used through their contract, never probed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlauth"
# The modules a refresh runs through, from the adapter down to the disk or Redis.
REFRESH_PATH = [
    "engine.py",
    "decide.py",
    "endpoint.py",
    "answers.py",
    "tokens.py",
    "integrations/adapter.py",
    "integrations/requests_auth.py",
    "integrations/httpx_auth.py",
    *(f"stores/{path.name}" for path in sorted((PACKAGE / "stores").glob("*.py"))),
]
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The mlauth modules ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            # `from . import x` and `from .stores import select` name modules too.
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {module for module in found if module.startswith("mlauth")}


def ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. A module's own parent packages are left out:
    Python has imported them before the module runs, so importing from them closes no loop."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: imports_of(path) & set(modules) - {name} - ancestors(name)
        for name, path in modules.items()
    }


def test_the_package_has_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_engine_imports_no_http_client() -> None:
    tree = ast.parse((PACKAGE / "engine.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and not node.level
    }
    assert not imported & {"requests", "httpx", "urllib3", "aiohttp"}


@pytest.mark.parametrize("module", REFRESH_PATH)
def test_no_function_on_the_refresh_path_is_over_60_lines(module: str) -> None:
    tree = ast.parse((PACKAGE / module).read_text())
    long = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}


def test_no_store_is_probed_with_getattr() -> None:
    probes = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and node.args
                and any(word in ast.unparse(node.args[0]) for word in ("store", "moved"))
            ):
                probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert probes == []


# -- the tests' own layout ---------------------------------------------------------------------

TESTS = PACKAGE.parent / "tests"


def imported_by(path: Path) -> set[str]:
    """Every module ``path`` imports, spelled from the repository root: ``tests.test_cli``
    for ``from tests.test_cli import x``, and ``tests.conftest`` for ``from tests import
    conftest`` too (relative imports resolved), at module level or inside functions."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            found |= {target, *(f"{target}.{alias.name}" for alias in node.names)}
    return found


def shared_and_test_files() -> list[Path]:
    """The test modules, conftest.py and every helper module the tests share."""
    return sorted(
        [*TESTS.glob("test_*.py"), TESTS / "conftest.py", *TESTS.rglob("support/**/*.py")]
    )


def is_test_module(name: str) -> bool:
    """``tests.test_x`` or ``tests.conftest`` (or a name inside one)."""
    parts = name.split(".")
    return parts[0] == "tests" and len(parts) > 1 and parts[1].startswith(("test_", "conftest"))


def test_no_test_module_imports_another_test_module_or_conftest() -> None:
    # Helpers the tests share live in tests/support/ (fixtures in conftest.py): a helper kept
    # in a test module ties every module that imports it to that module's imports and
    # set-up, and the test module can no longer be split, renamed or deleted on its own.
    found = [
        f"{path.relative_to(TESTS)} imports {name}"
        for path in shared_and_test_files()
        for name in sorted(imported_by(path))
        if is_test_module(name) and not is_test_module(name.rpartition(".")[0])
    ]
    assert found == []


def test_no_fixture_or_support_module_imports_the_benchmarks() -> None:
    # The Redis launcher both use is mlauth.testing.redis_server; only the tests of the
    # benchmarks themselves import benchmarks/.
    shared = [TESTS / "conftest.py", *TESTS.rglob("support/**/*.py")]
    found = [
        f"{path.relative_to(TESTS)} imports {name}"
        for path in shared
        for name in sorted(imported_by(path))
        if name.split(".")[0] == "benchmarks" and "." not in name.partition(".")[2]
    ]
    assert found == []


def _class(module: str, name: str) -> ast.ClassDef:
    tree = ast.parse((PACKAGE / module).read_text())
    (found,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    return found


def _names_write_mode(node: ast.AST) -> bool:
    """Whether ``node`` mentions the write mode (``in_place``, a mount, the in-place mark)."""
    words = ("in_place", "mount_point", "marked_in_place")
    return any(word in ast.unparse(node) for word in words)


def test_the_env_store_never_branches_on_the_write_mode() -> None:
    # The way the file is written, locked and journaled is chosen once (mlauth.stores.parts)
    # and composed: nothing in the .env store's module asks again which way it is.
    tree = ast.parse((PACKAGE / "stores/envfile.py").read_text())
    branches = [
        f"line {node.lineno}: {ast.unparse(node.test)}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.If, ast.IfExp, ast.While)) and _names_write_mode(node.test)
    ]
    passed = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and any(k.arg == "in_place" for k in node.keywords)
    ]
    parameters = [
        f"line {node.lineno}: {node.name}"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and any(a.arg == "in_place" for a in [*node.args.args, *node.args.kwonlyargs])
    ]
    assert (branches, passed, parameters) == ([], [], [])


def test_the_env_store_forwards_without_a_guard_on_each_method() -> None:
    # A migration swaps, once, the store that answers; the public methods call it and
    # decide nothing (no per-method "have the tokens moved?" check, no write-mode branch).
    store = _class("stores/envfile.py", "EnvFileStore")
    contract = {
        "stamp",
        "local_stamp",
        "load",
        "save",
        "check_writable",
        "lock",
        "refresh",
        "transaction",
        "wait_unlocked",
        "reauthorization_required",
        "clear_reauthorization",
        "refresh_in_progress",
        "status_details",
    }
    methods = {
        node.name: node
        for node in store.body
        if isinstance(node, ast.FunctionDef) and node.name in contract
    }
    assert {"stamp", "load", "save", "check_writable", "lock"} <= methods.keys()
    guarded = {
        name: ast.unparse(branch).splitlines()[0]
        for name, method in methods.items()
        for branch in ast.walk(method)
        if isinstance(branch, (ast.If, ast.IfExp, ast.BoolOp, ast.Try, ast.While, ast.Match))
    }
    assert guarded == {}
    # Each is one statement: a call on the store that answers now.
    assert {name: len(method.body) - _docstring(method) for name, method in methods.items()} == (
        dict.fromkeys(methods, 1)
    )


def _docstring(function: ast.FunctionDef) -> int:
    first = function.body[0]
    return int(isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant))
