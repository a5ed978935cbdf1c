"""Review 3: the warning for a ``--redirect`` module the program does not have
(mlauth/integrations/redirect/absent.py), attacked with correct setups that must stay silent
and with processes that must not repeat it (real ``mlauth run`` processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redirect_support import mlauth_run, run_program

pytestmark = pytest.mark.processes

LEGACY = """\
import sys
print("LEGACY IMPORTED", flush=True, file=sys.stderr)


def refresh_token(force=False):
    return "legacy"
"""


def warnings(err: str, module: str) -> list[str]:
    return [line for line in err.splitlines() if "WARNING" in line and f"{module}:" in line]


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
