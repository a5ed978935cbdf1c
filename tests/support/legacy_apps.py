"""What the legacy tests share: a pipeline module written the old way, a worker script that
drives it, and a non-MercadoLibre server that records the Authorization headers it gets."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# How every legacy program of the tests starts (ML-FACTS.md): the .env named by PIPELINE_ENV
# read into module globals at import, HEADERS with the token, and a count of the refreshes
# the program's own refresh function made. Needs os and dotenv_values imported before it.
ENV_GLOBALS = """\
ENV_PATH = os.environ["PIPELINE_ENV"]
_values = dotenv_values(ENV_PATH)
ML_CLIENT_ID = _values["ML_CLIENT_ID"]
ML_CLIENT_SECRET = _values["ML_CLIENT_SECRET"]
ML_ACCESS_TOKEN = _values["ML_ACCESS_TOKEN"]
ML_REFRESH_TOKEN = _values["ML_REFRESH_TOKEN"]
TOKEN_URL = _values["ML_TOKEN_URL"]
API = _values["PIPELINE_API"]
HEADERS = {"Authorization": f"Bearer {ML_ACCESS_TOKEN}", "Content-Type": "application/json"}
LEGACY_REFRESHES = 0
"""

# The legacy client of ML-FACTS.md, kept as it was: .env read into globals at import, HEADERS
# with the token, requests.get/post/put helpers, and a refresh function with no lock that
# rewrites the .env in place and only recognises two of the four 401 shapes.
LEGACY_MODULE = (
    """
import os
import requests
from dotenv import dotenv_values

"""
    + ENV_GLOBALS
    + """

def refresh_ml_token():
    global ML_ACCESS_TOKEN, ML_REFRESH_TOKEN, LEGACY_REFRESHES
    LEGACY_REFRESHES += 1
    r = requests.post(TOKEN_URL, data={
        "grant_type": "refresh_token", "client_id": ML_CLIENT_ID,
        "client_secret": ML_CLIENT_SECRET, "refresh_token": ML_REFRESH_TOKEN,
    }, timeout=30)
    if r.status_code != 200:
        print("refresh failed", r.status_code)
        return False
    body = r.json()
    ML_ACCESS_TOKEN = body["access_token"]
    ML_REFRESH_TOKEN = body.get("refresh_token") or ML_REFRESH_TOKEN
    HEADERS["Authorization"] = f"Bearer {ML_ACCESS_TOKEN}"
    lines = []
    with open(ENV_PATH) as f:
        for line in f:
            if line.startswith("ML_ACCESS_TOKEN="):
                line = f"ML_ACCESS_TOKEN={ML_ACCESS_TOKEN}\\n"
            elif line.startswith("ML_REFRESH_TOKEN="):
                line = f"ML_REFRESH_TOKEN={ML_REFRESH_TOKEN}\\n"
            lines.append(line)
    with open(ENV_PATH, "w") as f:
        f.writelines(lines)
    return True


def _retry_once(call):
    r = call()
    if r.status_code == 401 and ("invalid_token" in r.text or "expired" in r.text):
        if refresh_ml_token():
            r = call()
    return r


def http_get(path):
    return _retry_once(lambda: requests.get(API + path, headers=HEADERS, timeout=30))


def http_post(path, payload):
    return _retry_once(lambda: requests.post(API + path, headers=HEADERS, json=payload, timeout=30))


def http_put(path, payload):
    return _retry_once(lambda: requests.put(API + path, headers=HEADERS, json=payload, timeout=30))
"""
)

# Drives the legacy module for WORKER_SECONDS and prints its counts as JSON. WORKER_MODE says
# where mlauth comes in: "install-before"/"install-after" the legacy import, or "none" (the
# script is then unmodified: under `mlauth run`, or bare as the control).
WORKER = """
import json, os, sys, time
MODE = os.environ["WORKER_MODE"]
if MODE == "install-before":
    import mlauth
    mlauth.install(os.environ["PIPELINE_ENV"])
import legacy_pipeline as lp
if MODE == "install-after":
    import mlauth
    mlauth.install(os.environ["PIPELINE_ENV"])
import requests

other = os.environ["OTHER_URL"]
counts = {"calls": 0, "ok": 0, "failed": 0, "other_calls": 0}
errors = []
deadline = time.monotonic() + float(os.environ["WORKER_SECONDS"])
i = 0
while time.monotonic() < deadline:
    i += 1
    for r in (lp.http_get("/users/me"), lp.http_post("/items", {"n": i}),
              lp.http_put(f"/items/{i}", {"n": i})):
        counts["calls"] += 1
        if r.status_code == 200:
            counts["ok"] += 1
        else:
            counts["failed"] += 1
            errors.append(f"{r.status_code} {r.text[:100]}")
    # The same process calls a host that is not MercadoLibre, with a stale header and without.
    requests.get(other + "/ping", headers={"Authorization": "Bearer stale-legacy"}, timeout=10)
    requests.post(other + "/ping", json={"n": i}, timeout=10)
    counts["other_calls"] += 2
counts["legacy_refreshes"] = lp.LEGACY_REFRESHES
counts["errors"] = errors[:5]
print(json.dumps(counts), flush=True)
sys.exit(int(os.environ.get("WORKER_EXIT", "0")) if counts["failed"] == 0 else 1)
"""


def write_legacy_app(folder: Path) -> Path:
    """The legacy module and its worker in ``folder``; returns the worker's path."""
    (folder / "legacy_pipeline.py").write_text(LEGACY_MODULE)
    worker = folder / "legacy_worker.py"
    worker.write_text(WORKER)
    return worker


class RecordingServer:
    """A plain HTTP server (not MercadoLibre) that records each request's Authorization."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.received: list[str | None] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with recorder._lock:
                    recorder.received.append(self.headers.get("Authorization"))
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_PUT = do_GET

        self._server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def headers(self) -> list[str | None]:
        with self._lock:
            return list(self.received)


def legacy_env(fake: Any, env: Path, lifetime: float, age: float = 0.0) -> None:
    """A .env for ``fake`` whose token was issued ``age`` seconds ago, plus the legacy
    module's API setting."""
    issued = time.time() - age
    fake.write_env(
        env,
        expires_at=issued + lifetime,
        extra={"ML_TOKEN_REFRESHED_AT": str(issued), "PIPELINE_API": fake.base_url},
    )


def start_worker(
    command: list[str],
    folder: Path,
    env: Path,
    other_url: str,
    mode: str,
    seconds: float,
    stdin: int | None = None,
) -> subprocess.Popen[str]:
    import os

    environ = dict(os.environ)
    environ.update(
        PIPELINE_ENV=str(env),
        OTHER_URL=other_url,
        WORKER_MODE=mode,
        WORKER_SECONDS=str(seconds),
        WORKER_EXIT="5",  # a distinctive success code, to see that it comes through
        PYTHONPATH=str(folder),
    )
    return subprocess.Popen(
        command,
        cwd=folder,
        env=environ,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_result(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, f"exit {proc.returncode}, no output; stderr: {err[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    result["stderr"] = err[-2000:]
    return proc.returncode, result


PYTHON = sys.executable
