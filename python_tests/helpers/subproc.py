"""Environment for test subprocesses: they import the lengen_fast this test process imported.

In a checkout that is the source tree (with its in-place _C); under CI's installed wheel it is site-packages.
Putting the checkout first instead would make a subprocess import the source tree without the compiled
extension (CI's Quickstart installs the wheel, not an in-place build). PYTHONSAFEPATH=1 (Python >= 3.11) keeps
``python -c`` / ``-m`` from putting the working directory (pytest's: the checkout) ahead of it."""
from __future__ import annotations

import os
from pathlib import Path

import lengen_fast

PKG_PARENT = str(Path(lengen_fast.__file__).resolve().parents[1])


def pkg_env(**extra: str) -> dict[str, str]:
    """os.environ with PKG_PARENT first on PYTHONPATH, plus ``extra``."""
    path = os.pathsep.join(p for p in (PKG_PARENT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1", **extra}
