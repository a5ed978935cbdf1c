"""A module named with ``--redirect`` that the program does not have (``pipline`` for
``pipeline``) is named in a WARNING with the fix, never imported early, and a module the
program does have says nothing, however late it is imported (real ``mlauth run`` processes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mlauth.integrations.redirect import absent
from tests.redirect_support import mlauth_run, run_program

pytestmark = pytest.mark.processes

# The legacy module: says on stderr when its code runs, and whether its function was
# redirected (mlauth's replacement keeps the original as __wrapped__).
PIPELINE = """\
import os, sys
print("PIPELINE IMPORTED", flush=True, file=sys.stderr)
if os.environ.get("MARKER"):
    open(os.environ["MARKER"], "w").close()


def refresh_token(force=False):
    return "legacy"
"""

MAIN_IMPORTS_AT_ONCE = """\
import pipeline
print("redirected", hasattr(pipeline.refresh_token, "__wrapped__"))
"""

MAIN_IMPORTS_LATE = """\
def main():
    import pipeline  # late: inside a function, after the program has run a while
    print("redirected", hasattr(pipeline.refresh_token, "__wrapped__"))


main()
"""

# The module lives in lib/, which the program puts on sys.path itself before importing it.
MAIN_EXTENDS_PATH = """\
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
import pipeline
print("redirected", hasattr(pipeline.refresh_token, "__wrapped__"))
"""


def warnings(err: str, module: str) -> list[str]:
    return [line for line in err.splitlines() if "WARNING" in line and f"{module}:" in line]


def run(folder: Path, env: Path, argv: list[str], *options: str) -> tuple[int, str, str]:
    environ = dict(os.environ, MARKER=str(folder / "imported.marker"))
    return run_program(argv, folder, environ, mlauth_run(env, *options))


def test_a_misspelt_module_is_named_with_the_fix_before_the_module_runs(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(MAIN_IMPORTS_AT_ONCE)
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipline:refresh_token")
    assert code == 0, err
    assert out == "redirected False\n"  # as asked: there is no pipline
    warned = warnings(err, "pipline")
    assert len(warned) == 1, err
    assert "no module pipline can be found" in warned[0], warned
    assert "--redirect pipeline:refresh_token?" in warned[0], warned
    # Said before the legacy module's code (and its refresh) could run.
    lines = err.splitlines()
    assert lines.index(warned[0]) < lines.index("PIPELINE IMPORTED"), err


def test_a_misspelt_script_name_is_warned_about_at_start(fake_ml_env: Path, tmp_path: Path) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE + "\nprint('SCRIPT RAN')\n")
    code, out, err = run(
        tmp_path, fake_ml_env, ["pipeline.py"], "--redirect", "pipline:refresh_token"
    )
    assert code == 0, err
    assert out == "SCRIPT RAN\n", err
    warned = warnings(err, "pipline")
    assert len(warned) == 1, err
    assert "--redirect pipeline:refresh_token?" in warned[0], warned
    lines = err.splitlines()
    assert lines.index(warned[0]) < lines.index("PIPELINE IMPORTED"), err


def test_a_module_named_by_its_last_part_under_python_m_is_given_its_full_name(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "main2.py").write_text(PIPELINE)
    code, _, err = run(
        tmp_path, fake_ml_env, ["-m", "pkg.main2"], "--redirect", "main2:refresh_token"
    )
    assert code == 0, err
    warned = warnings(err, "main2")
    assert len(warned) == 1, err
    assert "--redirect pkg.main2:refresh_token?" in warned[0], warned


def test_a_module_never_imported_and_not_found_is_named_at_exit(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "main2.py").write_text("print('done', flush=True)\n")
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--redirect", "nothere:refresh_token")
    assert (code, out) == (0, "done\n"), err
    warned = warnings(err, "nothere")
    assert len(warned) == 1, err
    assert "the program never imported it" in warned[0], warned
    assert "Correct the module given to --redirect" in warned[0], warned


@pytest.mark.parametrize(
    ("layout", "main"),
    [("beside", MAIN_IMPORTS_LATE), ("beside", MAIN_IMPORTS_AT_ONCE), ("lib", MAIN_EXTENDS_PATH)],
)
def test_a_module_the_program_has_says_nothing_and_is_not_imported_early(
    fake_ml_env: Path, tmp_path: Path, layout: str, main: str
) -> None:
    folder = tmp_path / "lib" if layout == "lib" else tmp_path
    folder.mkdir(exist_ok=True)
    (folder / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(main)
    code, out, err = run(
        tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipeline:refresh_token"
    )
    assert code == 0, err
    assert out == "redirected True\n", err
    assert "WARNING" not in err, err
    assert err.splitlines().count("PIPELINE IMPORTED") == 1, err  # imported by the program only


def test_a_named_module_the_program_never_imports_is_never_imported(
    fake_ml_env: Path, tmp_path: Path
) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text("print('done')\n")
    code, out, err = run(
        tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipeline:refresh_token"
    )
    assert (code, out) == (0, "done\n"), err
    assert not (tmp_path / "imported.marker").exists()  # its side effects never ran
    assert "PIPELINE IMPORTED" not in err and "WARNING" not in err, err


def test_no_redirect_says_nothing(fake_ml_env: Path, tmp_path: Path) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(MAIN_IMPORTS_AT_ONCE)
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--no-redirect")
    assert (code, out) == (0, "redirected False\n"), err
    assert "WARNING" not in err, err


def test_spawned_workers_do_not_repeat_the_warning(fake_ml_env: Path, tmp_path: Path) -> None:
    (tmp_path / "pipeline.py").write_text(PIPELINE)
    (tmp_path / "main2.py").write_text(
        "import multiprocessing\n\n\n"
        "def work(_):\n"
        "    import pipeline\n"
        "    return pipeline.refresh_token()\n\n\n"
        "if __name__ == '__main__':\n"
        "    with multiprocessing.get_context('spawn').Pool(2) as pool:\n"
        "        print(pool.map(work, range(2)))\n"
        "    import pipeline\n"
    )
    code, out, err = run(tmp_path, fake_ml_env, ["main2.py"], "--redirect", "pipline:refresh_token")
    assert (code, out) == (0, "['legacy', 'legacy']\n"), err
    assert len(warnings(err, "pipline")) == 1, err


def test_lookalikes_prefer_close_spellings_then_the_same_last_part() -> None:
    modules = ["pipeline", "pkg.main2", "main3", "requests_helpers", "other.pipeline"]
    assert absent.lookalikes("pipline", modules)[0] == "pipeline"
    assert "pkg.main2" in absent.lookalikes("main2", modules)
    assert absent.lookalikes("zzz", modules) == []


def test_findable_imports_nothing(tmp_path: Path) -> None:
    package = tmp_path / "sidefx_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported!')\n")
    (package / "inner.py").write_text("raise RuntimeError('imported!')\n")
    folders = [str(tmp_path)]
    assert absent.findable("sidefx_pkg", folders)
    assert not absent.findable("sidefx_pkgg", folders)
    assert absent.findable("sidefx_pkg.inner", folders)  # in the folder the parent's spec names
    assert not absent.findable("sidefx_pkg.other", folders)
    assert not absent.findable("sidefx_pkg", [])  # not on sys.path
    assert "sidefx_pkg" not in sys.modules and "sidefx_pkg.inner" not in sys.modules
