"""`mlauth run` redirects a legacy refresh function with no wrapper script: three copies of a
legacy pipeline started together, each refreshing at start-up, spend one refresh token once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from mlauth.testing import FakeMercadoLibre
from tests.support.legacy_apps import legacy_env
from tests.support.redirect_programs import (
    NOT_WATCHED,
    REPORTING_SCRIPT,
    REPORTING_TAIL,
    mlauth_run,
    pipeline,
    pipeline_environment,
    pool_pipeline,
    run_program,
    search_path,
    start_together,
    write_program,
)

pytestmark = pytest.mark.processes

LIFETIME = 3600.0


def cron_start(
    tmp_path: Path, layout: str, *options: str, copies: int = 3
) -> tuple[list[tuple[int, dict[str, object], str]], dict[str, int], str]:
    """``copies`` of the pipeline under ``mlauth run [options]``, released at one moment;
    returns what each printed, the fake's counters and the first access token's hash."""
    program = write_program(tmp_path, layout)
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=LIFETIME) as fake:
        # Refreshed a minute ago: older than min_token_age, so a refresh is really due.
        legacy_env(fake, env, LIFETIME, age=60.0)
        first = env.read_text()
        command = [*mlauth_run(env, *options), *program.argv]
        results = start_together([command] * copies, tmp_path, pipeline_environment(env))
        stats = fake.stats()
    return results, stats, first


@pytest.mark.parametrize("layout", ["script", "script-def", "module", "package"])
def test_three_pipelines_started_together_refresh_once(tmp_path: Path, layout: str) -> None:
    results, stats, _ = cron_start(tmp_path, layout)
    assert stats["invalid_grant"] == 0, results
    assert stats["refreshes"] == 1, results
    tokens = set()
    for code, result, err in results:
        assert code == 0, err
        assert result["ok"] is True and result["status"] == 200, (result, err)
        assert result["legacy_refreshes"] == 0, (result, err)  # the legacy body never ran
        tokens.add(result["token"])
    assert len(tokens) == 1  # ML_ACCESS_TOKEN holds the one new token in every copy


@pytest.mark.parametrize(
    ("method", "layout", "at_import"),
    [
        ("fork", "script", False),
        ("spawn", "script", False),
        ("forkserver", "script", False),
        ("spawn", "script", True),
        ("forkserver", "script", True),
        ("spawn", "package", False),
    ],
)
def test_pool_workers_of_every_start_method_refresh_once(
    tmp_path: Path, method: str, layout: str, at_import: bool
) -> None:
    # spawn and forkserver re-run the script in their processes as __mp_main__ (runpy, past
    # the import hook); with at_import, its module-level call runs again there too.
    source = pool_pipeline(at_import=at_import)
    if layout == "script":
        (tmp_path / "main2.py").write_text(source)
        argv = ["main2.py"]
    else:
        (tmp_path / "pipeline").mkdir()
        (tmp_path / "pipeline" / "__init__.py").write_text("")
        (tmp_path / "pipeline" / "main2.py").write_text(source)
        argv = ["-m", "pipeline.main2"]
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=LIFETIME) as fake:
        legacy_env(fake, env, LIFETIME, age=60.0)
        code, out, err = run_program(
            [*argv, method, "3"], tmp_path, pipeline_environment(env), mlauth_run(env)
        )
        stats = fake.stats()
    assert code == 0, err
    reports = json.loads(out.splitlines()[-1])
    assert len({report["pid"] for report in reports}) == 3, reports
    assert (stats["refreshes"], stats["invalid_grant"]) == (1, 0), (reports, err)
    for report in reports:
        assert report["legacy_refreshes"] == 0, (report, err)  # the legacy body never ran
        assert report["ok"] is True and report["status"] == 200, (report, err)
        assert report["watchers"] == NOT_WATCHED, report  # no watch left in the worker
    assert len({report["token"] for report in reports}) == 1  # each worker's ML_ACCESS_TOKEN


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("install", ["top", "worker"])
def test_install_in_the_code_reaches_the_workers_copy_of_the_script(
    tmp_path: Path, method: str, install: str
) -> None:
    # No mlauth run: install() at the top of the script, which each spawn or forkserver
    # process re-runs, or in the pool's initializer, once that copy has run.
    (tmp_path / "main2.py").write_text(pool_pipeline(install=install))
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=LIFETIME) as fake:
        legacy_env(fake, env, LIFETIME, age=60.0)
        code, out, err = run_program(["main2.py", method, "3"], tmp_path, pipeline_environment(env))
        stats = fake.stats()
    assert code == 0, err
    reports = json.loads(out.splitlines()[-1])
    assert (stats["refreshes"], stats["invalid_grant"]) == (1, 0), (reports, err)
    assert [report["legacy_refreshes"] for report in reports] == [0, 0, 0], (reports, err)
    assert all(report["ok"] and report["watchers"] == NOT_WATCHED for report in reports), reports


LAST_DEF = """\
import multiprocessing, sys


