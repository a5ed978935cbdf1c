"""A cron job that keeps its mlauth metrics in a textfile for node_exporter, then exits.

    python metrics_cron.py ENV URL PROM

It sets up ``mlauth.metrics.prometheus.textfile(PROM)`` (written at exit), sends one GET to
URL through an auth on ENV (whose token has expired: the GET refreshes), prints the status
and exits normally, before any scrape could have read the process.
"""

from __future__ import annotations

import sys

import requests

import mlauth
from mlauth.metrics import prometheus


def main() -> None:
    env, url, prom = sys.argv[1:4]
    prometheus.textfile(prom)
    session = requests.Session()
    session.trust_env = False
    session.auth = mlauth.MLAuth.from_env(env)
    print(session.get(url, timeout=30).status_code)


if __name__ == "__main__":
    main()
