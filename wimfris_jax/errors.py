"""The error a user can cause: bad input, named in one line.

Every error raised for bad input -- a missing or damaged file, a config key that does not exist, a checkpoint that
does not fit, an image that cannot be read -- is a :class:`UserError` (most also derive from ``ValueError`` or
``FileNotFoundError``, so callers may catch those). The command-line tools print a ``UserError`` as one line and
exit with status 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input; the message names the file, key, step or value at fault."""


class ConfigError(UserError, ValueError):
    """A bad config file, config value, --set / --config.KEY override or --init argument."""


def is_user_error(error: BaseException) -> bool:
    """The command-line policy (``wimfris`` and ``python -m port_weights``): whether ``error`` is bad input, reported in
    one line, rather than a bug, shown with its traceback. By type: a :class:`UserError`; an ``OSError`` naming a
    file (PermissionError, IsADirectoryError, ...); a FileNotFoundError / FileExistsError, which this package raises
    with a message naming the file."""
    if isinstance(error, UserError):
        return True
    return isinstance(error, OSError) and (
        error.filename is not None or isinstance(error, (FileNotFoundError, FileExistsError))
    )


def describe(error: BaseException) -> str:
    """The one-line message of a user error: its text, or ``FILE: reason`` (``SRC -> DST: reason``) for an OSError
    naming a file."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename is not None:
        names = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
        return f"{names}: {error.strerror or error}"
    return str(error)


def one_line(error: BaseException, limit: int = 200) -> str:
    """``"<type>: <first line of the message>"`` of a third-party exception (a TensorStore spec cut off), at most
    ``limit`` characters: the reason quoted in a one-line :class:`UserError`."""
    lines = str(error).strip().splitlines()
    text = (lines[0] if lines else "").split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
