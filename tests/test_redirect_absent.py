"""A module named with ``--redirect`` that the program does not have (``pipline`` for
``pipeline``) is named in a WARNING with the fix, never imported early, and a module the
program does have says nothing, however late it is imported (real ``mlauth run`` processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlauth.integrations.redirect import absent
from tests.support.redirect_programs import mlauth_run, run_program

pytestmark = pytest.mark.processes

# The legacy module: says on stderr when its code runs, and whether its function was
# redirected (mlauth's replacement keeps the original as __wrapped__).
PIPELINE = """\
import os, sys
print("PIPELINE IMPORTED", flush=True, file=sys.stderr)
if os.environ.get("MARKER"):
    open(os.environ["MARKER"], "w").close()


def refresh_token(force=False):
    return "legacy"
"""

MAIN_IMPORTS_AT_ONCE = """\
import pipeline
print("redirected", hasattr(pipeline.refresh_token, "__wrapped__"))
"""

MAIN_IMPORTS_LATE = """\
def main():
    import pipeline  # late: inside a function, after the program has run a while
    print("redirected", hasattr(pipeline.refresh_token, "__wrapped__"))


main()
"""

# The module lives in lib/, which the program puts on sys.path itself before importing it.
MAIN_EXTENDS_PATH = """\
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import pipeline
print("redirected", hasattr(pipeline.refresh_token, "__wrapped__"))
"""


def warnings(err: str, module: str) -> list[str]:
    return [line for line in err.splitlines() if "WARNING" in line and f"{module}:" in line]


def run(folder: Path, env: Path, argv: list[str], *options: str) -> tuple[int, str, str]:
    environ = dict(os.environ, MARKER=str(folder / "imported.marker"))
    return run_program(argv, folder, environ, mlauth_run(env, *options))


def test_a_misspelt_module_is_named_with_the_fix_before_the_module_runs(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(MAIN_IMPORTS_AT_ONCE)
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipline:refresh_token")
    assert code == 0, err
    assert out == "redirected False\n"  # as asked: there is no pipline
    warned = warnings(err, "pipline")
    assert len(warned) == 1, err
    assert "no module pipline can be found" in warned[0], warned
    assert "--redirect pipeline:refresh_token?" in warned[0], warned
    # Said before the legacy module's code (and its refresh) could run.
    lines = err.splitlines()
    assert lines.index(warned[0]) < lines.index("PIPELINE IMPORTED"), err


def test_a_misspelt_script_name_is_warned_about_at_start(fake_ml_env: Path, tmp_path: Path) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE + "\nprint('SCRIPT RAN')\n")
    code, out, err = run(
        tmp_path, fake_ml_env, ["pipeline.py"], "--redirect", "pipline:refresh_token"
    )
    assert code == 0, err
    assert out == "SCRIPT RAN\n", err
    warned = warnings(err, "pipline")
    assert len(warned) == 1, err
    assert "--redirect pipeline:refresh_token?" in warned[0], warned
    lines = err.splitlines()
    assert lines.index(warned[0]) < lines.index("PIPELINE IMPORTED"), err


def test_a_module_named_by_its_last_part_under_python_m_is_given_its_full_name(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "main2.py").write_text(PIPELINE)
    code, _, err = run(
        tmp_path, fake_ml_env, ["-m", "pkg.main2"], "--redirect", "main2:refresh_token"
    )
    assert code == 0, err
    warned = warnings(err, "main2")
    assert len(warned) == 1, err
    assert "--redirect pkg.main2:refresh_token?" in warned[0], warned


def test_a_module_never_imported_and_not_found_is_named_at_exit(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "main2.py").write_text("print('done', flush=True)\n")
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--redirect", "nothere:refresh_token")
    assert (code, out) == (0, "done\n"), err
    warned = warnings(err, "nothere")
    assert len(warned) == 1, err
    assert "the program never imported it" in warned[0], warned
    assert "Correct the module given to --redirect" in warned[0], warned


@pytest.mark.parametrize(
    ("layout", "main"),
    [("beside", MAIN_IMPORTS_LATE), ("beside", MAIN_IMPORTS_AT_ONCE), ("lib", MAIN_EXTENDS_PATH)],
)
def test_a_module_the_program_has_says_nothing_and_is_not_imported_early(
    fake_ml_env: Path, tmp_path: Path, layout: str, main: str
) -> None:
    folder = tmp_path / "lib" if layout == "lib" else tmp_path
    folder.mkdir(exist_ok=True)
    (folder / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(main)
    code, out, err = run(
        tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipeline:refresh_token"
    )
    assert code == 0, err
    assert out == "redirected True\n", err
    assert "WARNING" not in err, err
    assert err.splitlines().count("PIPELINE IMPORTED") == 1, err  # imported by the program only


def test_a_named_module_the_program_never_imports_is_never_imported(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text("print('done')\n")
    code, out, err = run(
        tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipeline:refresh_token"
    )
    assert (code, out) == (0, "done\n"), err
    assert not (tmp_path / "imported.marker").exists()  # its side effects never ran
    assert "PIPELINE IMPORTED" not in err and "WARNING" not in err, err


def test_no_redirect_says_nothing(fake_ml_env: Path, tmp_path: Path) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(MAIN_IMPORTS_AT_ONCE)
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--no-redirect")
    assert (code, out) == (0, "redirected False\n"), err
    assert "WARNING" not in err, err


def test_spawned_workers_do_not_repeat_the_warning(fake_ml_env: Path, tmp_path: Path) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(
        "import multiprocessing\n\n\n"
        "def work(_):\n"
        "    import pipeline\n"
        "    return pipeline.refresh_token()\n\n\n"
        "if __name__ == '__main__':\n"
        "    with multiprocessing.get_context('spawn').Pool(2) as pool:\n"
        "        print(pool.map(work, range(2)))\n"
        "    import pipeline\n"
    )
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipline:refresh_token")
    assert (code, out) == (0, "['legacy', 'legacy']\n"), err
    assert len(warnings(err, "pipline")) == 1, err


def test_lookalikes_prefer_close_spellings_then_the_same_last_part() -> None:
    modules = ["pipeline", "pkg.main2", "main3", "requests_helpers", "other.pipeline"]
    assert absent.lookalikes("pipline", modules)[0] == "pipeline"
    assert "pkg.main2" in absent.lookalikes("main2", modules)
    assert absent.lookalikes("zzz", modules) == []


def test_findable_imports_nothing(tmp_path: Path) -> None:
    package = tmp_path / "sidefx_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    (package / "inner.py").write_text("raise RuntimeError('imported!')\n")
    folders = [str(tmp_path)]
    assert absent.findable("sidefx_pkg", folders)
    assert not absent.findable("sidefx_pkgg", folders)
    assert absent.findable("sidefx_pkg.inner", folders)  # in the folder the parent's spec names
    assert not absent.findable("sidefx_pkg.other", folders)
    assert not absent.findable("sidefx_pkg", [])  # not on sys.path
    assert "sidefx_pkg" not in sys.modules and "sidefx_pkg.inner" not in sys.modules


# -- correct set-ups that must stay silent, and processes that must not repeat it ------

LEGACY = """\
import sys
print("LEGACY IMPORTED", flush=True, file=sys.stderr)


