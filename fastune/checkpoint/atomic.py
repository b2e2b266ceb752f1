"""Write a directory so that readers see either the old one or the complete new one.

A checkpoint is many files. Writing them in place means a crash (or a full
disk, or a kill during a long save) leaves a directory that looks like a
checkpoint but holds half of one, and resume would pick it up. Instead the
files go into a hidden sibling folder (same filesystem, so renames are
atomic), are flushed to disk, and the folder is renamed into place.

A kill leaves such hidden folders behind (``.NAME.tmp-PID-…``, ``.NAME.old-PID-…``,
``.NAME.trash-PID-…``): ``sweep_debris`` removes those of processes that no longer
run, at the start of the next run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

# .NAME.tmp-PID-HEX, .NAME.old-PID-HEX, .NAME.trash-PID-HEX (and the doubled-dot names of
# nested writes by older versions, ..NAME.tmp-PID-HEX.old-PID-HEX).
_DEBRIS = re.compile(r"\.(.+)\.(tmp|old|trash)-(\d+)-[0-9a-f]{8}")
_active: set[Path] = set()  # temporary folders of the atomic writes in progress in this process


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it replaces ``dest``.

    On an exception the temporary folder is deleted and ``dest`` is left as it
    was. An existing ``dest`` is first renamed aside and deleted only after the
    new folder is in place, so at every instant ``dest`` is absent, old or new,
    never partial.
    """
    dest = Path(dest)
    if any(dest.absolute().is_relative_to(outer) for outer in _active):
        # Inside another atomic write (the HF writer called into a checkpoint's temporary
        # folder): that write already makes the whole folder appear at once.
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        yield dest
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dest, "tmp")
    tmp.mkdir()  # plain mkdir, not mkdtemp: keeps the umask's permissions (mkdtemp gives 0700)
    _active.add(tmp.absolute())
    try:
        yield tmp
        _crash_test_window()
        _fsync_tree(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _active.discard(tmp.absolute())


def remove_directory(path: Path) -> None:
    """Delete folder ``path`` so that a kill midway leaves no half of it under its name:
    it is renamed to a hidden trash name first (swept by ``sweep_debris``), then deleted."""
    trash = _sibling(Path(path), "trash")
    os.replace(path, trash)
    _crash_test_window()
    shutil.rmtree(trash)


def _crash_test_window() -> None:
    """``FASTUNE_CRASH_TEST_DELAY=SECONDS`` widens the moments a kill hurts most (a full
    temporary folder, a checkpoint in the trash) for the crash trials
    (``benchmarks/crash_trials.py``); unset, it does nothing."""
    delay = os.environ.get("FASTUNE_CRASH_TEST_DELAY")
    if delay:
        time.sleep(float(delay))


def sweep_debris(folder: Path) -> list[Path]:
    """Remove the hidden temporary, replaced and trashed folders in ``folder`` whose
    process no longer runs (a kill during a save or a deletion); return them. A replaced
    folder whose successor never took its name (a kill between the two renames) is put
    back instead."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for path in entries:
        match = _DEBRIS.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink() or _running(int(match.group(3))):
            continue
        name, kind = match.group(1), match.group(2)
        original = path.parent / name
        if kind == "old" and not name.startswith(".") and not original.exists():
            os.replace(path, original)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
