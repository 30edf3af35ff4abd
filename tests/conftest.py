"""Test-wide setup. XLA_FLAGS must be set before JAX starts, so it is set here, at collection time:
eight virtual CPU devices let the sharding tests build an 8-device mesh on any machine.

The tests mirror the package: a folder per layer (core, data_pipeline, backbones, ssm, train, checkpoints, weights,
port_weights, commands) and per family (families/wimfris, families/tfanet, families/vipa). The helpers beside this
file (helpers.py, toy_model.py, fake_refcoco.py, ...) are imported by their plain names (``from fake_refcoco import
write_fake_refcoco``), the PyTorch references as ``torch_ref`` (the repository's torch_ref/, which the benchmarks use
too): this folder and the repository are put on ``sys.path`` here, whatever pytest's import mode."""

import atexit
import contextlib
import gc
import os
import shutil
import signal
import sys
import tempfile

for _path in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:  # the repository (its packages, torch_ref/) and this folder (the shared helpers)
        sys.path.insert(0, _path)

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Ctrl-C as in a terminal, however the suite was started: a shell that starts a job in the background ignores SIGINT
# for it, the workers would inherit that, and so would the processes they start (a Python handler, unlike SIG_IGN, is
# reset to the default across exec), and the Ctrl-C tests (training saves and stops) would test nothing.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Nothing in the suite reaches the internet: the Hub is offline for every test and subprocess (huggingface_hub reads
# this when imported), and converted weights go to a folder of this session, not the user's cache. Tests of weights by
# name populate their own caches (hub_fixtures.py) and serve URLs locally (http_server.py).
os.environ["HF_HUB_OFFLINE"] = "1"
# One folder for the session, made by the first process (pytest-xdist's workers inherit it) and removed by it at exit.
if "WIMFRIS_TEST_SESSION" not in os.environ:
    os.environ["WIMFRIS_TEST_SESSION"] = tempfile.mkdtemp(prefix="wimfris_test_session_")
    atexit.register(shutil.rmtree, os.environ["WIMFRIS_TEST_SESSION"], True)
os.environ["WIMFRIS_CACHE"] = os.path.join(os.environ["WIMFRIS_TEST_SESSION"], "weights")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


# A worker that dies (killed for memory, a segfault in a compiler) takes its test down with it; pytest-xdist then prints
# "node down: Not properly terminated" and, if the test had not started, names nothing. Each worker writes the test it
# is running to a file; the controller names it when the worker goes down.
def _running_file(testrunuid: str, worker: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"wimfris-pytest-{testrunuid}-{worker}.running")


def pytest_runtest_logstart(nodeid, location):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if worker and uid:
        with open(_running_file(uid, worker), "w", encoding="utf-8") as f:
            f.write(nodeid)


def _last_test(node) -> str | None:
    try:
        with open(_running_file(node.workerinput["testrunuid"], node.gateway.id), encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, AttributeError, KeyError):
        return None



@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist (controller): a worker went down; when it crashed, name the test it was running."""
    last = _last_test(node)
    if error and last:
        node.config.get_terminal_writer().line(
            f"[{node.gateway.id}] worker crashed during {last} (its setup, call or teardown)", red=True, bold=True
        )
    if last is not None:
        with contextlib.suppress(OSError):
            os.remove(_running_file(node.workerinput["testrunuid"], node.gateway.id))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_after_each_file():
    """Each test file's compiled executables and traces are dropped when it ends: an xdist worker runs many files and
    would otherwise keep every one alive (measured: two workers at ~9 GiB each near the end of the suite)."""
    yield
    jax.clear_caches()
    gc.collect()

