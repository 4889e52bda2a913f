"""Outputs appear whole or not at all: write into a temporary sibling directory, then :func:`replace_dir`."""

from __future__ import annotations

import shutil
from pathlib import Path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete ``tmp`` directory to ``final``, replacing an existing one.

    An existing ``final`` is first renamed aside (``.NAME.old``) and only then deleted, so at every moment either
    the old or the new directory is complete under its name (a crash leaves at worst a ``.old`` leftover).
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
