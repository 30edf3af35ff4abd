"""The error a user can cause: bad input, named in one line.

Every error raised for bad input -- a missing or damaged file, a config key that does not exist, a checkpoint that
does not fit, an image that cannot be read -- is a :class:`UserError` (most also derive from ``ValueError`` or
``FileNotFoundError``, so callers may catch those). The command-line tools print a ``UserError`` as one line and
exit with status 1; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input; the message names the file, key, step or value at fault."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """``"<type>: <first line of the message>"`` of a third-party exception (a TensorStore spec cut off), at most
    ``limit`` characters: the reason quoted in a one-line :class:`UserError`."""
    lines = str(error).strip().splitlines()
    text = (lines[0] if lines else "").split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
