"""The redirect of legacy refresh functions, in this process: which names and modules, the
rewritten module code, install(redirect=...) and uninstall()."""

from __future__ import annotations

import importlib
import multiprocessing.spawn
import os
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import mlauth
from mlauth.integrations.redirect import functions
from mlauth.integrations.redirect.imports import RedirectFinder, rewrite
from mlauth.integrations.redirect.missing import lookalikes
from mlauth.integrations.redirect.own import OwnFiles
from mlauth.integrations.redirect.plan import Plan, parse_spec
from mlauth.integrations.runner import REDIRECT_VARIABLE, child_environment
from mlauth.secret import Secret
from mlauth.testing import FakeMercadoLibre
from mlauth.tokens import TokenSet

ORIGINAL = requests.Session.request
ORIGINAL_FIXUP = multiprocessing.spawn._fixup_main_from_path  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _always_uninstall() -> Iterator[None]:
    yield
    mlauth.uninstall()
    functions.use_auth(None)
    functions.restore_all()
    assert requests.Session.request is ORIGINAL
    assert not any(isinstance(finder, RedirectFinder) for finder in sys.meta_path)
    assert multiprocessing.spawn._fixup_main_from_path is ORIGINAL_FIXUP  # type: ignore[attr-defined]


class StubAuth:
    """Stands for an installed MLAuth: records each refresh, returns one new token."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def refresh(self, *, force: bool = True) -> TokenSet:
        self.calls.append(force)
        return TokenSet(access_token=Secret("APP_USR-new-token"), refresh_token=None)


SOURCE = """\
ML_ACCESS_TOKEN = "APP_USR-old-token"
HEADERS = {"authorization": "Bearer APP_USR-old-token", "Accept": "json"}
LEGACY = []


def refresh_ml_token(force=False):
    LEGACY.append(force)
    return "legacy"


AT_IMPORT = refresh_ml_token(force=True)
if AT_IMPORT:
    def renew():
        return "legacy"
try:
    pass
finally:
    @staticmethod
    def other():
        return "legacy"


class K:
    def refresh_ml_token(self):
        return "method"


def outer():
    def refresh_ml_token():
        return "nested"
    return refresh_ml_token()


def boom():
    raise ValueError("from boom")