def work(_):
    return refresh_ml_token(force=True)


if __name__ == "__main__":
    with multiprocessing.get_context(sys.argv[1]).Pool(1) as pool:
        print(pool.map(work, [0]), flush=True)


def refresh_ml_token(force=False):
    return "legacy"
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_def_on_the_scripts_last_lines_is_redirected_in_the_workers_copy(
    fake_ml_env: Path, tmp_path: Path, method: str
) -> None:
    # No line runs after that def: it is redirected as the copy's frame returns.
    (tmp_path / "main2.py").write_text(LAST_DEF)
    code, out, err = run_program(
        ["main2.py", method], tmp_path, dict(os.environ), mlauth_run(fake_ml_env)
    )
    assert (code, out) == (0, "[True]\n"), err


def test_no_redirect_leaves_the_legacy_function_and_its_race(tmp_path: Path) -> None:
    """The control: the same start under --no-redirect is today's outcome."""
    results, stats, _ = cron_start(tmp_path, "script", "--no-redirect")
    assert [r["legacy_refreshes"] for _, r, _ in results] == [1, 1, 1]
    assert sorted(r["ok"] for _, r, _ in results) == [False, False, True]
    # Two legacy refreshes spent a spent token; mlauth itself may meet one more, when a 401
    # reaches it between the winner's two set_key writes (the .env then pairs the new access
    # token with the spent refresh token).
    assert stats["invalid_grant"] >= 2


@pytest.mark.parametrize(
    ("layout", "module"),
    [("script", "__main__"), ("script", "main2"), ("module", "legacy_pipeline")],
)
def test_redirect_names_a_function_of_another_name(
    tmp_path: Path, layout: str, module: str
) -> None:
    program = write_program(tmp_path, layout, name="renew_token")
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=LIFETIME) as fake:
        legacy_env(fake, env, LIFETIME, age=60.0)
        command = [*mlauth_run(env, "--redirect", f"{module}:renew_token"), *program.argv]
        results = start_together([command] * 2, tmp_path, pipeline_environment(env))
        stats = fake.stats()
    assert (stats["refreshes"], stats["invalid_grant"]) == (1, 0), results
    assert [r["legacy_refreshes"] for _, r, _ in results] == [0, 0]
    assert all(r["ok"] is True for _, r, _ in results)


def test_another_name_is_left_alone_unless_named(tmp_path: Path) -> None:
    program = write_program(tmp_path, "script", name="renew_token")
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=LIFETIME) as fake:
        legacy_env(fake, env, LIFETIME, age=60.0)
        command = [*mlauth_run(env), *program.argv]
        results = start_together([command] * 2, tmp_path, pipeline_environment(env))
        stats = fake.stats()
    assert [r["legacy_refreshes"] for _, r, _ in results] == [1, 1]
    assert stats["invalid_grant"] >= 1
    # Each copy says which function sent the refresh outside the lock, and the fix.
    for _, _, err in results:
        warned = [line for line in err.splitlines() if "token endpoint" in line]
        assert len(warned) == 1, err
        assert "__main__.renew_token() (" in warned[0]
        assert "`mlauth run --redirect __main__:renew_token`" in warned[0]