def refresh_token(force=False):
    return "legacy"
"""


def test_a_wrapper_script_named_like_the_module_it_puts_on_the_path_is_no_false_alarm(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    # bin/worker.py is a thin launcher: it puts the project on sys.path and imports
    # app.worker, the module that holds the legacy refresh. --redirect app.worker:... is the
    # right name (the function is redirected), yet the script's stem "worker" shares its last
    # part, so absent.py warns at start-up, before the script has had a chance to fix its
    # path, and advises --redirect worker:refresh_token, which names a module without it.
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "app" / "worker.py").write_text(LEGACY)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "worker.py").write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))\n"
        "import app.worker\n"
        "print('redirected', hasattr(app.worker.refresh_token, '__wrapped__'))\n"
    )
    prefix = mlauth_run(fake_ml_env, "--redirect", "app.worker:refresh_token")
    code, out, err = run_program(["bin/worker.py"], tmp_path, dict(os.environ), prefix)
    assert (code, out) == (0, "redirected True\n"), err
    assert warnings(err, "app.worker") == [], err


def test_forked_children_do_not_repeat_the_warning(fake_ml_env: Path, tmp_path: Path) -> None:
    # A pre-fork server (gunicorn, Celery's billiard: os.fork, not multiprocessing) whose
    # workers import the module that looks like the misspelt one: one warning is the fix;
    # each worker and the master repeat it (the master's at exit says "never imported").
    (tmp_path / "pipeline.py").write_text(LEGACY)
    (tmp_path / "server.py").write_text(
        "import os, sys\n"
        "children = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        import pipeline\n"
        "        sys.exit(0)  # a gunicorn worker leaves by SystemExit: atexit runs\n"
        "    children.append(pid)\n"
        "for pid in children:\n"
        "    os.waitpid(pid, 0)\n"
        "print('served', flush=True)\n"
    )
    prefix = mlauth_run(fake_ml_env, "--redirect", "pipline:refresh_token")
    code, out, err = run_program(["server.py"], tmp_path, dict(os.environ), prefix)
    assert (code, out) == (0, "served\n"), err
    assert len(warnings(err, "pipline")) == 1, err


def test_a_submodule_of_a_pkgutil_namespace_package_is_not_called_missing(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    # corp is split over two folders on PYTHONPATH, joined by pkgutil.extend_path in its
    # __init__ (the pre-PEP 420 way, still common in company packages). corp.tokens exists
    # and would be imported (and redirected) by any run that needs it; this run does not.
    # Without importing corp, absent.py searches only the first corp/ folder, and says at exit
    # that "no module corp.tokens can be found on this program's path".
    init = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    for part in ("src", "lib"):
        (tmp_path / part / "corp").mkdir(parents=True)
        (tmp_path / part / "corp" / "__init__.py").write_text(init)
    (tmp_path / "lib" / "corp" / "tokens.py").write_text(LEGACY)
    (tmp_path / "main2.py").write_text("print('done')\n")
    environ = dict(os.environ)
    # mlauth run puts its sitecustomize first; the program's folders follow.
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path / "src"), str(tmp_path / "lib"), environ.get("PYTHONPATH", "")]
    )
    check = subprocess.run(
        [sys.executable, "-c", "import corp.tokens"],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr  # the module is there for the program
    prefix = mlauth_run(fake_ml_env, "--redirect", "corp.tokens:refresh_token")
    code, out, err = run_program(["main2.py"], tmp_path, environ, prefix)
    assert (code, out) == (0, "done\n"), err
    assert warnings(err, "corp.tokens") == [], err


def test_a_second_install_naming_an_absent_module_raises_only_mlauth_errors(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    # python -c (or a notebook: __main__ has no __file__) whose working folder was removed
    # (a deploy that replaced the release folder under a long-running process). The later
    # install(redirect=[...]) reaches absent.check() through redirect.add(), which, unlike
    # redirect.start(), does not guard it: os.getcwd()'s FileNotFoundError leaves install().
    gone = tmp_path / "release"
    gone.mkdir()
    code = (
        "import os, mlauth\n"
        f"os.chdir({str(gone)!r}); os.rmdir({str(gone)!r})\n"
        f"mlauth.install({str(fake_ml_env)!r}, redirect=False)\n"
        "try:\n"
        f"    mlauth.install({str(fake_ml_env)!r}, redirect=['nothere:refresh_token'])\n"
        "except mlauth.MLAuthError as exc:\n"
        "    print('MLAuthError', exc)\n"
        "except Exception as exc:\n"
        "    print('ESCAPED', type(exc).__name__, exc)\n"
        "else:\n"
        "    print('installed')\n"
    )
    code_, out, err = run_program(["-c", code], tmp_path, dict(os.environ))
    assert code_ == 0, err
    assert not out.startswith("ESCAPED"), out
