"""Training metrics to ``metrics.jsonl`` and TensorBoard event files (tensorboardX), from process 0 only.

Each ``write(step, metrics, prefix)`` appends one JSON line ``{"step": s, "<prefix>/<name>": value, ...}``
and one scalar per metric to ``<workdir>/tb``. Values must be host scalars (floats).

Resume: a run restarting from the checkpoint at step N opens the writer with ``start_step=N``. The rows for steps
after N (logged after that checkpoint, before the crash) are dropped from ``metrics.jsonl`` (rewritten atomically),
and the new TensorBoard event file starts with a purge marker at step N + 1 (TensorBoard then hides the older
events from step N + 1 on), so each step is logged once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax


class MetricWriter:
    """Append-only metric log of one run (jsonl + TensorBoard). A no-op on processes other than 0.

    ``start_step``: the step the run starts from (the restored checkpoint's, 0 for a new run); rows already logged
    for later steps are dropped (see the module docstring). ``None`` keeps every existing row.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None, start_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._tb = None
        self._file = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # heavy import, only where used

            os.makedirs(workdir, exist_ok=True)
            if start_step is not None:
                drop_rows_after(self.path, start_step)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._tb = SummaryWriter(
                os.path.join(os.fspath(workdir), "tb"),
                purge_step=None if start_step is None else int(start_step) + 1,
                filename_suffix=f".{time.time_ns()}",  # a new file (in time order) even within the same second
            )

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        """Appends one row ``{"step", "time", "<prefix>/<name>": value ...}`` and the scalars to TensorBoard."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            key = f"{prefix}/{name}" if prefix else name
            row[key] = float(value)
            self._tb.add_scalar(key, float(value), int(step))
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def flush(self) -> None:
        """Flushes the jsonl file and the TensorBoard events to disk."""
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        """Closes both files; later writes are no-ops."""
        if self.enabled:
            self._file.close()
            self._tb.close()
            self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Removes the rows of the jsonl file ``path`` whose ``"step"`` is > ``step``; returns how many were removed.

    A torn last line (a crash in mid-write: no newline, not JSON) is removed too; other lines are kept as they
    are. The file is rewritten atomically (temporary file + ``os.replace``), and only when this changes it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if line.endswith("\n"):
                kept.append(line)
            continue
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step):
            kept.append(line)
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"  # the next row must start on a line of its own
    if kept == lines:
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``<workdir>/metrics.jsonl``, oldest first."""
    with open(os.path.join(os.fspath(workdir), "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
