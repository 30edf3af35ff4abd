"""CI guard: every model family's train step and evaluation forward compile for an H100-class GPU target, from this
CPU host (benchmarks/aot.py), with the dispatch a real GPU would make: a lowering that only a GPU refuses (cuDNN's
shape rules, a kernel XLA:GPU cannot tile) fails here, not at step 0 on a rented machine.

Needs XLA's CUDA compiler and cuDNN in ``.aot_site`` (or ``$WIMFRIS_AOT_SITE``), which ``.ci/run`` installs
(benchmarks/aot_targets.py says how); elsewhere the test is skipped, unless ``WIMFRIS_AOT_REQUIRED=1`` (CI), where
their absence fails it. About a minute per family on one core (compilation)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, python_path
from limits import limit

SITE = os.environ.get("WIMFRIS_AOT_SITE", os.path.join(ROOT, ".aot_site"))
HAVE_SITE = os.path.isdir(os.path.join(SITE, "jax_plugins"))
REQUIRED = os.environ.get("WIMFRIS_AOT_REQUIRED") == "1"

# family config -> the attention shapes (B, Tq, H, D) x Tk that must run on cuDNN in the train step
FAMILIES = {
    "configs/tiny.py": [((2, 261, 2, 32), 261), ((2, 17, 2, 32), 17)],  # DINOv2 (odd: padded) and CLIP text
    "configs/detris_tiny.py": [((2, 261, 2, 32), 261), ((2, 17, 2, 32), 17)],
    "configs/tfanet_tiny.py:quick": [((2, 17, 2, 32), 17)],  # the CLIP text tower (VMamba has no attention)
    "configs/vipa_tiny.py:quick": [((2, 10, 2, 32), 10)],  # BERT
}


@pytest.mark.skipif(not HAVE_SITE and not REQUIRED, reason=f"no compile-only CUDA plugin in {SITE}")
@pytest.mark.parametrize("config", list(FAMILIES))
def test_family_compiles_for_a_gpu_with_cudnn_attention(config, tmp_path):
    assert HAVE_SITE, f"WIMFRIS_AOT_REQUIRED=1 but {SITE} holds no jax_plugins (see .ci/run)"
    out = tmp_path / "aot.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SITE, python_path()])}
    env.pop("XLA_FLAGS", None)  # the suite's 8 virtual CPU devices are not wanted here
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.aot", "--target", "h100", "--config", config, "--batch", "2",
         "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit(1200),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["what"]: r for r in json.loads(out.read_text())["rows"]}
    train, fwd = rows["train step"], rows["evaluation forward"]
    assert train["resolved_remat"] == "dots" and 0 < train["peak_gib"] < 1 and 0 < fwd["peak_gib"] < 1
    fmha = lambda row, backward: sum(  # noqa: E731 - __cudnn$fmhaSoftmax[Backward], ...ScaleBiasSoftmax... (masks)
        n for k, n in row["kernels"].items() if k.startswith("__cudnn$fmha") and k.endswith("Backward") == backward
    )
    assert fmha(train, False) > 0 and fmha(train, True) > 0 and fmha(fwd, False) > 0 and fmha(fwd, True) == 0
    on_cudnn = {(tuple(a["q"]), a["kv_len"]) for a in train["attention"] if a["chosen"] == "cudnn"}
    for shape in FAMILIES[config]:
        assert shape in on_cudnn, (shape, train["attention"])
