"""Training metrics to ``metrics.jsonl`` and TensorBoard event files (tensorboardX), from process 0 only.

Each ``write(step, metrics, prefix)`` appends one JSON line ``{"step": s, "<prefix>/<name>": value, ...}``
and one scalar per metric to ``<workdir>/tb``. Values must be host scalars (floats).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax


class MetricWriter:
    """Append-only metric log of one run (jsonl + TensorBoard). A no-op on processes other than 0."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._tb = None
        self._file = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # heavy import, only where used

            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tb"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
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
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
            self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of ``<workdir>/metrics.jsonl``, oldest first."""
    with open(os.path.join(os.fspath(workdir), "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
