"""Stopping a training run by signal: Ctrl-C (SIGINT) and SIGTERM (what schedulers and preemption send).

Both are handled alike by :class:`StopSignals`: the first one only sets a flag; the training loop sees it after the
step in flight, saves a checkpoint (or lets the save in flight finish) and raises :class:`TrainingInterrupted`, a
``KeyboardInterrupt`` whose message says where the run stopped and whose ``exit_status`` is the shell's convention
for a process ended by that signal (128 + 2 = 130 for Ctrl-C, 128 + 15 = 143 for SIGTERM). A second signal of either
kind interrupts at once. A signal ignored when training starts (``SIG_IGN``: background jobs, nohup, some CI
runners ignore SIGINT) stays ignored. A run of several processes stops at a step they agree on
(:mod:`~wimfris_jax.train.hosts`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_VERB = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by ``signum``; the message (default "terminated (SIGTERM)") says where and what was saved.

    ``orderly``: raised between steps (where every process of a multi-process run stops together), not at once by a
    second signal."""

    def __init__(self, signum: int, message: str = "", *, orderly: bool = False):
        super().__init__(message or describe(signum))
        self.signum = int(signum)
        self.orderly = bool(orderly)

    @property
    def exit_status(self) -> int:
        """128 + the signal number: the exit status a shell reports for a process that signal ended."""
        return 128 + self.signum


def describe(signum: int) -> str:
    """ "interrupted (SIGINT)", "terminated (SIGTERM)": what the signal did, for messages."""
    name = signal.Signals(signum).name
    return f"{_VERB.get(signum, 'stopped')} ({name})"


class StopSignals:
    """Context manager turning the first SIGINT or SIGTERM into a flag (``signum``; :meth:`check` raises it as a
    :class:`TrainingInterrupted`); a second one, of either kind, raises :class:`TrainingInterrupted` at once.

    On exit it restores the handlers that were in place on entry, whatever they were (a Python function,
    ``signal.default_int_handler``, ``SIG_DFL``). It installs nothing for a signal ignored on entry (``SIG_IGN``: it
    keeps being ignored, and the run goes on and ends normally), nor for one whose handler was installed outside
    Python (it could not be put back), nor outside the main thread. ``on_first(signum)``, if given, runs in the
    handler of the first signal (a multi-process run forwards it to JAX's preemption notifier).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, on_first: Callable[[int], None] | None = None):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self.on_first = on_first
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        """Whether a stop signal arrived."""
        return self.signum is not None

    def check(self) -> None:
        """Raises :class:`TrainingInterrupted` if a stop signal arrived."""
        if self.signum is not None:
            raise TrainingInterrupted(self.signum, orderly=True)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(signum)
        self.signum = signum
        if self.on_first is not None:
            self.on_first(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                previous = signal.getsignal(sig)
                if previous is not None and previous != signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
