"""Which source files are the program's own, where a refresh function is looked for by name.

A file is the program's own unless it lies under

- the standard library: sysconfig's ``stdlib`` and ``platstdlib``;
- installed packages: sysconfig's ``purelib`` and ``platlib`` (the virtualenv's own
  site-packages, in one), :func:`site.getsitepackages` (a virtualenv's base with
  ``--system-site-packages``), the user site-packages, and any folder named
  ``site-packages`` or ``dist-packages`` (Debian's, a ``pip --target`` folder, another
  environment's on ``PYTHONPATH``);
- mlauth itself.

So the script, the modules beside it, a package run with ``-m``, a package installed with
``pip install -e`` (its files stay in the project) and folders put on ``PYTHONPATH`` are the
program's own; a library installed with pip is not, whatever its functions are called. Paths
are compared after resolving symbolic links.
"""

from __future__ import annotations

import os
import site
import sysconfig

__all__ = ["OwnFiles"]

PACKAGE_FOLDERS = frozenset({"site-packages", "dist-packages"})
MLAUTH = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    # Both can be missing from a site.py that an embedding or an old virtualenv replaced.
    roots.update(getattr(site, "getsitepackages", list)())
    user = getattr(site, "getusersitepackages", lambda: None)()
    if isinstance(user, str):
        roots.add(user)
    roots.add(MLAUTH)
    return tuple(sorted(os.path.join(os.path.realpath(root), "") for root in roots if root))


class OwnFiles:
    """Answers "is this file the program's own?", once per folder."""

    def __init__(self) -> None:
        self._roots = _library_roots()
        self._folders: dict[str, bool] = {}

    def __contains__(self, filename: object) -> bool:
        if not isinstance(filename, str) or not filename:
            return False
        folder = os.path.dirname(os.path.abspath(filename))
        own = self._folders.get(folder)
        if own is None:
            real = os.path.join(os.path.realpath(folder), "")
            own = not real.startswith(self._roots) and not (
                PACKAGE_FOLDERS & set(real.split(os.sep))
            )
            self._folders[folder] = own
        return own
