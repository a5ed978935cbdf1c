"""What the redirect tests share: a legacy pipeline that refreshes at start-up the way cron
runs it, laid out as a script, an imported module or a package, and a start line that lets
several copies go at the same moment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.legacy_apps import ENV_GLOBALS

# The legacy client of ML-FACTS.md: the .env read into globals at import, HEADERS with the
# token, and a refresh function with no lock that POSTs the refresh grant with requests and
# rewrites the .env with python-dotenv's set_key. ``start_line()`` stands for cron starting
# every copy in the same second: each copy, its .env read, waits there for the test's "go".
HEAD = (
    """\
import hashlib, json, os, sys, time
import requests
from dotenv import dotenv_values, set_key

"""
    + ENV_GLOBALS
    + """\
_LAST_REFRESH = 0.0


def start_line():
    print("ready", flush=True)
    sys.stdin.readline()


def report(ok, **extra):
    answer = requests.get(API + "/users/me", headers=HEADERS, timeout=30)
    token = hashlib.sha256(ML_ACCESS_TOKEN.encode()).hexdigest()[:12]
    print(json.dumps(dict(ok=ok, status=answer.status_code, legacy_refreshes=LEGACY_REFRESHES,
                          token=token, **extra)), flush=True)
"""
)

# What watches the process: a trace function, monitoring tools (mlauth's watch of a script).
WATCHERS = """\
def watchers():
    tools = [sys.monitoring.get_tool(i) for i in range(6)] if hasattr(sys, "monitoring") else []
    trace = sys.gettrace()
    return {"trace": getattr(trace, "__qualname__", None) if trace else None,
            "tools": [t for t in tools if t]}
"""
NOT_WATCHED = {"trace": None, "tools": []}

REFRESH = """
def refresh_ml_token(force=False):
    global ML_ACCESS_TOKEN, ML_REFRESH_TOKEN, LEGACY_REFRESHES, _LAST_REFRESH
    if not force and time.time() - _LAST_REFRESH < 10:
        return True  # refreshed moments ago
    LEGACY_REFRESHES += 1
    r = requests.post(TOKEN_URL, data={
        "grant_type": "refresh_token", "client_id": ML_CLIENT_ID,
        "client_secret": ML_CLIENT_SECRET, "refresh_token": ML_REFRESH_TOKEN,
    }, timeout=30)
    if r.status_code != 200:
        print("refresh failed", r.status_code, r.text[:80], file=sys.stderr)
        return False
    body = r.json()
    ML_ACCESS_TOKEN = body["access_token"]
    ML_REFRESH_TOKEN = body.get("refresh_token") or ML_REFRESH_TOKEN
    HEADERS["Authorization"] = f"Bearer {ML_ACCESS_TOKEN}"
    set_key(ENV_PATH, "ML_ACCESS_TOKEN", ML_ACCESS_TOKEN)
    set_key(ENV_PATH, "ML_REFRESH_TOKEN", ML_REFRESH_TOKEN)
    _LAST_REFRESH = time.time()
    return True
"""

# The start-up call in main(), the common shape.
MAIN = """

def main():
    start_line()
    ok = refresh_ml_token(force=True)
    report(ok)


if __name__ == "__main__":
    main()
"""


def pipeline(name: str = "refresh_ml_token", *, call: str = "main") -> str:
    """The legacy pipeline's source, its refresh function called ``name``.

    ``call="main"``: ``main()`` calls it at start-up; ``"def"``: module level, right after the
    ``def`` (the start line just before it); ``"none"``: nobody calls it (an imported module).
    """
    refresh = REFRESH.replace("refresh_ml_token", name)
    if call == "main":
        return HEAD + refresh + MAIN.replace("refresh_ml_token", name)
    if call == "def":
        return HEAD + "\nstart_line()\n" + refresh + f"OK = {name}(force=True)\n"
    assert call == "none", call
    return HEAD + refresh


# The pipeline's workers: a pool of N processes of a start method (argv: METHOD N), which
# meet at a barrier as they start and each call refresh_ml_token(force=True) then (a pool
# initializer, as workers refresh before their first call), and report what happened there;
# the parent prints the reports. With ``at_import``, the script also calls it at module level,
# which a spawn or forkserver worker runs again as it re-runs the script.
POOL_MAIN = (
    """
import multiprocessing, queue

"""
    + WATCHERS
    + """

def start_worker(barrier, reports):
    barrier.wait(timeout=60)
    ok = refresh_ml_token(force=True)
    answer = requests.get(API + "/users/me", headers=HEADERS, timeout=30)
    token = hashlib.sha256(ML_ACCESS_TOKEN.encode()).hexdigest()[:12]
    reports.put(dict(pid=os.getpid(), ok=ok, status=answer.status_code, token=token,
                     legacy_refreshes=LEGACY_REFRESHES, watchers=watchers()))


