"""Put on ``PYTHONPATH`` by ``mlauth run``: installs mlauth in every Python it starts.

Python imports ``sitecustomize`` at start-up, before the script or ``-m`` module runs. This
one first runs the ``sitecustomize`` it shadows (a distribution's or a virtualenv's, which
may be what makes mlauth importable), then calls ``mlauth.install()`` for the ``.env`` named
in ``MLAUTH_RUN_ENV``. Grandchildren inherit the variables, so Python processes started by
the command get mlauth too. ``python -I``, ``-E`` and ``-S`` skip this file.
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
        # Perhaps an unrelated tool on another interpreter, started by the command: let it
        # run, but say that its requests calls carry no token.
        sys.stderr.write(
            f"mlauth run: {sys.executable} cannot import mlauth ({exc}); this process runs "
            "without it. Run the command with the Python that has mlauth installed.\n"
        )
        return
    try:
        mlauth.install(path)
    except mlauth.MLAuthError as exc:
        sys.stderr.write(f"mlauth run: {exc}\n")
        sys.stderr.flush()
        # SystemExit here would be a fatal start-up error with a traceback; nothing has run.
        os._exit(1)


_chain()
_install()
