"""CHANGELOG.md stays a list a user can scan: Keep a Changelog sections, one or two lines per
change, links that resolve. How things work belongs in docs/, the design in docs/design.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHANGELOG = ROOT / "CHANGELOG.md"
SECTIONS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
MAX_ENTRY_LINES = 2
MAX_LINE = 100


def entries() -> list[list[str]]:
    """Each bullet with its continuation lines."""
    found: list[list[str]] = []
    for line in CHANGELOG.read_text().splitlines():
        if line.startswith("- "):
            found.append([line])
        elif line.startswith("  ") and found:
            found[-1].append(line)
        elif not line.strip() and found and found[-1][-1] != "":
            found[-1].append("")
    return [[line for line in entry if line] for entry in found]


def test_every_section_is_a_keep_a_changelog_one() -> None:
    text = CHANGELOG.read_text()
    versions = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert versions and versions[0] == "[Unreleased]"
    sections = re.findall(r"^### (.+)$", text, flags=re.MULTILINE)
    assert sections and set(sections) <= SECTIONS, sections


def test_every_entry_is_one_or_two_lines() -> None:
    found = entries()
    assert len(found) > 10
    long = [entry[0] for entry in found if len(entry) > MAX_ENTRY_LINES]
    assert not long, f"entries over {MAX_ENTRY_LINES} lines (move the detail to docs/): {long}"
    wide = [line for entry in found for line in entry if len(line) > MAX_LINE]
    assert not wide, wide


def test_every_relative_link_resolves() -> None:
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", CHANGELOG.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path = target.partition("#")[0]
        assert (ROOT / path).is_file(), f"CHANGELOG.md: {target} names no file"
