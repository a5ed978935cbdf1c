"""Put on ``PYTHONPATH`` by ``mlauth run``: installs mlauth in every Python it starts.

Python imports ``sitecustomize`` at start-up, before the script or ``-m`` module runs. This
one first runs the ``sitecustomize`` it shadows (a distribution's or a virtualenv's, which
may be what makes mlauth importable), then calls ``mlauth.install()`` for the ``.env`` named
in ``MLAUTH_RUN_ENV``, redirecting the legacy refresh functions that ``MLAUTH_RUN_REDIRECT``
asks for. Grandchildren inherit the variables, so Python processes started by the command get
mlauth too. ``python -I``, ``-E`` and ``-S`` skip this file.

The command itself (the process whose pid is ``MLAUTH_RUN_PID``: ``mlauth run`` exec'ed it)
must not run unprotected: if it cannot import mlauth it exits 1 before its code runs.

``install()`` also shows mlauth's warnings and errors on stderr while the script has no
logging handlers of its own (``MLAUTH_LOG_LEVEL``, which ``mlauth run -v``/``-q`` set, picks
the level); a script that calls ``logging.basicConfig()`` later gets them through its own
handler only (see ``mlauth/logs.py``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _chain() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


def _install() -> None:
    path = os.environ.get("MLAUTH_RUN_ENV")
    if not path:
        return
    try:
        import mlauth
    except ImportError as exc:
        python = os.environ.get("MLAUTH_RUN_PYTHON") or "the Python that has mlauth"
        if os.environ.get("MLAUTH_RUN_PID") == str(os.getpid()):
            # The command mlauth run was asked to protect: running it without the token
            # refresh would only fail later, mid-pipeline.
            sys.stderr.write(
                f"mlauth run: {sys.executable} cannot import mlauth ({exc}), so the command "
                f"would run without it; nothing was run. Run it with {python}, which has "
                f"mlauth (e.g. mlauth run -- {python} script.py), or install mlauth into "
                f"{sys.executable}.\n"
            )
            sys.stderr.flush()
            os._exit(1)
        # Perhaps an unrelated tool on another interpreter, started by the command: let it
        # run, but say that its requests calls carry no token.
        sys.stderr.write(
            f"mlauth run: {sys.executable} cannot import mlauth ({exc}); this process runs "
            f"without it. Run it with {python}, which has mlauth, if it calls MercadoLibre.\n"
        )
        return
    setting = os.environ.get("MLAUTH_RUN_REDIRECT", "")
    # `mlauth run --no-redirect` / `--redirect MODULE:FUNCTION` (see mlauth/integrations/runner.py)
    redirect = False if setting == "off" else [name for name in setting.split(",") if name]
    try:
        mlauth.install(path, redirect=redirect)
    except mlauth.MLAuthError as exc:
        sys.stderr.write(f"mlauth run: {exc}\n")
        sys.stderr.flush()
        # SystemExit here would be a fatal start-up error with a traceback; nothing has run.
        os._exit(1)


_chain()
_install()
