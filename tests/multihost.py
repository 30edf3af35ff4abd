"""Running ``wimfris`` as several JAX processes on this machine, for the multi-process tests.

Each process gets ``JAX_PLATFORMS=cpu`` (one CPU device) and the three ``jax.distributed`` variables
(``JAX_COORDINATOR_ADDRESS`` on a free local port, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); gloo carries the
collectives. Output goes to files (a pipe nobody reads would block a chatty process). :class:`Processes` is a
context manager that kills whatever is still running when it exits, so a failing test never leaves processes behind;
every wait has a timeout. Synchronisation is by what the run writes (a step in ``metrics.jsonl``), not by sleeping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from helpers import ROOT, python_path
from limits import limit


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sets(*items: str) -> list[str]:
    """``--set`` arguments for ``KEY=VALUE`` items."""
    return [arg for item in items for arg in ("--set", item)]


def process_env(process_id: int, num_processes: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``process_id``: this checkout importable, CPU, one device, jax.distributed."""
    env = dict(os.environ, PYTHONPATH=python_path())
    env.pop("XLA_FLAGS", None)  # one CPU device per process, as on a real host
    env.update(
        JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.update(extra or {})
    return env


@dataclasses.dataclass
class Result:
    """How one process ended: exit status, its output, when it ended (``time.monotonic()``)."""

    returncode: int
    stdout: str
    stderr: str
    ended: float

    def lines(self, prefix: str = "wimfris ") -> list[str]:
        """The stderr lines starting with ``prefix`` (the command's own messages)."""
        return [line for line in self.stderr.splitlines() if line.startswith(prefix)]


class Processes:
    """Context manager: ``len(argvs)`` processes of one ``jax.distributed`` run (``python -m wimfris_jax.cli`` +
    ``argv``), process *i* logging to ``logs/p<i>.out`` / ``.err``; killed (SIGKILL) on exit if still running."""

    def __init__(self, argv: Sequence[str], num_processes: int, logs: os.PathLike, env: dict[str, str] | None = None):
        self.logs = pathlib.Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        self._ended: dict[int, float] = {}
        for i in range(num_processes):
            with open(self.logs / f"p{i}.out", "w") as out, open(self.logs / f"p{i}.err", "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "wimfris_jax.cli", *argv], cwd=ROOT, stdout=out, stderr=err,
                    env=process_env(i, num_processes, port, env),
                ))  # fmt: skip

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=limit(60))

    def signal(self, signum: int, which: Sequence[int] | None = None) -> float:
        """Sends ``signum`` to the processes ``which`` (default all); returns when (``time.monotonic()``)."""
        for i in range(len(self.procs)) if which is None else which:
            self.procs[i].send_signal(signum)
        return time.monotonic()

    def wait_for_step(self, workdir: os.PathLike, step: int, timeout: float = 300) -> int:
        """Waits until ``workdir/metrics.jsonl`` has logged a training step >= ``step``; returns the last one logged.
        Fails if a process ends first or after ``timeout`` seconds."""
        timeout = limit(timeout)
        path, deadline = pathlib.Path(workdir) / "metrics.jsonl", time.monotonic() + timeout
        while time.monotonic() < deadline:
            steps = [json.loads(line)["step"] for line in _lines(path)]
            if steps and steps[-1] >= step:
                return int(steps[-1])
            ended = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if ended:
                raise AssertionError(f"process {ended[0]} ended before step {step}:\n{self._tail(ended[0])}")
            time.sleep(0.2)
        raise AssertionError(f"no step {step} logged in {timeout} s:\n{self._tail(0)}")

    def finish(self, timeout: float = 300) -> list[Result]:
        """Waits for every process (killing those still running after ``timeout`` seconds); their results."""
        deadline = time.monotonic() + limit(timeout)
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    self._ended.setdefault(i, time.monotonic())
            time.sleep(0.1)
        for i, p in enumerate(self.procs):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=limit(60))
            self._ended.setdefault(i, time.monotonic())
        return [
            Result(p.returncode, (self.logs / f"p{i}.out").read_text(), (self.logs / f"p{i}.err").read_text(),
                   self._ended[i])
            for i, p in enumerate(self.procs)
        ]  # fmt: skip

    def _tail(self, i: int, chars: int = 3000) -> str:
        return (self.logs / f"p{i}.err").read_text()[-chars:]


def _lines(path: pathlib.Path) -> list[str]:
    """The complete lines of ``path`` (none if it does not exist yet)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1] if line.strip()]  # the last piece is unfinished or empty