"""
NAMES = frozenset({"refresh_ml_token", "renew", "other"})


def test_a_rewritten_module_redirects_its_top_level_defs_as_they_run() -> None:
    auth = StubAuth()
    functions.use_auth(auth)  # type: ignore[arg-type]
    code = rewrite(SOURCE.encode(), "legacy_mod.py", NAMES, "legacy_mod")
    assert code is not None and code.co_filename == "legacy_mod.py"
    namespace: dict[str, object] = {"__name__": "legacy_mod"}
    exec(code, namespace)  # noqa: S102
    # The call right after the def, at import time, already ran mlauth's refresh.
    assert namespace["AT_IMPORT"] is True and namespace["LEGACY"] == []
    assert auth.calls == [False]  # force=True or not: a refresh that may adopt
    assert namespace["ML_ACCESS_TOKEN"] == "APP_USR-new-token"
    assert namespace["HEADERS"] == {"authorization": "Bearer APP_USR-new-token", "Accept": "json"}
    for name in ("renew", "other"):  # inside if / finally, still the module's top level
        assert namespace[name]() is True  # type: ignore[operator]
    assert namespace["K"]().refresh_ml_token() == "method"  # type: ignore[operator]
    assert namespace["outer"]() == "nested"  # type: ignore[operator]
    with pytest.raises(ValueError, match="from boom") as caught:
        namespace["boom"]()  # type: ignore[operator]
    frame = traceback.extract_tb(caught.value.__traceback__)[-1]
    line = SOURCE.splitlines().index('    raise ValueError("from boom")') + 1
    assert (frame.filename, frame.lineno) == ("legacy_mod.py", line)  # no line moved


def test_a_module_without_such_a_top_level_def_is_not_rewritten() -> None:
    assert rewrite(SOURCE.encode(), "m.py", frozenset({"boom2"}), "m") is None
    nested = b"class K:\n    def renew(self): pass\ndef f():\n    def renew(): pass\n"
    assert rewrite(nested, "m.py", frozenset({"renew"}), "m") is None
    assert rewrite(b"async def renew(): pass\n", "m.py", frozenset({"renew"}), "m") is None
    assert rewrite(b"def renew(:\n", "m.py", frozenset({"renew"}), "m") is None  # Python says why


def test_uninstalled_the_replacement_calls_the_original() -> None:
    functions.use_auth(StubAuth())  # type: ignore[arg-type]
    code = rewrite(SOURCE.encode(), "legacy_mod.py", NAMES, "legacy_mod")
    assert code is not None
    namespace: dict[str, object] = {"__name__": "legacy_mod"}
    exec(code, namespace)  # noqa: S102
    kept = namespace["refresh_ml_token"]  # a reference another module may hold
    functions.use_auth(None)
    assert kept(force=True) == "legacy"  # type: ignore[operator]
    functions.restore_all()
    assert not hasattr(namespace["refresh_ml_token"], "__wrapped__")


@pytest.mark.parametrize(
    ("text", "pair"),
    [("legacy:renew", ("legacy", "renew")), (" pkg.sub:f_2 ", ("pkg.sub", "f_2"))],
)
def test_redirect_names_parse(text: str, pair: tuple[str, str]) -> None:
    assert parse_spec(text) == pair


@pytest.mark.parametrize(
    "text", ["renew", "legacy:", ":renew", "a-b:f", "a:f()", "a..b:f", "a:b:c"]
)
def test_malformed_redirect_names_say_the_form(text: str) -> None:
    with pytest.raises(mlauth.ConfigError, match="MODULE:FUNCTION"):
        parse_spec(text)


def test_the_plan_names_the_default_only_in_own_modules() -> None:
    plan = Plan(True, ["legacy:renew"])
    assert plan.names(["legacy"], own=True) == {"refresh_ml_token", "renew"}
    assert plan.names(["legacy"], own=False) == {"renew"}  # named: wherever it lives
    assert plan.names(["other"], own=False) == set()
    assert plan.add(["legacy:renew", "x:y"]) == [("x", "y")]
    off = Plan(False)
    assert not off and off.names(["m"], own=True) == set()


def test_own_files_are_the_programs_not_libraries(tmp_path: Path) -> None:
    own = OwnFiles()
    assert str(tmp_path / "main2.py") in own
    assert str(tmp_path / "pkg" / "legacy.py") in own
    for library in (requests.__file__, os.__file__, mlauth.__file__, pytest.__file__):
        assert library not in own, library
    assert str(tmp_path / "venv" / "lib" / "site-packages" / "lib.py") not in own
    assert str(tmp_path / "dist-packages" / "lib.py") not in own
    # A folder of the project that is really a library's, through a symbolic link.
    (tmp_path / "linked").symlink_to(Path(requests.__file__).parent)
    assert str(tmp_path / "linked" / "api.py") not in own
    assert None not in own and "" not in own


def test_the_run_environment_carries_the_redirect_setting() -> None:
    inherited = {REDIRECT_VARIABLE: "off"}  # from an outer `mlauth run --no-redirect`
    assert REDIRECT_VARIABLE not in child_environment(".env", inherited)
    assert child_environment(".env", {}, redirect=False)[REDIRECT_VARIABLE] == "off"
    named = child_environment(".env", {}, redirect=["a:b", "c.d:e"])
    assert named[REDIRECT_VARIABLE] == "a:b,c.d:e"


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder of the program's modules, first on sys.path; its modules forgotten after."""
    folder = tmp_path / "app"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.fixture
def due_env(fake_ml: FakeMercadoLibre, tmp_path: Path) -> Path:
    """A .env whose token was refreshed a minute ago: a redirected call really refreshes."""
    env = tmp_path / ".env"
    fake_ml.write_env(env, extra={"ML_TOKEN_REFRESHED_AT": str(time.time() - 60)})
    return env


LEGACY = "def {name}(force=False):\n    return 'original {module}'\n"


