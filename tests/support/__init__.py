"""What the tests share, each module named for what it holds: the fake credentials and the
``.env`` text every unit test starts from, the ``mlauth`` command run as a process, process
storms and kills, bind mounts and tmpfs, legacy pipelines, hostile answers, the fuzz
strategies, where secrets could leak (and a Sentry client set up alike on either major),
and the doc-block runner.

Test modules import their helpers from here, never from one another; ``conftest.py`` holds
only fixtures. Programs the tests run as processes of their own, by path, are in
:data:`SCRIPTS` (a folder, not a package: each runs with its own folder first on
``sys.path``, where no helper module can shadow a library).
"""

from __future__ import annotations

from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "scripts"
