"""The benchmark scripts run (at smoke sizes): they are how the project's speed claims are measured."""

import json
import subprocess
import sys

from helpers import ROOT
from limits import limit


def test_device_check_smoke(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/device_check.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=limit(600),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = res["sections"]
    assert set(sections) == {"cudnn", "scan", "attention", "train", "eval"}
    assert not any(isinstance(rows, dict) for rows in sections.values()), sections  # no section failed
    assert {r["impl"] for r in sections["scan"]} == {"associative", "sequential", "unrolled"}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in sections["scan"])
    by_impl = {r["attention"]: r for r in sections["attention"]}
    assert by_impl["xla"]["ms"] > 0 and by_impl["chunked"]["ms"] > 0
    assert "error" in by_impl["cudnn"] and "GPU" in by_impl["cudnn"]["error"]  # no cuDNN on a CPU host: recorded
    probes = [r for r in sections["cudnn"] if "q_len" in r]
    assert probes and all(r["fwd"] != "ok" and r["grad"] != "ok" for r in probes)  # no cuDNN here: refusals recorded
    assert any(r.get("fwd_bwd_ms", 0) > 0 for r in sections["cudnn"] if r.get("timed") == "xla 1029")
    assert all(r["attention"] == "auto" for r in sections["train"] + sections["eval"])  # no fallback was needed
    for row in sections["train"]:
        assert row["images_per_s"] > 0 and row["peak_memory_gib"] > 0 and row["gflop_per_step_per_device"] > 0
    models = {"WIMFRIS-B", "DETRIS-B"}
    assert {r["model"] for r in sections["train"]} == {r["model"] for r in sections["eval"]} == models
    assert "| train |" in proc.stdout and "| scan |" in proc.stdout  # the table


def test_veg_overlap_random_vipa_b(tmp_path, capsys):
    """benchmarks/veg_overlap.py --random: VIPA-B's 15 x 15 map (N 225, k 68); the noised selection keeps at least
    chance of the noise-free one, more at score scale 10 than at 1 (eq. 2), never more than all of it."""
    from benchmarks import veg_overlap

    out = tmp_path / "rows.json"
    assert veg_overlap.main(["--random", "--draws", "2", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert (row["N"], row["k"], row["score_scale"]) == (225, 68, 1.0)
    at = {float(s): v for s, v in row["at_scales"].items()}
    assert abs(row["chance"] - 68 / 225) < 1e-9 and row["overlap"] == at[1.0]
    assert row["chance"] - 0.02 < at[1.0] < at[10.0] - 0.05 and at[10.0] <= 1.0, at
    assert "| random VIPA-B VEG, 480 px | 1 | 225 | 68 | 0.302 |" in capsys.readouterr().out