def test_install_redirects_modules_imported_before_and_after(
    app: Path, due_env: Path, fake_ml: FakeMercadoLibre
) -> None:
    for module in ("before_mod", "after_mod"):
        text = LEGACY.format(name="refresh_ml_token", module=module)
        text += LEGACY.format(name="renew_token", module=module)
        (app / f"{module}.py").write_text(text)
    (app / "after_mod.py").write_text(
        (app / "after_mod.py").read_text() + "AT_IMPORT = renew_token(force=True)\n"
    )
    before = importlib.import_module("before_mod")
    mlauth.install(due_env, redirect=["before_mod:renew_token", "after_mod:renew_token"])
    after = importlib.import_module("after_mod")
    assert after.AT_IMPORT is True  # redirected before its module-level call ran
    for module in (before, after):
        assert module.refresh_ml_token(force=True) is True  # the default name
        assert module.renew_token() is True  # the named one
    assert fake_ml.stats()["refreshes"] == 1  # the rest adopted it
    assert type(after.__loader__).__name__ == "_RewrittenLoader"
    mlauth.uninstall()
    assert before.refresh_ml_token() == "original before_mod"
    assert after.renew_token() == "original after_mod"


UNWRAPPING = """\
def retry(function):
    def wrapper(*args, **kwargs):  # no functools.wraps: no __wrapped__
        return function(*args, **kwargs)
    return wrapper
"""
DECORATED = "import deco\n\n@deco.retry\n" + LEGACY.format(name="refresh_ml_token", module="{}")


