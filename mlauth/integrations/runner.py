"""``mlauth run``: start an unmodified command with mlauth installed in its Python processes.

The command replaces this process (``exec``), so its exit code, signals, stdin, stdout and
process id are the command's own by construction. mlauth reaches it through a
``sitecustomize`` module on ``PYTHONPATH`` (see ``_run_site/sitecustomize.py``).

Since the pid stays, the child is told it (``MLAUTH_RUN_PID``): the command itself must run
with mlauth, and fails at start-up if its Python cannot import it, while Pythons it starts
(perhaps unrelated tools) only get a warning.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from mlauth.logs import LEVEL_VARIABLE

__all__ = [
    "ENV_VARIABLE",
    "PID_VARIABLE",
    "PYTHON_VARIABLE",
    "REDIRECT_OFF",
    "REDIRECT_VARIABLE",
    "SITE_DIR",
    "child_environment",
    "exec_command",
    "isolation_warning",
]

SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_run_site")
ENV_VARIABLE = "MLAUTH_RUN_ENV"
PID_VARIABLE = "MLAUTH_RUN_PID"  # the command's pid (ours: exec keeps it)
PYTHON_VARIABLE = "MLAUTH_RUN_PYTHON"  # a Python that has mlauth, for the error message
# --redirect/--no-redirect for every Python of the command: unset, the default; "off"; or
# MODULE:FUNCTION pairs joined by commas, redirected besides the default.
REDIRECT_VARIABLE = "MLAUTH_RUN_REDIRECT"
REDIRECT_OFF = "off"
# Python ignores these at start-up and exec keeps ignored signals ignored: `mlauth run -- yes
# | head -1` would then end in "Broken pipe" errors instead of dying quietly of SIGPIPE.
_RESTORED_SIGNALS = ("SIGPIPE", "SIGXFSZ", "SIGXFZ")


def child_environment(
    env_path: str,
    environ: Mapping[str, str],
    *,
    log_level: str | None = None,
    redirect: bool | Sequence[str] = True,
) -> dict[str, str]:
    """``environ`` plus what the child needs: our site folder first on PYTHONPATH, the .env.

    ``log_level`` (``mlauth run -v``/``-q``) becomes ``MLAUTH_LOG_LEVEL``, which
    :func:`mlauth.install` reads in every Python the command starts; ``redirect``
    (``--redirect``/``--no-redirect``) becomes ``MLAUTH_RUN_REDIRECT``, which the
    ``sitecustomize`` passes to it.
    """
    env = dict(environ)
    if log_level is not None:
        env[LEVEL_VARIABLE] = log_level
    env.pop(REDIRECT_VARIABLE, None)  # not inherited from an outer mlauth run
    if redirect is False:
        env[REDIRECT_VARIABLE] = REDIRECT_OFF
    elif redirect is not True and redirect:
        env[REDIRECT_VARIABLE] = ",".join(redirect)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != SITE_DIR]
    env["PYTHONPATH"] = os.pathsep.join([SITE_DIR, *paths])
    env[ENV_VARIABLE] = os.path.abspath(env_path)
    env[PID_VARIABLE] = str(os.getpid())
    env[PYTHON_VARIABLE] = sys.executable
    return env


def isolation_warning(command: Sequence[str]) -> str | None:
    """A warning if the command is ``python`` with a flag that would skip sitecustomize."""
    if not command or not os.path.basename(command[0]).startswith("python"):
        return None
    for arg in command[1:]:
        if arg == "--" or not arg.startswith("-") or arg.startswith("--"):
            break
        if arg in ("-c", "-m"):
            break
        flags = set(arg[1:])
        if flags & {"I", "E", "S"}:
            return (
                f"{command[0]} {arg}: isolated (-I), -E and -S modes skip PYTHONPATH or site, "
                "so mlauth will not be installed in it; drop the flag, or call "
                "mlauth.install() in the script"
            )
        if flags & {"c", "m", "W", "X", "Q"}:
            break  # an option that takes the next argument, or ends the options
    return None


def exec_command(
    command: Sequence[str],
    env_path: str,
    *,
    log_level: str | None = None,
    redirect: bool | Sequence[str] = True,
) -> NoReturn:
    """Replace this process with ``command``; raises OSError if it cannot be started."""
    env = child_environment(env_path, os.environ, log_level=log_level, redirect=redirect)
    for name in _RESTORED_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_DFL)
    # No shell: the user's argv is run as given, exactly as `exec "$@"` would.
    os.execvpe(command[0], list(command), env)  # noqa: S606
