"""Writing results safely: an output checked before any work, a file or a folder written all or nothing."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from splitprune.errors import UserError


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


def check_out_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse a folder that cannot be created or written, before any work; leaves nothing behind."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    created = []
    try:
        for missing in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
            missing.mkdir()
            created.append(missing)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written: {exc.strerror or exc}") from None
    finally:
        for made in reversed(created):
            made.rmdir()
    return folder


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    check_out_folder(file.parent, flag)
    return file


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