def test_a_decorated_def_is_redirected_whatever_its_wrapper(
    app: Path, due_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The wrapper's code and globals are the decorator module's: what counts is that the
    # module's own def bound the name.
    (app / "deco.py").write_text(UNWRAPPING)
    for module in ("before_deco", "after_deco"):
        (app / f"{module}.py").write_text(DECORATED.format(module))
    (app / "imports_it.py").write_text("from before_deco import refresh_ml_token\n")
    before = importlib.import_module("before_deco")
    imports_it = importlib.import_module("imports_it")
    with caplog.at_level("INFO", logger="mlauth"):
        mlauth.install(due_env)
        after = importlib.import_module("after_deco")
    for module in (before, after):
        assert module.refresh_ml_token(force=True) is True
    # A function imported under the name is its module's, and left to it.
    assert imports_it.refresh_ml_token(force=True) == "original before_deco"
    logged = [r.getMessage() for r in caplog.records if "now runs mlauth" in r.getMessage()]
    assert len(logged) == 2 and all(", line 4)" in message for message in logged), logged
    mlauth.uninstall()
    assert after.refresh_ml_token() == "original after_deco"


def test_install_without_redirect_leaves_everything_alone(app: Path, due_env: Path) -> None:
    (app / "plain_mod.py").write_text(LEGACY.format(name="refresh_ml_token", module="plain"))
    mlauth.install(due_env, redirect=False)
    module = importlib.import_module("plain_mod")
    assert module.refresh_ml_token() == "original plain"
    assert type(module.__loader__) is importlib.machinery.SourceFileLoader
    # A later install() for the same .env may still name functions: they are added.
    mlauth.install(due_env, redirect="plain_mod:refresh_ml_token")
    assert module.refresh_ml_token() is True


# Run in a fresh interpreter: this process imported the redirect with the tests above.
IMPORTED_LAZILY = """\
import sys
import mlauth, mlauth.cli

def loaded():
    return "mlauth.integrations.redirect" in sys.modules

print(loaded())
mlauth.install(sys.argv[1], redirect=False)
print(loaded())
mlauth.uninstall()
mlauth.install(sys.argv[1])
print(loaded())
"""


def test_the_redirect_is_imported_only_when_something_is_redirected(due_env: Path) -> None:
    # ``import mlauth`` (and the `mlauth` command, the first interpreter of `mlauth run`)
    # would otherwise pay for the import hook, ast and the script watch in every process.
    result = subprocess.run(
        [sys.executable, "-c", IMPORTED_LAZILY, str(due_env)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # import mlauth, install(redirect=False): not imported; install() (redirect=True): imported.
    assert result.stdout.split() == ["False", "False", "True"], result.stdout


def test_a_named_function_its_module_lacks_is_warned_about_once(
    app: Path, due_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = LEGACY.format(name="renew_token", module="x") + "TOKEN_URL = 'not a function'\n"
    for module in ("early_mod", "late_mod", "right_mod"):
        (app / f"{module}.py").write_text(text)
    importlib.import_module("early_mod")
    names = ["early_mod:renw_token", "late_mod:renew_tokn", "right_mod:renew_token"]
    with caplog.at_level("WARNING", logger="mlauth"):
        mlauth.install(due_env, redirect=names)
        importlib.import_module("late_mod")
        importlib.import_module("right_mod")
        mlauth.install(due_env, redirect=["early_mod:renw_token"])  # named again: no repeat
    warned = sorted(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert len(warned) == 2, warned
    for message, pair in zip(warned, ["early_mod:renw_token", "late_mod:renew_tokn"], strict=True):
        assert message.startswith(f"redirect {pair}: "), message
        assert "nothing was redirected" in message and "renew_token()" in message, message
        assert "TOKEN_URL" not in message  # a variable is not a candidate
        assert str(app / f"{pair.partition(':')[0]}.py") in message


def test_lookalikes_are_close_spellings_then_refresh_like_names() -> None:
    defined = ["main", "renew_token", "refresh_all", "get_token", "report", "__name__"]
    assert lookalikes("renew_tokn", defined) == ["renew_token", "get_token", "refresh_all"]
    assert lookalikes("zzz", ["main", "report"]) == []


def test_a_malformed_name_fails_install_before_anything_changes(due_env: Path) -> None:
    with pytest.raises(mlauth.ConfigError, match="MODULE:FUNCTION"):
        mlauth.install(due_env, redirect=["not a name"])
    assert mlauth.installed() is None and requests.Session.request is ORIGINAL


def test_modules_that_define_nothing_to_redirect_load_as_usual(app: Path, due_env: Path) -> None:
    (app / "mentions.py").write_text("# refresh_ml_token is called elsewhere\nVALUE = 1\n")
    (app / "silent.py").write_text("VALUE = 2\n")
    mlauth.install(due_env)
    for name in ("mentions", "silent"):
        module = importlib.import_module(name)
        assert type(module.__loader__) is importlib.machinery.SourceFileLoader


def test_redirect_refresh_leaves_a_redirected_function_alone(
    app: Path, due_env: Path, fake_ml: FakeMercadoLibre
) -> None:
    (app / "legacy_mod.py").write_text(
        "ML_ACCESS_TOKEN = 'stale'\n" + LEGACY.format(name="refresh_ml_token", module="x")
    )
    mlauth.install(due_env)
    module = importlib.import_module("legacy_mod")
    redirected = module.refresh_ml_token
    original = mlauth.redirect_refresh(module)
    assert module.refresh_ml_token is redirected and original() == "original x"
    # An explicit redirect of a module object also leaves the globals it has current.
    loose = types.ModuleType("loose")
    loose.ML_ACCESS_TOKEN = "stale"  # type: ignore[attr-defined]
    loose.renew = lambda: "original"  # type: ignore[attr-defined]
    mlauth.redirect_refresh(loose, "renew")
    assert loose.renew() is True  # type: ignore[attr-defined]
    auth = mlauth.installed()
    assert auth is not None and auth.tokens.access_token is not None
    assert auth.tokens.access_token.reveal() == loose.ML_ACCESS_TOKEN  # type: ignore[attr-defined]


def renew_token(url: str) -> int:
    """A legacy refresh function of another name, not redirected."""
    data = {"grant_type": "refresh_token", "refresh_token": "TG-not-a-real-token"}
    return requests.post(url, data=data, timeout=30).status_code


def test_a_request_the_program_sends_to_the_token_endpoint_is_warned_about_once(
    due_env: Path, fake_ml: FakeMercadoLibre, caplog: pytest.LogCaptureFixture
) -> None:
    mlauth.install(due_env)
    with caplog.at_level("WARNING", logger="mlauth"):
        for _ in range(2):
            renew_token(fake_ml.token_url)  # refused (no client id): it went out as sent
    warned = [r.getMessage() for r in caplog.records if "token endpoint" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"{__name__}.renew_token() ({__file__}, line ")
    assert f"`mlauth run --redirect {__name__}:renew_token`" in warned[0]
    assert "TG-not-a-real-token" not in warned[0]
