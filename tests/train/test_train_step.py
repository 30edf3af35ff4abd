"""Train step, shardings and optimiser on the toy model (tests/toy_model.py) over the 8 virtual CPU devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from toy_model import ToyModel, ToySource, toy_config, toy_loss

from wimfris_jax.io import flatten
from wimfris_jax.train import optim, sharding
from wimfris_jax.train.state import init_train_state, init_variables
from wimfris_jax.train.step import jit_train_step, make_train_step

BATCH = 16
LR = 1e-2


def _batch():
    src = ToySource(BATCH)
    return {k: np.stack([src[i][k] for i in range(BATCH)]) for k in ("image", "ids", "mask")}


def _setup(n_devices, *, fsdp=False, compute_dtype="float32"):
    cfg = toy_config(lr=LR)
    model = ToyModel()
    tx, schedule = optim.make_optimizer(cfg.train, steps_per_epoch=4)
    mesh = sharding.make_mesh(jax.devices()[:n_devices])
    init_fn = functools.partial(init_variables, model, _batch())
    state, shardings = init_train_state(init_fn, tx, cfg.train.trainable, 0, mesh, fsdp=fsdp, fsdp_min_size=256)
    step = make_train_step(model, toy_loss, tx, schedule, compute_dtype=compute_dtype)
    return state, jit_train_step(step, shardings, mesh, donate=False), mesh


@functools.cache
def _run(n_devices, n_steps, **kw):
    """States after 0..n_steps steps on a fixed batch, and the metrics of each step (cached: compiling is slow)."""
    state, step, mesh = _setup(n_devices, **kw)
    batch = sharding.shard_batch(_batch(), mesh)
    states, metrics = [state], []
    for _ in range(n_steps):
        state, m = step(state, batch)
        states.append(state)
        metrics.append(jax.device_get(m))
    return states, metrics


def _losses(metrics):
    return np.array([m["loss"] for m in metrics])


def test_fsdp_spec_rule():  # shape-only rule of FSDP
    assert sharding.fsdp_spec((3, 3, 8, 16), 8, min_size=0) == P(None, None, None, "data")
    assert sharding.fsdp_spec((64, 8), 8, min_size=0) == P("data")
    assert sharding.fsdp_spec((16, 16), 8, min_size=0) == P(None, "data")  # tie -> last axis
    assert sharding.fsdp_spec((7, 3), 8, min_size=0) == P()  # nothing divisible
    assert sharding.fsdp_spec((64, 8), 8, min_size=1024) == P()  # small
    assert sharding.fsdp_spec((64, 8), 1, min_size=0) == P()


def test_step_updates_only_trainable_and_advances_state():
    (state0, state1, _), (metrics, _) = _run(8, 2)
    # frozen backbone: split off, no optimiser moments, bitwise unchanged
    assert set(state0.frozen) == {"image_encoder"}
    assert not any(k.startswith("image_encoder") for k in flatten(state0.params))
    mu = flatten(state1.opt_state[0].mu)
    assert set(mu) == set(flatten(state0.params))
    for k, v in flatten(state0.frozen).items():
        np.testing.assert_array_equal(v, flatten(state1.frozen)[k])
    # every trainable parameter moved (Adam: ~lr per element), BN statistics updated, rng split, step counted
    p0, p1 = flatten(state0.params), flatten(state1.params)
    for k in p0:
        assert float(jnp.abs(p1[k] - p0[k]).max()) > 1e-4, k
    s0, s1 = flatten(state0.batch_stats), flatten(state1.batch_stats)
    assert set(s0) == {"neck_bn/mean", "neck_bn/var"}
    assert all(float(jnp.abs(s1[k] - s0[k]).max()) > 1e-4 for k in s0)
    assert int(state1.step) == 1 and not np.array_equal(state1.rng, state0.rng)
    assert float(metrics["lr"]) == pytest.approx(LR)
    assert set(metrics) >= {"loss", "grad_norm", "lr", "bce", "window"}
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["bce"] + 0.2 * metrics["window"]), rtol=1e-6)


def test_loss_falls():
    losses = _losses(_run(1, 25)[1])
    assert losses[-1] < 0.8 * losses[0] and losses[-5:].mean() < losses[:5].mean() - 0.1, losses


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_eight_devices_match_one(fsdp):
    states1, m1 = _run(1, 25)  # shared with test_loss_falls
    (*_, eight), m8 = _run(8, 2, fsdp=True) if fsdp else _run(8, 2)
    one, loss1, loss8 = states1[2], _losses(m1[:2]), _losses(m8)
    assert len(jax.devices()) == 8
    specs = {k: v.sharding.spec for k, v in flatten(eight.params).items()}
    if fsdp:  # the large kernels are split over "data", the small vectors are not
        assert specs["neck_conv/kernel"] == P(None, None, None, "data") and specs["text/embedding"] == P(None, "data")
        assert specs["neck_bn/scale"] == P()
        assert flatten(eight.opt_state[0].mu)["neck_conv/kernel"].sharding.spec == P(None, None, None, "data")
    else:
        assert all(s == P() for s in specs.values())
    np.testing.assert_allclose(loss8, loss1, atol=1e-5)
    for tree in ("params", "batch_stats", "frozen"):
        a, b = flatten(getattr(one, tree)), flatten(getattr(eight, tree))
        for k in a:
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a[k]), atol=1e-5, err_msg=f"{tree}/{k}")


def test_bfloat16_compute_keeps_float32_master_params():
    loss32 = _losses(_run(1, 25)[1][:2])
    (*_, b16), m16 = _run(1, 2, compute_dtype="bfloat16")
    loss16 = _losses(m16)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves((b16.params, b16.opt_state[0].mu)))
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(b16.batch_stats))
    assert np.all(loss16 != loss32)  # bf16 rounding did happen ...
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)  # ... and stays small


def test_bad_compute_dtype_is_an_error():
    with pytest.raises(ValueError, match="float16"):
        make_train_step(ToyModel(), toy_loss, optim.make_optimizer(toy_config().train, 4)[0], compute_dtype="float16")


def test_lr_schedule_decays_at_milestone_epochs():
    s = optim.lr_schedule(1e-4, (35, 55), 0.1, steps_per_epoch=10)
    assert float(s(0)) == pytest.approx(1e-4) and float(s(349)) == pytest.approx(1e-4)
    assert float(s(350)) == pytest.approx(1e-5) and float(s(549)) == pytest.approx(1e-5)
    assert float(s(550)) == pytest.approx(1e-6)


def test_shard_batch_rejects_indivisible_batch():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match=r"batch\['ids'\] has global batch 12"):
        sharding.shard_batch({"ids": np.zeros((12, 4), np.int32)}, mesh)


def test_maybe_initialize_distributed_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "WIMFRIS_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        sharding.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        sharding.maybe_initialize_distributed()
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert sharding.maybe_initialize_distributed() is True
    monkeypatch.setenv("WIMFRIS_HEARTBEAT_TIMEOUT", "12")
    sharding.maybe_initialize_distributed()
    assert calls == [(("10.0.0.1:1234", 2, 1), {"heartbeat_timeout_seconds": hb}) for hb in (30, 12)]
    monkeypatch.setenv("WIMFRIS_HEARTBEAT_TIMEOUT", "0")
    with pytest.raises(ValueError, match="WIMFRIS_HEARTBEAT_TIMEOUT=0"):
        sharding.maybe_initialize_distributed()
