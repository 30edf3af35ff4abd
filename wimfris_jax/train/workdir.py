"""One writer per run: the lock on a training run's workdir, and the run's failed disk writes in one line.

Lock: training (``train``, hence ``wimfris train`` and ``wimfris demo``) takes an exclusive ``fcntl.flock`` on
``<workdir>/.lock`` before it creates, changes or deletes anything in the workdir -- in particular before orbax's
CheckpointManager opens, which removes unfinished saves, a live run's included -- and holds it for the run's life.
A second trainer refuses in one line (:class:`WorkdirInUse`) and touches nothing. The holder writes its pid, host
and start time into the file for that message. The lock dies with its process (exit, crash, SIGKILL), so a lock file
left behind blocks nothing; the file is never removed (removing a lock file races with a process that has just
opened it), only emptied when the run ends. Readers (eval, predict, ``load_model``) take no lock.

Multi-host runs: each process locks its own file, ``.lock`` for process 0 and ``.lock.<i>`` for process i, so a
second run refuses on every host whether the hosts share the workdir's file system or each has its own. Within one
process the lock is re-entrant for the thread that holds it (``wimfris demo`` holds it around ``train``); another
thread is refused like another process. Children forked without exec (multiprocessing's "fork") share the lock
until they end. On a file system without flock the run goes on unlocked, with a :class:`WorkdirLockWarning`.

Disk trouble: a write into the workdir that fails for lack of space or quota, a file size limit, a read-only file
system or a denied permission (:func:`write_failure`) ends training with one :class:`WorkdirWriteError` naming the
workdir, the reason and the last good checkpoint. Orbax reports a failed asynchronous save from its threads through
the logging module, dozens of tracebacks per save: :class:`WriteFailures` drops those records while training and
keeps the first failure, for the loop to raise at its next step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from wimfris_jax.errors import UserError

LOCK_NAME = ".lock"
# errno of a failed write: no space, file too large (ulimit -f), quota, read-only file system, no permission
WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_PERMISSION = (errno.EACCES, errno.EPERM)  # also raised by reads: counted only for a path in the workdir

_held: dict[str, list[Any]] = {}  # lock file -> [fd, holding thread's ident, depth]: the locks of this process
_held_guard = threading.Lock()


class WorkdirInUse(UserError, BlockingIOError):
    """Another training run holds the workdir's lock; the message names the workdir and that run."""


class WorkdirLockWarning(UserWarning):
    """The workdir's file system cannot lock files: nothing keeps a second run out of it."""


class WorkdirWriteError(UserError, OSError):
    """Training could not write into its workdir (disk full, file size limit, read-only, no permission)."""


def lock_path(workdir: str | os.PathLike, process_index: int = 0) -> str:
    """The lock file of process ``process_index`` of a run in ``workdir`` (module docstring)."""
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
    return os.path.join(os.path.abspath(os.fspath(workdir)), name)


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike, process_index: int = 0) -> Iterator[str]:
    """Holds the lock of ``workdir`` (created if missing) for the ``with`` block; yields the lock file's path.

    Raises :class:`WorkdirInUse` at once, having changed nothing, when another run (or thread) holds it.
    """
    path = lock_path(workdir, process_index)
    with _held_guard:
        held = _held.get(path)
        mine = held is not None and held[1] == threading.get_ident()
        if mine:
            held[2] += 1
    if mine:
        try:
            yield path
        finally:
            with _held_guard:
                held[2] -= 1
        return
    fd = _acquire(path)
    with _held_guard:
        _held[path] = [fd, threading.get_ident(), 1]
    try:
        yield path
    finally:
        with _held_guard:
            del _held[path]
        _release(fd)


