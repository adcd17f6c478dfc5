"""Putting a finished artifact folder in place so that a reader finds the old artifact or the new one, never a mix.

An export or a lossy copy is written and checked in a temporary folder first; until 2026-12-07 it then deleted the
old folder and copied the new one in, so a failure in between (a full disk, a killed process) left no artifact or
half of one where a replica or serve.sh would load it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def publish(finished: str | Path, out: str | Path) -> None:
    """Copies the folder ``finished`` to ``out``, replacing whatever ``out`` held.

    The copy goes to a hidden sibling of ``out`` (the same file system), then two renames swap it in (rename(2) of
    a folder is atomic) and the old folder is deleted last. If the copy fails, ``out`` is left as it was and the
    partial copy is removed. Between the two renames ``out`` is absent for a moment: a reader then gets
    FileNotFoundError, not a mix of old and new files.

    Raises:
        OSError: from the copy (``out`` untouched) or from the renames (the old folder is put back if it can be).
    """
    finished, out = Path(finished), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    old = staging.with_name(staging.name.replace(".new-", ".old-", 1))  # unique as staging is
    try:
        shutil.copytree(finished, staging, dirs_exist_ok=True)
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            if old.exists():
                os.rename(old, out)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old.exists():
        shutil.rmtree(old)
