"""What the redirect of a legacy refresh function costs a program under ``mlauth run``.

Two scripts, each importing ten standard-library modules first (what a pipeline does
before its functions are defined, and the worst case for the watch of ``script.py`` on
Python 3.10/3.11, whose trace function sees every call until the ``def`` has run), then a
CPU-bound loop of a million Python calls:

- ``with def``: defines ``refresh_ml_token()`` at the top level after those imports;
- ``without``: defines nothing to redirect.

Each runs under ``mlauth run --no-redirect`` and under ``mlauth run`` (the redirect on), ``--runs``
times, alternating. Reported (medians of CPU time): from the process's start to the line after
the ``def`` (``mlauth run`` itself, which exec's the command in the same process, the
interpreter, ``sitecustomize`` and ``install()``, the imports, the watch); from the script's
first line to the line after the ``def`` (the imports, and the watch on 3.10/3.11); and the
loop after it, which shows whether anything of the watch is left.

    python -m benchmarks.redirect_overhead --runs 15 [--python /path/to/python3.12 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlauth.testing import FakeMercadoLibre

FIRST = "import json, time\nFIRST_LINE = time.process_time()\n"
# None of them imported already by the time the script starts under `mlauth run` (mlauth,
# requests and their imports; csv, decimal and difflib are among those), so each import runs
# its module's code.
IMPORTS = (
    "import asyncio, configparser, fractions, plistlib, pprint, sqlite3, statistics\n"
    "import tarfile, unittest, xml.etree.ElementTree\n"
)
DEF = "def refresh_ml_token(force=False):\n    return True\n"
REPORT = """\
AFTER_DEF = time.process_time()


def step(i):
    return i & 7


def loop(n):
    total = 0
    for i in range(n):
        total += step(i)
    return total


begin = time.process_time()
loop(1_000_000)
print(json.dumps({"start": AFTER_DEF, "imports": AFTER_DEF - FIRST_LINE,
                  "loop": time.process_time() - begin}))
"""
SCRIPTS = {"with def": FIRST + IMPORTS + DEF + REPORT, "without": FIRST + IMPORTS + REPORT}
MODES = {"--no-redirect": ["--no-redirect"], "redirect": []}


def measure(
    python: str, folder: Path, env: Path, runs: int
) -> dict[tuple[str, str], list[dict[str, float]]]:
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(runs):
        for script in SCRIPTS:
            for mode, options in MODES.items():
                command = [python, "-m", "mlauth", "run", "--env", str(env), *options, "--"]
                name = "with_def.py" if script == "with def" else "without.py"
                done = subprocess.run(
                    [*command, python, name], cwd=folder, capture_output=True, text=True, check=True
                )
                results.setdefault((script, mode), []).append(json.loads(done.stdout))
    return results


def table(python: str, results: dict[tuple[str, str], list[dict[str, float]]]) -> str:
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = [
        f"Python {version}: CPU ms, medians of {len(next(iter(results.values())))} runs",
        "",
        "| script | process start to after the def | first line to after the def | loop |",
        "| --- | ---: | ---: | ---: |",
    ]
    for script in SCRIPTS:
        cells = []
        for key in ("start", "imports", "loop"):
            medians = [
                statistics.median(r[key] for r in results[(script, mode)]) * 1000 for mode in MODES
            ]
            cells.append(" / ".join(f"{m:.1f}" for m in medians))
        lines.append(f"| {script} | {' | '.join(cells)} |")
    lines.append("")
    lines.append("Each cell: under `mlauth run --no-redirect` / under `mlauth run`.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--python", action="append", help="an interpreter that imports mlauth (default: this one)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, FakeMercadoLibre() as fake:
        folder = Path(tmp)
        env = folder / ".env"
        fake.write_env(env)
        (folder / "with_def.py").write_text(SCRIPTS["with def"])
        (folder / "without.py").write_text(SCRIPTS["without"])
        for given in args.python or [sys.executable]:
            python = os.path.abspath(given) if os.sep in given else given  # runs in the folder
            print(table(python, measure(python, folder, env, args.runs)), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
