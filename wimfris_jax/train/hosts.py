"""A multi-process run stops together: signals, preemption and a lost process.

Every process of a ``jax.distributed`` run must run the same steps: a process that stopped alone would leave the
others waiting in a collective (gloo's "collective mismatch", no checkpoint). So, in a run of several processes:

* SIGTERM (a scheduler's stop, a preemption notice) is caught by JAX's own preemption notifier, which
  ``jax.distributed.initialize`` installs (``jax_enable_preemption_service``, on by default, CPU included); it
  tells the coordination service, which tells every process. :meth:`StopAgreement.check`, asked before every step,
  asks ``multihost_utils.reached_preemption_sync_point(step)``: it turns true on every process at the same step
  (the largest step any process had reached, + 1), where they all save once (orbax's save is collective) and stop.
* SIGINT (Ctrl-C; a terminal sends it to every process of its foreground job) joins that path: the first one
  raises SIGTERM in its own process, for JAX's notifier. A second SIGINT stops that process at once, without
  saving (the save is collective: the others are elsewhere), and it leaves without waiting for them
  (:func:`leave`); they find it gone at their next collective.
* With the preemption service off, the processes all-gather their stop flags before every step instead.

In one process nothing changes: :class:`~wimfris_jax.train.signals.StopSignals` handles both signals.

A lost process (killed, crashed): the others' next collective fails at once ("Connection closed by peer");
:func:`lost_process_error` turns that into one :class:`ProcessLost` line, and :func:`leave` exits without JAX's
shutdown barrier (which would wait for the dead process, then abort with a C++ stack dump). A process that stops
answering without closing its connections (a host gone from the network) is declared dead by the coordination
service after the heartbeat timeout (``WIMFRIS_HEARTBEAT_TIMEOUT``, :mod:`~wimfris_jax.train.sharding`); the
others then abort (JAX's own message, status 134). If process 0, which hosts the coordination service, dies, the
others stop at once, JAX's fatal message racing this one line (status 134 or 1): JAX gives Python no way to
intercept its abort (``missed_heartbeat_callback`` is not reachable through ``jax.distributed.initialize``, and a
Python callback there fails to convert the C++ status).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from wimfris_jax.checkpoints.runs import committed_steps
from wimfris_jax.errors import UserError, one_line
from wimfris_jax.train.signals import STOP_SIGNALS, StopSignals, TrainingInterrupted

# what a collective or the coordination service says when another process is gone
LOST_MARKERS = ("gloo", "connection closed by peer", "connection reset by peer", "socket closed", "unavailable",
                "heartbeat")  # fmt: skip


class ProcessLost(UserError, RuntimeError):
    """Another process of a multi-process run is gone (killed, crashed); this one stops too."""


def distributed() -> bool:
    """Whether this process is one of a ``jax.distributed`` run."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client is not None


def _preemption_service() -> bool:
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.preemption_sync_manager is not None


def _notify_peers(signum: int) -> None:
    """The first SIGINT of a multi-process run: a SIGTERM to this process, which JAX's notifier tells every process."""
    signal.raise_signal(signal.SIGTERM)


class StopAgreement:
    """Context manager: where the training loop stops on a stop signal (module docstring).

    One process: at once, after the step in flight (:class:`StopSignals`). Several: at the step they all agree on.
    :meth:`check` raises the :class:`TrainingInterrupted` (``orderly``: every process raises it at the same step);
    a second signal raises one at once (not ``orderly``).
    """

    def __init__(self) -> None:
        self.multi = jax.process_count() > 1
        self.notifier = self.multi and _preemption_service()
        if self.notifier:  # SIGTERM stays JAX's: its notifier tells every process
            self.signals = StopSignals((signal.SIGINT,), on_first=_notify_peers)
        else:
            self.signals = StopSignals(STOP_SIGNALS)

    def __enter__(self) -> StopAgreement:
        self.signals.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.signals.__exit__(*exc)

    def check(self, step: int) -> None:
        """Before step ``step + 1``: raises :class:`TrainingInterrupted` if the run stops here. In a multi-process
        run every process must call it before every step, with the same ``step``."""
        own = self.signals.signum
        if not self.multi:
            self.signals.check()
        elif self.notifier:
            if multihost_utils.reached_preemption_sync_point(step):
                raise TrainingInterrupted(own or signal.SIGTERM, orderly=True)
        else:
            flags = multihost_utils.process_allgather(np.int32(own or 0))
            if int(np.max(flags)):
                raise TrainingInterrupted(own or int(np.max(flags)), orderly=True)


def lost_process_error(error: BaseException, workdir: str) -> ProcessLost | None:
    """The one-line error of a multi-process run (in ``workdir``) whose collective failed because another process is
    gone, naming the last checkpoint; None for another error, or in a single process."""
    text = str(error).lower()
    if not distributed() or not any(marker in text for marker in LOST_MARKERS):
        return None
    done = committed_steps(os.path.join(workdir, "checkpoints"))
    good = f"step {done[-1]}" if done else "none"
    return ProcessLost(
        f"another process of this run is gone ({one_line(error)}); this one stops too; last checkpoint: {good}"
    )


def leave(status: int, orderly: bool) -> int:
    """Returns ``status``; but a process of a multi-process run that stops alone (not ``orderly``) exits here at once
    (``os._exit``, after flushing its output): JAX's shutdown barrier at exit would wait for processes that are dead
    or waiting for this one in a collective."""
    if orderly or not distributed():
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
