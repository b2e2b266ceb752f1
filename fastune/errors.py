"""Exceptions for bad user input.

The CLI prints a ``FastuneError`` as one line, ``error: <message>``, and exits
with status 2, as it does an OS error the user can fix (a full disk, a read-only
or misplaced output folder: see ``user_error_line``); any other exception is a
bug and keeps its traceback. So raise a
``FastuneError`` (or a subclass) exactly when the user can fix the problem,
and make the message name the file and the key or row.
"""

from __future__ import annotations


class FastuneError(Exception):
    """A problem with the user's input (file, key, value), printed without a traceback."""


class ConfigError(FastuneError, ValueError):
    """A config fastune cannot use: a YAML recipe, a command-line override, or a model config.json."""


# OS errors the user fixes (free space, a path, permissions), not bugs: shown as one line.
_USER_ERRNOS = {"ENOSPC", "EDQUOT", "EFBIG", "ENOTDIR", "EISDIR", "EROFS", "EACCES", "EPERM", "EEXIST",
                "ENAMETOOLONG", "ENOENT"}


def user_error_line(error: BaseException) -> str | None:
    """The one line to show for ``error`` when the user can fix it, else None (a bug).

    A ``FastuneError`` is its message; an ``OSError`` such as a full disk, a path under
    a regular file, a read-only filesystem or a denied permission names the path.
    """
    import errno
    import os

    if isinstance(error, FastuneError):
        return str(error)
    if isinstance(error, OSError) and errno.errorcode.get(error.errno or -1) in _USER_ERRNOS:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        reason = error.strerror or str(error)
        hint = {"ENOSPC": "; free some space", "EDQUOT": "; free some space",
                "EROFS": "; choose a writable folder", "EACCES": "; choose a folder you may write to",
                "ENOTDIR": "; a part of the path is a file"}.get(errno.errorcode[error.errno], "")
        if error.errno == errno.EEXIST and error.filename and os.path.isfile(error.filename):
            hint = "; a part of the path is a file"
        return f"{paths}: {reason}{hint}" if paths else f"{reason}{hint}"
    return None
