"""A checkpoint loads on whatever devices read it: toy runs written on 2 CPU devices (replicated, and FSDP with
arrays split over both) are read by a 1-device process (``load_variables``, under ``load_model``, ``wimfris eval`` /
``predict`` and ``--init``) and by this 8-device one with the values written; a 2-device FSDP checkpoint resumes on
a 1-device mesh and a 1-device checkpoint on a 2-device FSDP mesh, onto the new mesh's shardings, and trains on.

The writers and the 1-device reader are subprocesses (this module's ``__main__``): the device count is fixed when
JAX starts, and conftest gives this process 8."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import python_path
from jax.sharding import Mesh
from limits import limit
from toy_model import run_toy_training, toy_config

from wimfris_jax.checkpoints.runs import load_variables
from wimfris_jax.io import flatten
from wimfris_jax.train.logging import read_metrics

FSDP_MIN_SIZE = 16  # elements: the toy's kernels, embeddings and BatchNorm vectors are split over the devices
WRITERS = {2: {"replicated": False, "fsdp": True}, 1: {"one": False}}  # device count -> runs written: name -> fsdp


def _run_worker(*args: str, devices: int) -> dict:
    """This module as a subprocess on ``devices`` CPU devices; returns the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=python_path())
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                          timeout=limit(300))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _state_arrays(state) -> dict[str, np.ndarray]:
    """Every array of a TrainState by its path (``.params['head']['bias']``), on the host."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``(root, split)``: runs written by a 2-device process (``replicated``, ``fsdp``) and a 1-device one
    (``one``), each checkpointed at step 4, beside ``<name>.state.npz`` / ``<name>.variables.npz`` (what was written)
    and ``<name>.read.npz`` (what the 1-device process read from each 2-device run); ``split``: per run, how many
    arrays the writer held split over its devices."""
    root = tmp_path_factory.mktemp("layouts")
    split = _run_worker("write", str(root), devices=2)
    split.update(_run_worker("write", str(root), devices=1))  # then reads the 2-device runs on its one device
    return root, split


def _npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return dict(f)


def test_two_device_checkpoints_load_on_other_devices(written):
    root, split = written
    assert split["replicated"] == 0 and split["one"] == 0 and split["fsdp"] >= 10  # FSDP really split them
    for name in ("replicated", "fsdp"):
        want = _npz(root / f"{name}.variables.npz")
        assert len(want) == 10 and want["params/neck_conv/kernel"].shape == (3, 3, 16, 16)
        _assert_equal(_npz(root / f"{name}.read.npz"), want)  # read by the 1-device process
        variables, step = load_variables(root / name)  # read here, on 8 devices
        assert step == 4
        _assert_equal(flatten(variables), want)


@pytest.mark.parametrize(("name", "devices", "fsdp", "train_on"), [("fsdp", 1, False, False), ("one", 2, True, True)])
def test_resume_onto_another_mesh(written, tmp_path, name, devices, fsdp, train_on):
    root, _ = written
    run = tmp_path / name
    shutil.copytree(root / name, run)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    config = toy_config(resume=True, epochs=1, fsdp=fsdp, fsdp_min_size=FSDP_MIN_SIZE)
    restored = run_toy_training(str(run), config, mesh=mesh)  # the run is done at step 4: the restored state
    assert int(restored.step) == 4
    _assert_equal(_state_arrays(restored), _npz(root / f"{name}.state.npz"))
    leaves = jax.tree_util.tree_leaves(restored)
    assert {d for x in leaves for d in x.sharding.device_set} == set(mesh.devices.flat)
    split = sum(not x.sharding.is_fully_replicated for x in leaves)
    assert split >= 10 if fsdp else split == 0  # the new mesh's layout, not the writer's
    if not train_on:
        return
    config.train.epochs = 2
    trained = run_toy_training(str(run), config, mesh=mesh)  # and trains on, on the new mesh
    rows = [r for r in read_metrics(run) if "train/loss" in r]
    assert int(trained.step) == 8 and [r["step"] for r in rows] == list(range(1, 9))
    assert all(0.1 < r["train/loss"] < 2.0 for r in rows)


def _worker(root: str) -> None:
    """Writes this device count's runs (``WRITERS``) under ``root``; a 1-device worker then reads the 2-device runs
    with ``load_variables``. Prints ``{run: arrays split over the devices}``."""
    jax.config.update("jax_default_matmul_precision", "float32")
    split = {}
    for name, fsdp in WRITERS[jax.device_count()].items():
        state = run_toy_training(os.path.join(root, name), toy_config(epochs=1, fsdp=fsdp, fsdp_min_size=FSDP_MIN_SIZE))
        np.savez(os.path.join(root, f"{name}.state.npz"), **_state_arrays(state))
        np.savez(os.path.join(root, f"{name}.variables.npz"), **flatten(jax.device_get(state.variables())))
        split[name] = sum(not x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(state))
    if jax.device_count() == 1:
        for name in WRITERS[2]:
            variables, step = load_variables(os.path.join(root, name))
            assert step == 4, step
            np.savez(os.path.join(root, f"{name}.read.npz"), **flatten(variables))
    print(json.dumps(split), flush=True)


if __name__ == "__main__":
    assert sys.argv[1] == "write"
    _worker(sys.argv[2])