if __name__ == "__main__":
    context = multiprocessing.get_context(sys.argv[1])
    workers = int(sys.argv[2])
    barrier, reports = context.Barrier(workers), context.Queue()
    with context.Pool(workers, initializer=start_worker, initargs=(barrier, reports)) as pool:
        print(json.dumps([reports.get(timeout=90) for _ in range(workers)]), flush=True)
"""
)


INSTALL = "import mlauth, os\nmlauth.install(os.environ['PIPELINE_ENV'])\n"


def pool_pipeline(*, at_import: bool = False, install: str = "run") -> str:
    """The legacy pipeline whose work runs in a pool (``POOL_MAIN``); ``install`` says where
    mlauth comes in: ``"run"``, nowhere in the code (``mlauth run``); ``"top"``, the script's
    first lines call ``install()``; ``"worker"``, the pool's initializer does."""
    main = POOL_MAIN
    if install == "worker":
        wait = "    barrier.wait("
        main = main.replace(wait, textwrap.indent(INSTALL, "    ") + wait)
    source = HEAD + REFRESH + ("OK = refresh_ml_token(force=True)\n" if at_import else "") + main
    return INSTALL + source if install == "top" else source


@dataclass
class Program:
    """A legacy program written into a folder, and the arguments that run it after python."""

    folder: Path
    argv: list[str]


def write_program(folder: Path, layout: str, name: str = "refresh_ml_token") -> Program:
    """The pipeline laid out as ``layout``, in ``folder``:

    - ``script``: ``main2.py`` defines the function and calls it from ``main()``;
    - ``script-def``: ``main2.py`` calls it at module level right after the ``def``;
    - ``module``: ``legacy_pipeline.py`` calls it at import, right after the ``def``, and
      ``main2.py`` imports it and calls it again;
    - ``package``: ``pipeline/main2.py`` as in ``script``, run with ``python -m pipeline.main2``.
    """
    if layout == "script":
        (folder / "main2.py").write_text(pipeline(name))
        return Program(folder, ["main2.py"])
    if layout == "script-def":
        (folder / "main2.py").write_text(pipeline(name, call="def") + "report(OK)\n")
        return Program(folder, ["main2.py"])
    if layout == "module":
        (folder / "legacy_pipeline.py").write_text(pipeline(name, call="def"))
        (folder / "main2.py").write_text(
            "import legacy_pipeline as lp\n"
            f"again = lp.{name}(force=True)\n"
            "lp.report(lp.OK and again)\n"
        )
        return Program(folder, ["main2.py"])
    assert layout == "package", layout
    (folder / "pipeline").mkdir()
    (folder / "pipeline" / "__init__.py").write_text("")
    (folder / "pipeline" / "main2.py").write_text(pipeline(name))
    return Program(folder, ["-m", "pipeline.main2"])


def pipeline_environment(env: Path, **extra: str) -> dict[str, str]:
    environ = dict(os.environ)
    environ.pop("MLAUTH_LOG_LEVEL", None)
    environ.update(PIPELINE_ENV=str(env), **extra)
    return environ


def start_together(
    commands: list[list[str]], cwd: Path, environ: dict[str, str]
) -> list[tuple[int, dict[str, Any], str]]:
    """Start every command, wait until each has read its .env and stands at its start line,
    release them all at once; returns each one's (exit code, last JSON line, stderr)."""
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=environ,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                out, err = proc.communicate(timeout=60)
                raise AssertionError(f"not ready: {line!r} {out!r} {err[-3000:]}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            lines = out.strip().splitlines()
            assert lines, f"exit {proc.returncode}, no output; stderr: {err[-3000:]}"
            results.append((proc.returncode, json.loads(lines[-1]), err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def mlauth_run(env: Path, *options: str) -> list[str]:
    """``mlauth run --env ENV [options] -- python``: the prefix of a command under mlauth."""
    return [
        sys.executable,
        "-m",
        "mlauth",
        "run",
        "--env",
        str(env),
        *options,
        "--",
        sys.executable,
    ]


def run_program(
    argv: list[str],
    cwd: Path,
    environ: dict[str, str],
    prefix: list[str] | None = None,
) -> tuple[int, str, str]:
    """Run ``python ARGV`` (under ``prefix``, e.g. :func:`mlauth_run`); (exit code, out, err)."""
    command = [*(prefix or [sys.executable]), *argv]
    proc = subprocess.run(
        command, cwd=cwd, env=environ, capture_output=True, text=True, timeout=120, check=False
    )
    return proc.returncode, proc.stdout, proc.stderr


# A script that only reports whether its refresh function was redirected, and what watched
# it: mlauth's trace function or monitoring tool, before and after the def.
REPORTING_SCRIPT = "import json, sys\n\n" + WATCHERS + "\nBEFORE = watchers()\n"

REPORTING_TAIL = """
AFTER = watchers()
fn = globals().get("refresh_ml_token")
print(json.dumps({"before": BEFORE, "after": AFTER,
                  "redirected": hasattr(fn, "__wrapped__") if fn else None}))
"""


def search_path(*folders: Path) -> str:
    """``folders`` first on a PYTHONPATH that keeps the one the tests run with."""
    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])
