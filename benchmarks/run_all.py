"""``make bench``: every benchmark at full size, then the figures into ``BENCHMARKS.md``.

Each script runs as its own process (exactly the command recorded in BENCHMARKS.md), writes
its table, JSON and plots to ``benchmarks/results/``; then the blocks between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in BENCHMARKS.md are replaced with the
new tables, the machine and the load. The prose around them is not touched: read it again
after a run on another machine.

    python -m benchmarks.run_all
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from benchmarks.common import RESULTS, machine

ROOT = Path(__file__).resolve().parent.parent

FULL: dict[str, list[str]] = {
    "overhead": ["--rounds", "40", "--calls", "2000"],
    "storm": ["--processes", "4", "--threads", "4", "--seconds", "20", "--token-lifetime", "4"],
    "scale": ["--processes", "1,2,4,8,16,32,64", "--seconds", "8", "--token-lifetime", "3"],
    # httpx (issue 12): the same questions for httpx.Client and httpx.AsyncClient.
    "httpx_overhead": ["--rounds", "30", "--calls", "1000"],
    "async_storm": [
        "--processes",
        "4",
        "--tasks",
        "24",
        "--seconds",
        "20",
        "--token-lifetime",
        "4",
    ],
    "loop_lag": ["--repeats", "5", "--token-delay", "1.0"],
    # Many sellers (issue 20): its own PostgreSQL and redis-server, started by the script.
    "sellers_storm": ["--sellers", "1000", "--processes", "8", "--threads", "4", "--seconds", "30"],
    "sellers_scale": ["--sellers", "10000"],
}


def command(name: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", f"benchmarks.{name}", *args]


def shown(name: str, args: Sequence[str]) -> str:
    """The command as a reader types it from the repository root, with the venv active."""
    return shlex.join(["python", "-m", f"benchmarks.{name}", *args])


def replace_block(doc: str, name: str, body: str) -> str:
    """``doc`` with the text between the ``bench:name`` markers replaced by ``body``."""
    pattern = re.compile(
        rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S
    )
    if not pattern.search(doc):
        raise ValueError(f"BENCHMARKS.md has no <!-- bench:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), doc)


def machine_block(info: Mapping[str, object], load_before: str, runs: Mapping[str, str]) -> str:
    versions = info["versions"]
    assert isinstance(versions, dict)
    lines = [
        f"- date: {info['date_utc']}",
        f"- machine: {info['nproc']} cores, {info['cpu']}, {info['platform']}",
        f"- Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- load before the run: {load_before}; after: "
        + " ".join(str(x) for x in info["load_average"]),  # type: ignore[attr-defined]
        "- commands (from the repository root, venv active; `make bench` runs them all):",
        "",
        "```sh",
        *runs.values(),
        "```",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__)
    parser.add_argument("--doc", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--only", default=",".join(FULL), help="comma-separated scripts")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs = {name: shown(name, FULL[name]) for name in FULL}
    for name in names:
        print(f"$ {runs[name]}", flush=True)
        subprocess.run(command(name, FULL[name]), check=True, cwd=ROOT)
    doc = args.doc.read_text()
    for name in FULL:
        table = (RESULTS / f"{name}.md").read_text()
        doc = replace_block(doc, name, table.replace("](scale_", "](benchmarks/results/scale_"))
    info = machine()
    doc = replace_block(doc, "machine", machine_block(info, load_before, runs))
    args.doc.write_text(doc)
    (RESULTS / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