def _acquire(path: str) -> int:
    """Opens ``path`` and locks it, or raises :class:`WorkdirInUse` (the file unchanged); returns the descriptor."""
    workdir = os.path.dirname(path)
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # an existing file is not changed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise WorkdirInUse(
            f"{workdir} is in use by another training run ({holder}); wait for it to end or use another --workdir"
        ) from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a file system without locks
        warnings.warn(f"cannot lock {path} ({e.strerror or e}): nothing keeps a second training run out of "
                      f"{workdir}", WorkdirLockWarning, stacklevel=4)  # fmt: skip
        return fd
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, the message lacks its holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # the holder's details, read only while the lock is held, would mislead a reader
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _holder(fd: int) -> str:
    """The holder's "pid 1234 on host X since 2026-12-04 18:00:00", read twice (the holder may be writing it)."""
    for attempt in range(2):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            pid, host, since = int(info["pid"]), str(info["host"]), str(info["since"])
            break
        except (OSError, ValueError, TypeError, KeyError):
            if attempt == 0:
                time.sleep(0.2)
    else:
        return "its process is unknown"
    ended = ""
    if host == socket.gethostname() and not _alive(pid):  # a child it forked still holds the lock
        ended = " (ended; a process it started still holds the lock)"
    return f"pid {pid}{ended} on host {host} since {since}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- failed writes -----------------------------------------------------------------------------------------------
def write_failure(error: BaseException | None, workdir: str) -> str | None:
    """The reason (``os.strerror``, e.g. "No space left on device") when ``error``, or an exception it was raised
    from, is a write into ``workdir`` that failed for a reason in :data:`WRITE_ERRNOS`; else None.

    Orbax and TensorStore wrap the OS error in ``ValueError`` / ``Exception`` whose message carries
    ``[os_error_code='28']`` or the ``strerror``; a denied permission counts only when it names a path in
    ``workdir`` (reads elsewhere, e.g. of the data, raise it too)."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:  # judged by its number and file name, not its text
            named = e.filename is not None and _inside(e.filename, workdir)
            if e.errno in WRITE_ERRNOS and (e.errno not in _PERMISSION or named):
                return os.strerror(e.errno)
        elif reason := _reason_in_text(str(e), workdir):
            return reason
        stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return None


def _inside(path: Any, folder: str) -> bool:
    """Whether the file name ``path`` of an OSError (str, bytes or a descriptor number) lies in ``folder``."""
    try:
        return os.path.commonpath([os.path.abspath(os.fsdecode(path)), folder]) == folder
    except (TypeError, ValueError):
        return False


def _reason_in_text(text: str, workdir: str) -> str | None:
    """The reason of a failed write that a message names (TensorStore: "... File too large [os_error_code='27']")."""
    code = re.search(r"os_error_code='?(\d+)", text)
    codes = [int(code.group(1))] if code else [c for c in WRITE_ERRNOS if os.strerror(c) in text]
    named = re.search(re.escape(workdir) + r"(?![^/'\"\s:])", text) is not None  # the workdir or a path in it
    for c in codes:
        if c in WRITE_ERRNOS and (c not in _PERMISSION or named):
            return os.strerror(c)
    return None


class WriteFailures(logging.Filter):
    """Context manager: while active, drops the records of the orbax ("absl") and asyncio loggers that report a
    failed write into ``workdir`` (:func:`write_failure`) and keeps the first such exception; :meth:`check` raises
    it (an asynchronous save fails in orbax's thread, which logs it, long before ``wait_until_finished``)."""

    LOGGERS = ("absl", "asyncio")

    def __init__(self, workdir: str):
        super().__init__()
        self.workdir = workdir
        self.first: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record with bad arguments: judged by its exception alone
            text = ""
        reason = write_failure(error, self.workdir) or _reason_in_text(text, self.workdir)
        if reason is None:
            return True
        if self.first is None:
            code = next(c for c in WRITE_ERRNOS if os.strerror(c) == reason)
            self.first = error if error is not None else OSError(code, reason)
        return False

    def check(self) -> None:
        """Raises the first failed write seen in the logs, if any."""
        if self.first is not None:
            raise self.first

    def __enter__(self) -> WriteFailures:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)