def test_bad_redirect_names_are_usage_errors(fake_ml_env: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    command = ["-c", f"open({str(marker)!r}, 'w')"]
    for options in (
        ["--redirect", "no-colon"],
        ["--redirect", "mod:not a name"],
        ["--redirect", "1mod:f"],
        ["--no-redirect", "--redirect", "mod:f"],
    ):
        code, _, err = run_program(
            command, tmp_path, dict(os.environ), mlauth_run(fake_ml_env, *options)
        )
        assert code == 2, (options, err)
        assert "MODULE:FUNCTION" in err or "contradict" in err, err
        assert "Traceback" not in err
    assert not marker.exists()


def test_a_same_named_function_in_installed_packages_is_not_touched(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    # A user site-packages (PYTHONUSERBASE) and a folder named site-packages, both on
    # PYTHONPATH: libraries, not the program, though each has a refresh_ml_token().
    user_base = tmp_path / "userbase"
    code, out, _ = run_program(
        ["-c", "import site; print(site.getusersitepackages())"],
        tmp_path,
        dict(os.environ, PYTHONUSERBASE=str(user_base)),
    )
    user_site = Path(out.strip())
    vendored = tmp_path / "vendor" / "site-packages"
    library = "def refresh_ml_token(force=False):\n    return 'library original'\n"
    for folder, name in ((user_site, "userlib"), (vendored, "vendorlib")):
        folder.mkdir(parents=True)
        (folder / f"{name}.py").write_text(library)
    (tmp_path / "ownlib.py").write_text(library.replace("library", "own"))
    (tmp_path / "main2.py").write_text(
        "import json, ownlib, userlib, vendorlib\n"
        "modules = (ownlib, userlib, vendorlib)\n"
        "print(json.dumps([m.refresh_ml_token(force=True) for m in modules]))\n"
    )
    environ = dict(
        os.environ, PYTHONUSERBASE=str(user_base), PYTHONPATH=search_path(user_site, vendored)
    )
    code, out, err = run_program(["main2.py"], tmp_path, environ, mlauth_run(fake_ml_env))
    assert code == 0, err
    assert json.loads(out) == [True, "library original", "library original"]


def test_each_redirect_is_logged_once(tmp_path: Path) -> None:
    (tmp_path / "legacy_pipeline.py").write_text(pipeline(call="none"))
    (tmp_path / "main2.py").write_text(
        pipeline(call="none")
        + "import legacy_pipeline\n"
        + "print([refresh_ml_token(force=True) for _ in range(3)], "
        + "legacy_pipeline.refresh_ml_token())\n"
    )
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=LIFETIME) as fake:
        legacy_env(fake, env, LIFETIME, age=60.0)
        code, out, err = run_program(
            ["main2.py"], tmp_path, pipeline_environment(env), mlauth_run(env, "-v")
        )
        stats = fake.stats()
    assert code == 0, err
    assert out == "[True, True, True] True\n"
    logged = [line for line in err.splitlines() if "now runs mlauth's locked refresh" in line]
    assert len(logged) == 2, err
    assert "__main__:refresh_ml_token (main2.py, line 29)" in logged[0] + logged[1], logged
    assert any("legacy_pipeline:refresh_ml_token" in line for line in logged), logged
    assert stats["refreshes"] == 1


def test_the_script_is_watched_only_until_its_def_has_run(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "with_def.py").write_text(
        REPORTING_SCRIPT + "def refresh_ml_token():\n    return 'original'\n" + REPORTING_TAIL
    )
    (tmp_path / "without.py").write_text(REPORTING_SCRIPT + REPORTING_TAIL)
    prefix = mlauth_run(fake_ml_env)
    code, out, err = run_program(["with_def.py"], tmp_path, dict(os.environ), prefix)
    assert code == 0, err
    with_def = json.loads(out)
    assert with_def["redirected"] is True
    # Before the def, mlauth watches the script (a trace function, or a monitoring tool on
    # 3.12+); from the line after it, nothing is left of the watch.
    watching = with_def["before"]
    assert watching["tools"] == ["mlauth"] if sys.version_info >= (3, 12) else watching["trace"]
    assert with_def["after"] == {"trace": None, "tools": []}
    code, out, err = run_program(["without.py"], tmp_path, dict(os.environ), prefix)
    assert code == 0, err
    without = json.loads(out)
    assert without["redirected"] is None
    assert without["before"] == without["after"] == {"trace": None, "tools": []}


UNWRAPPING_DECORATORS = """\
def retry(function):
    def wrapper(*args, **kwargs):  # no functools.wraps: nothing says what it wraps
        return function(*args, **kwargs)
    return wrapper


def broken(function):
    raise RuntimeError("a decorator that fails")
"""

DECORATED = """\
import helpers


@helpers.retry
def refresh_ml_token(force=False):
    print("LEGACY RAN", flush=True)
    return "legacy"


FIRST = refresh_ml_token(force=True)
try:
    @helpers.broken
    def refresh_ml_token(force=False):
        return "never bound"
except RuntimeError:
    pass
SAME = refresh_ml_token(force=True)


@helpers.retry
def refresh_ml_token(force=False):
    print("LEGACY RAN", flush=True)
    return "legacy"


print("calls", FIRST, SAME, refresh_ml_token(force=True), flush=True)
"""


def test_a_decorated_def_in_the_script_is_redirected_and_the_watch_ends(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    # The decorator comes from another module and keeps no __wrapped__: the name the
    # script's def bound is redirected all the same, the def further down too, and a def
    # whose decorator raised binds nothing new. Then nothing is left watching the script.
    (tmp_path / "helpers.py").write_text(UNWRAPPING_DECORATORS)
    script = REPORTING_SCRIPT + DECORATED + REPORTING_TAIL
    (tmp_path / "main2.py").write_text(script)
    code, out, err = run_program(
        ["main2.py"], tmp_path, dict(os.environ), mlauth_run(fake_ml_env, "-v")
    )
    assert code == 0, err
    calls, report = out.splitlines()
    assert calls == "calls True True True", out + err
    result = json.loads(report)
    assert result["redirected"] is True and result["after"] == NOT_WATCHED, result
    first_def = script.splitlines().index("def refresh_ml_token(force=False):") + 1
    logged = [line for line in err.splitlines() if "now runs mlauth's locked refresh" in line]
    assert len(logged) == 1 and f"(main2.py, line {first_def})" in logged[0], err


def test_a_redirect_name_the_script_lacks_is_warned_about_at_start(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "main2.py").write_text(
        "def renew_token(force=False):\n"
        "    print('LEGACY RAN', flush=True)\n\n\n"
        "renew_token(force=True)\n"
    )
    code, out, err = run_program(
        ["main2.py"],
        tmp_path,
        dict(os.environ),
        mlauth_run(fake_ml_env, "--redirect", "main2:renew_tokn"),
    )
    assert code == 0, err
    assert out == "LEGACY RAN\n"  # as asked: nothing is named renew_tokn
    warned = [line for line in err.splitlines() if "renew_tokn" in line]
    assert len(warned) == 1, err
    assert "WARNING" in warned[0] and "main2.py" in warned[0], warned
    assert "nothing was redirected" in warned[0] and "renew_token()" in warned[0], warned


TRACEBACK_SCRIPT = """\
import sys
print(__file__, sys.argv)


def refresh_ml_token():
    return "original"


import helper
if sys.argv[1:] == ["redirected?"]:
    print(hasattr(refresh_ml_token, "__wrapped__"), hasattr(helper.refresh_ml_token, "__wrapped__"))
else:
    helper.fail()
"""

HELPER = """\
import sys


def refresh_ml_token():
    return "original"


def fail():
    raise ValueError("from the pipeline")


if "at-import" in sys.argv:
    raise RuntimeError("while importing helper")
"""


@pytest.mark.parametrize("mode", ["fail", "at-import", "syntax"])
def test_tracebacks_file_argv_and_exit_code_are_the_programs_own(
    fake_ml_env: Path, tmp_path: Path, mode: str
) -> None:
    (tmp_path / "main2.py").write_text(TRACEBACK_SCRIPT)
    helper = HELPER + ("def broken(:\n" if mode == "syntax" else "")
    (tmp_path / "helper.py").write_text(helper)
    argv = ["main2.py", mode]
    plain = run_program(argv, tmp_path, dict(os.environ))
    under = run_program(argv, tmp_path, dict(os.environ), mlauth_run(fake_ml_env))
    assert plain[0] == under[0] == 1
    assert plain[1:] == under[1:]  # stdout and the traceback, line for line
    expected = {
        "fail": 'helper.py", line 9, in fail',
        "at-import": 'helper.py", line 13, in <module>',
    }
    assert expected.get(mode, "SyntaxError") in under[2]
    if mode != "syntax":  # and the functions were redirected in that very program
        argv = ["main2.py", "redirected?"]
        assert run_program(argv, tmp_path, dict(os.environ))[1].endswith("False False\n")
        redirected = run_program(argv, tmp_path, dict(os.environ), mlauth_run(fake_ml_env))
        assert redirected[1].endswith("True True\n"), redirected


def test_the_cached_bytecode_stays_the_modules_own(fake_ml_env: Path, tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text(HELPER)
    script = "import helper; print(hasattr(helper.refresh_ml_token, '__wrapped__'))\n"
    (tmp_path / "main2.py").write_text(script)
    environ = dict(os.environ)
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    assert run_program(["main2.py"], tmp_path, environ)[1] == "False\n"
    cached = {path: path.read_bytes() for path in (tmp_path / "__pycache__").iterdir()}
    assert run_program(["main2.py"], tmp_path, environ, mlauth_run(fake_ml_env))[1] == "True\n"
    assert {path: path.read_bytes() for path in (tmp_path / "__pycache__").iterdir()} == cached
    assert run_program(["main2.py"], tmp_path, environ)[1] == "False\n"  # the cache is read
    # And with no cache at all, a run under mlauth writes none of its rewritten code.
    for path in cached:
        path.unlink()
    assert run_program(["main2.py"], tmp_path, environ, mlauth_run(fake_ml_env))[1] == "True\n"
    assert run_program(["main2.py"], tmp_path, environ)[1] == "False\n"


def test_a_tracer_already_set_is_left_in_place(fake_ml_env: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    # The user's own sitecustomize (mlauth's runs it first) starts a tracer, as a debugger
    # or coverage's process start-up would.
    (site / "sitecustomize.py").write_text(
        "import sys\ndef theirs(frame, event, arg):\n    return None\nsys.settrace(theirs)\n"
    )
    (tmp_path / "helper.py").write_text(HELPER)
    (tmp_path / "main2.py").write_text(
        REPORTING_SCRIPT
        + "import helper\n"
        + "def refresh_ml_token():\n    return 'original'\n"
        + "print(hasattr(helper.refresh_ml_token, '__wrapped__'))\n"
        + REPORTING_TAIL
    )
    environ = dict(os.environ, PYTHONPATH=search_path(site))
    code, out, err = run_program(["main2.py"], tmp_path, environ, mlauth_run(fake_ml_env))
    assert code == 0, err
    helper_line, report_line = out.splitlines()
    assert helper_line == "True"  # imported modules need no tracing
    report = json.loads(report_line)
    assert report["before"]["trace"] == report["after"]["trace"] == "theirs"
    if sys.version_info >= (3, 12):  # sys.monitoring: no conflict with their tracer
        assert report["redirected"] is True and "trace function" not in err
    else:  # mlauth steps aside, and says so
        assert report["redirected"] is False
        assert "a trace function is already set" in err and "main2.py" in err


def test_install_called_by_the_script_before_its_def(tmp_path: Path) -> None:
    (tmp_path / "main2.py").write_text(
        "import os, mlauth\n"
        "mlauth.install(os.environ['PIPELINE_ENV'])\n"
        + pipeline(call="def").replace("\nstart_line()\n", "\n")
        + "report(OK, redirected=hasattr(refresh_ml_token, '__wrapped__'))\n"
    )
    env = tmp_path / ".env"
    with FakeMercadoLibre(token_lifetime=LIFETIME) as fake:
        legacy_env(fake, env, LIFETIME, age=60.0)
        code, out, err = run_program(["main2.py"], tmp_path, pipeline_environment(env))
        stats = fake.stats()
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["redirected"] is True and result["legacy_refreshes"] == 0, (result, err)
    assert result["ok"] is True and stats["refreshes"] == 1
