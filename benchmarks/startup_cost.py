"""What starting mlauth costs: ``import mlauth``, and ``mlauth run -- python -c pass``.

Each ``--checkout LABEL=FOLDER`` is a clone with its own ``make .venv/.installed``; its
``.venv/bin/python`` and ``.venv/bin/mlauth`` are run from an empty folder, so the editable
install finds that clone's code. Its bytecode is compiled first (``compileall``, as pip does
at install): a checkout under ``PYTHONDONTWRITEBYTECODE=1`` with stale or missing
``__pycache__`` would otherwise compile the changed modules on every import and measure the
compiler. ``--no-bytecode`` adds rows for a copy of each clone's ``mlauth/`` without bytecode
(what such a checkout costs).

Per round, in a shuffled order, one run of each command for each checkout. Reported, in CPU
ms (user + system), median [min-max] and quartiles:

- ``import``: the ``import mlauth`` statement alone, timed inside the process
  (``time.process_time``), which leaves out the interpreter's own start;
- ``python -c``: the whole ``python -c "import mlauth"`` process (``RUSAGE_CHILDREN``);
- ``mlauth run``: the whole ``mlauth run --env ENV -- python -c pass`` (two interpreters,
  the ``mlauth`` command and the Python it exec's, each importing mlauth), on a ``.env``
  of a :class:`~mlauth.testing.FakeMercadoLibre`;

and for each row, the paired difference of each checkout against each one listed before it,
round by round (the machine's noise moves whole rounds; pairs cancel most of it).

    python -m benchmarks.startup_cost --runs 21 --checkout old=../old --checkout new=.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from mlauth.testing import FakeMercadoLibre

TIMED_IMPORT = (
    "import time; t = time.process_time(); import mlauth; print((time.process_time() - t) * 1000)"
)


def _children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def run(command: Sequence[str], cwd: Path, env: dict[str, str], inside: bool) -> float:
    """CPU ms of one run: printed by the process itself if ``inside``, else the whole."""
    before = _children_cpu_ms()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    spent = _children_cpu_ms() - before
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1]) if inside else spent


def spread(values: Sequence[float], sign: str = "") -> str:
    low, _, high = (
        statistics.quantiles(values, n=4, method="inclusive")
        if len(values) > 1
        else [values[0]] * 3
    )
    return (
        f"{statistics.median(values):{sign}.1f} [{min(values):{sign}.1f} to "
        f"{max(values):{sign}.1f}], quartiles {low:{sign}.1f} to {high:{sign}.1f}"
    )


def jobs(
    checkouts: dict[str, Path], work: Path, env_file: Path, no_bytecode: bool
) -> dict[tuple[str, str], tuple[list[str], Path, bool]]:
    """(row, checkout) -> (command, folder to run it in, timed inside)."""
    empty = work / "empty"
    empty.mkdir()
    found: dict[tuple[str, str], tuple[list[str], Path, bool]] = {}
    for label, folder in checkouts.items():
        python, command = str(folder / ".venv/bin/python"), str(folder / ".venv/bin/mlauth")
        subprocess.run([python, "-m", "compileall", "-q", str(folder / "mlauth")], check=True)
        found["import", label] = ([python, "-c", TIMED_IMPORT], empty, True)
        found["python -c", label] = ([python, "-c", "import mlauth"], empty, False)
        run_it = [command, "run", "--env", str(env_file), "--", python, "-c", "pass"]
        found["mlauth run", label] = (run_it, empty, False)
        if no_bytecode:
            # Found first through sys.path[0] (the folder a `python -c` runs in).
            copy = work / f"source-{len(found)}"
            shutil.copytree(
                folder / "mlauth", copy / "mlauth", ignore=shutil.ignore_patterns("__pycache__")
            )
            found["import, no bytecode", label] = ([python, "-c", TIMED_IMPORT], copy, True)
    return found


def measure(checkouts: dict[str, Path], runs: int, no_bytecode: bool) -> str:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    with tempfile.TemporaryDirectory() as tmp, FakeMercadoLibre() as fake:
        env_file = Path(tmp) / ".env"
        fake.write_env(env_file)
        todo = jobs(checkouts, Path(tmp), env_file, no_bytecode)
        for command, cwd, inside in todo.values():  # warm the page cache; check each works
            run(command, cwd, env, inside)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in todo}
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        load = Path("/proc/loadavg").read_text().split()[0]
        for _ in range(runs):
            order = list(todo)
            random.shuffle(order)
            for key in order:
                command, cwd, inside = todo[key]
                times[key].append(run(command, cwd, env, inside))
    lines = [f"{runs} rounds from {started} UTC, load average {load} before"]
    labels = list(checkouts)
    for row in dict.fromkeys(key[0] for key in times):
        for label in labels:
            lines.append(f"{row:20} {label:10} {spread(times[row, label])}")
        for i, first in enumerate(labels):
            for label in labels[i + 1 :]:
                pairs = zip(times[row, first], times[row, label], strict=True)
                paired = [b - a for a, b in pairs]
                lines.append(f"{row:20} {label} - {first}: {spread(paired, '+')}")
    return "\n".join(lines)


def checkout(text: str) -> tuple[str, Path]:
    label, equals, folder = text.partition("=")
    path = Path(folder).resolve()
    if not equals or not label or not (path / ".venv/bin/mlauth").exists():
        raise argparse.ArgumentTypeError(
            f"{text!r}: give LABEL=FOLDER, a clone with its own make .venv/.installed"
        )
    return label, path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds (default 15)")
    parser.add_argument(
        "--checkout", type=checkout, action="append", help="LABEL=FOLDER (default: this one)"
    )
    parser.add_argument("--no-bytecode", action="store_true", help="add rows without .pyc")
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    checkouts = dict(args.checkout or [("this", here)])
    print(measure(checkouts, max(args.runs, 1), args.no_bytecode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
