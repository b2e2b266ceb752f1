"""Write a directory so that readers see either the old one or the complete new one.

A checkpoint is many files. Writing them in place means a crash (or a full
disk, or a kill during a long save) leaves a directory that looks like a
checkpoint but holds half of one, and resume would pick it up. Instead the
files go into a hidden sibling folder (same filesystem, so renames are
atomic), are flushed to disk, and the folder is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it replaces ``dest``.

    On an exception the temporary folder is deleted and ``dest`` is left as it
    was. An existing ``dest`` is first renamed aside and deleted only after the
    new folder is in place, so at every instant ``dest`` is absent, old or new,
    never partial.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "tmp")
    tmp.mkdir()  # plain mkdir, not mkdtemp: keeps the umask's permissions (mkdtemp gives 0700)
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sibling(dest: Path, tag: str) -> Path:
    return dest.parent / f".{dest.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _swap_into_place(tmp: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = _sibling(dest, "old")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename, or a power cut could leave the
    renamed folder holding empty or short files."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
