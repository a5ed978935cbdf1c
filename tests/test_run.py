"""`mlauth run`: the command is exec'ed with mlauth installed in its Python; exit codes,
signals, stdin and stdout are the command's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlauth.integrations.runner import SITE_DIR, child_environment, isolation_warning

pytestmark = pytest.mark.processes

SHOW_INSTALLED = (
    "import json, sys, mlauth, requests\n"
    "auth = mlauth.installed()\n"
    "print(json.dumps({'installed': auth is not None,\n"
    "  'store': auth.store.location if auth else None,\n"
    "  'patched': requests.Session.request.__module__}))\n"
)


def run(
    env_file: Path, *command: str, cwd: Path | None = None, **kwargs: object
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mlauth", "run", "--env", str(env_file), "--", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        **kwargs,  # type: ignore[call-overload]
    )


def finish(proc: subprocess.Popen[str], input: str | None = None) -> tuple[int, str, str]:
    out, err = proc.communicate(input, timeout=60)
    return proc.returncode, out, err


def test_the_commands_exit_code_comes_through(fake_ml_env: Path) -> None:
    for code in (0, 3, 42):
        got = finish(run(fake_ml_env, sys.executable, "-c", f"raise SystemExit({code})"))
        assert got[0] == code, got


def test_stdin_and_stdout_are_the_commands(fake_ml_env: Path) -> None:
    proc = run(
        fake_ml_env,
        sys.executable,
        "-c",
        "import sys; sys.stdout.write(sys.stdin.read().upper())",
        stdin=subprocess.PIPE,
    )
    assert finish(proc, "hello pipeline\n")[:2] == (0, "HELLO PIPELINE\n")


def test_a_signal_reaches_the_command_and_kills_it(fake_ml_env: Path) -> None:
    proc = run(
        fake_ml_env,
        sys.executable,
        "-c",
        "import os, sys; print(os.getpid(), flush=True); sys.stdin.readline()",
        stdin=subprocess.PIPE,
    )
    assert proc.stdout is not None
    # exec: the command is the very process we started, not a child of a wrapper.
    assert int(proc.stdout.readline()) == proc.pid
    proc.send_signal(signal.SIGTERM)
    code, _, _ = finish(proc)
    assert code == -signal.SIGTERM


def test_mlauth_is_installed_in_a_script_a_module_and_with_pythonpath_set(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "showmod.py").write_text(SHOW_INSTALLED)
    (tmp_path / "mine.py").write_text("VALUE = 'from the user PYTHONPATH'\n")
    environ = dict(os.environ, PYTHONPATH=str(tmp_path))
    for command in (
        [sys.executable, str(tmp_path / "showmod.py")],
        [sys.executable, "-m", "showmod"],
        [sys.executable, "-c", "import mine; print(mine.VALUE)\n" + SHOW_INSTALLED],
    ):
        code, out, err = finish(run(fake_ml_env, *command, cwd=tmp_path, env=environ))
        assert code == 0, err
        assert '"installed": true' in out, (command, out, err)
        assert f'"store": "{fake_ml_env}"' in out
        assert '"patched": "mlauth.integrations.patch"' in out
    assert "from the user PYTHONPATH" in out


def test_an_existing_sitecustomize_still_runs(fake_ml_env: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    # Marks the interpreter it runs in (not the environment, which the child would inherit
    # from `mlauth run` itself, since that process runs the same sitecustomize).
    (site / "sitecustomize.py").write_text("import builtins\nbuiltins.THEIR_SITE = 'ran'\n")
    environ = dict(os.environ, PYTHONPATH=str(site))
    script = "import builtins; print(getattr(builtins, 'THEIR_SITE', None))\n" + SHOW_INSTALLED
    code, out, err = finish(run(fake_ml_env, sys.executable, "-c", script, env=environ))
    assert code == 0, err
    assert out.startswith("ran\n") and '"installed": true' in out


def test_python_started_by_the_command_gets_mlauth_too(fake_ml_env: Path) -> None:
    inner = (
        "import subprocess, sys\n"
        f"sys.exit(subprocess.call([sys.executable, '-c', {SHOW_INSTALLED!r}]))"
    )
    code, out, err = finish(run(fake_ml_env, sys.executable, "-c", inner))
    assert code == 0, err
    assert '"installed": true' in out


def test_isolated_python_is_warned_about() -> None:
    assert isolation_warning([sys.executable, "-I", "x.py"]) is not None
    assert isolation_warning(["python3", "-uS", "x.py"]) is not None
    assert isolation_warning(["python3", "-u", "x.py", "-I"]) is None
    assert isolation_warning(["python3", "-c", "pass", "-E"]) is None
    assert isolation_warning(["bash", "-E"]) is None


def test_isolated_mode_runs_without_mlauth_and_says_so(fake_ml_env: Path) -> None:
    script = "import sys; print('mlauth' in sys.modules)"
    code, out, err = finish(run(fake_ml_env, sys.executable, "-I", "-c", script))
    assert code == 0 and out == "False\n"
    assert "isolated (-I)" in err


def test_child_environment_prepends_our_site_once() -> None:
    env = child_environment(".env", {"PYTHONPATH": f"/a{os.pathsep}{SITE_DIR}{os.pathsep}/b"})
    assert env["PYTHONPATH"].split(os.pathsep) == [SITE_DIR, "/a", "/b"]
    assert os.path.isabs(env["MLAUTH_RUN_ENV"])
    assert (env["MLAUTH_RUN_PID"], env["MLAUTH_RUN_PYTHON"]) == (str(os.getpid()), sys.executable)
    assert child_environment(".env", {})["PYTHONPATH"] == SITE_DIR


def test_a_missing_command_exits_127(fake_ml_env: Path) -> None:
    code, _, err = finish(run(fake_ml_env, "no-such-command-for-mlauth-tests"))
    assert code == 127 and "command not found" in err


def test_bad_configuration_fails_before_the_command_starts(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    code, _, err = finish(run(tmp_path / "missing.env", *command))
    assert code == 1 and "no such .env file" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_command_killed_by_a_closed_pipe_dies_of_sigpipe(fake_ml_env: Path) -> None:
    # `mlauth run -- yes | head -1`: Python ignores SIGPIPE, and exec would pass that on.
    proc = run(fake_ml_env, "yes")
    assert proc.stdout is not None
    assert proc.stdout.readline() == "y\n"
    proc.stdout.close()  # the reader leaves, as head does
    assert proc.stderr is not None
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(timeout=60) == -signal.SIGPIPE, err
    assert "Broken pipe" not in err


def test_the_command_starts_with_default_sigpipe_and_sigxfsz(fake_ml_env: Path) -> None:
    code, out, err = finish(run(fake_ml_env, "cat", "/proc/self/status"))
    assert code == 0, err
    ignored = int(
        next(line for line in out.splitlines() if line.startswith("SigIgn:")).split()[1], 16
    )
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), sig


def shadowing_mlauth(tmp_path: Path) -> Path:
    """A folder whose ``mlauth`` cannot be imported: a Python with it first on its path."""
    shadow = tmp_path / "shadow"
    (shadow / "mlauth").mkdir(parents=True)
    (shadow / "mlauth" / "__init__.py").write_text("raise ImportError('no mlauth here')\n")
    return shadow


def test_the_command_fails_when_its_python_cannot_import_mlauth(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    shadow = shadowing_mlauth(tmp_path)
    # sh exec's the Python: same pid, so it is the command mlauth run was asked to protect.
    script = (
        f'PYTHONPATH="$PYTHONPATH{os.pathsep}{shadow}" exec "$0" -c "open({str(marker)!r}, \'w\')"'
    )
    code, _, err = finish(run(fake_ml_env, "sh", "-c", script, sys.executable))
    assert code == 1, err
    assert not marker.exists()
    assert "cannot import mlauth" in err and "nothing was run" in err
    assert f"Run it with {sys.executable}" in err


def test_a_python_started_by_the_command_without_mlauth_is_only_warned_about(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    shadow = shadowing_mlauth(tmp_path)
    inner = (
        "import os, subprocess, sys\n"
        f"path = os.environ['PYTHONPATH'] + os.pathsep + {str(shadow)!r}\n"
        "env = dict(os.environ, PYTHONPATH=path)\n"
        "sys.exit(subprocess.call([sys.executable, '-c', 'print(42)'], env=env))"
    )
    code, out, err = finish(run(fake_ml_env, sys.executable, "-c", inner))
    assert (code, out) == (0, "42\n"), err
    assert "cannot import mlauth" in err and "runs without it" in err
