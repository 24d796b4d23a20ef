"""Writing a folder all or nothing."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def replace_folder(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh `folder.tmp` with `fill(tmp)`, then swap it in for `folder`: a reader sees the old folder or
    the new one, never a half-written one (a crash between the two renames leaves `folder.old`)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
