"""Time limits of the suite's subprocesses, scaled to the machine: a limit is given as measured on an idle 2-core
machine and multiplied by ``WIMFRIS_TEST_TIMEOUT_SCALE`` (default 3) and by the load per core when the subprocess
starts (a loaded CI runner compiles slower), so the suite fails for a defect, not for a busy machine."""

from __future__ import annotations

import os


def limit(seconds: float) -> float:
    """``seconds`` (idle 2-core machine) scaled for this machine now (module docstring)."""
    scale = float(os.environ.get("WIMFRIS_TEST_TIMEOUT_SCALE", "3"))
    load = os.getloadavg()[0] / (os.cpu_count() or 1) if hasattr(os, "getloadavg") else 1.0
    return seconds * scale * max(1.0, load)
