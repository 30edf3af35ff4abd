"""Composition as users do it: the selective scan, the Mamba block and the WMF inside a Flax NNX model (through
``flax.nnx.bridge``) and inside plain JAX transformations (grad, vmap, jit with donated buffers).

The two examples of the README section "Lifting parts into your own model" are extracted and executed as
written; the tests below check numbers on what they define."""

import re
from pathlib import Path

import flax
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import normal

from wimfris_jax.families.wimfris.neck import WindowMambaFuser
from wimfris_jax.ssm import Mamba, selective_scan

ROOT = Path(helpers.ROOT)
HEADING = "## Lifting parts into your own model"


def _doc_blocks() -> list[str]:
    """The python examples of the README section (from its heading to the next level-2 heading)."""
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md has no {HEADING!r}"
    section = text[text.index(HEADING) + len(HEADING) :].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, f"README section {HEADING!r} holds {len(blocks)} python examples, not 2"
    return blocks


def _run_block(index: int) -> dict:
    ns: dict = {"__name__": f"composition_doc_{index}"}
    exec(compile(_doc_blocks()[index], f"<{HEADING} example {index}>", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def nnx_doc() -> dict:
    """The NNX example: ``TinyRIS``, an initialised ``model``, ``optimizer`` and ``train_step``."""
    return _run_block(0)


@pytest.fixture(scope="module")
def jax_doc() -> dict:
    """The plain-JAX example: ``block``, ``params``, ``tx``, ``train_step`` (donating), ``apply_k``, ``scan_grad_A``."""
    return _run_block(1)


def _ris_batch(seed: int = 0):
    """Feature map (2, 4, 4, 16), words (2, 5, 16), a binary mask (2, 4, 4)."""
    fmap, words = normal(seed, (2, 4, 4, 16)), normal(seed + 1, (2, 5, 16))
    mask = (normal(seed + 2, (2, 4, 4)) > 0).astype(jnp.float32)
    return fmap, words, mask


def _linen_vars(bridged: nnx.Module) -> dict:
    return {"params": nnx.to_pure_dict(nnx.state(bridged, nnx.Param))}


def _max_abs(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def test_doc_has_the_two_examples():
    blocks = _doc_blocks()
    assert len(blocks) == 2
    assert "nnx.bridge.ToNNX" in blocks[0] and "nnx.bridge.lazy_init" in blocks[0]
    assert "donate_argnums" in blocks[1] and "jax.vmap" in blocks[1] and "selective_scan" in blocks[1]


# --- Flax NNX through the bridge ---------------------------------------------------------------------------


def test_nnx_model_equals_linen_apply_with_the_same_variables(nnx_doc):
    model = nnx_doc["model"]
    fmap, words, _ = _ris_batch()
    logits, window_logits = model(fmap, words)
    assert logits.shape == (2, 4, 4) and window_logits.shape == (2, 4)

    text, fuser = model.text.to_nnx__module, model.fuser.to_nnx__module
    assert isinstance(text, Mamba) and isinstance(fuser, WindowMambaFuser)
    hidden = text.apply(_linen_vars(model.text), words)
    fused, window_ref = fuser.apply(_linen_vars(model.fuser), fmap, hidden[:, -1])
    logits_ref = (fused @ model.head.kernel[...] + model.head.bias[...])[..., 0]

    assert _max_abs(model.text(words), hidden) <= 1e-6
    assert _max_abs(logits, logits_ref) <= 1e-6
    assert _max_abs(window_logits, window_ref) <= 1e-6
    assert float(jnp.std(logits)) > 1e-3 and float(jnp.std(window_logits)) > 1e-3  # not a constant map


def test_bridged_parameters_are_nnx_params(nnx_doc):
    model = nnx_doc["model"]
    flat = flax.traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sep="/")
    fmap, words, _ = _ris_batch()
    want = {"head/kernel": (16, 1), "head/bias": (1,)}
    for name, linen_module, args in (
        ("text", model.text.to_nnx__module, (words,)),
        ("fuser", model.fuser.to_nnx__module, (fmap, words[:, 0])),
    ):
        shapes = jax.eval_shape(linen_module.init, jax.random.key(0), *args)["params"]
        want.update({f"{name}/{k}": v.shape for k, v in flax.traverse_util.flatten_dict(shapes, sep="/").items()})
    assert {k: v.shape for k, v in flat.items()} == want
    assert {
        "text/in_proj/kernel",
        "text/A_log",
        "fuser/mamba/A_log",
        "fuser/norm/scale",
        "fuser/cls_proj/kernel",
    } <= set(flat)
    # The bridge's RNG stream is state, but not a parameter: the optimiser never sees it.
    assert not any("rngs" in k for k in flat)
    assert nnx.state(model, nnx.RngCount)


def test_nnx_optimizer_step_lowers_the_loss(nnx_doc):
    model = nnx.clone(nnx_doc["model"])  # the fixture's model stays untrained for the other tests
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fmap, words, mask = _ris_batch()
    losses = [float(nnx_doc["train_step"](model, optimizer, fmap, words, mask)) for _ in range(6)]
    assert all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses
    # nnx.value_and_grad reached every parameter of every part, the bridged ones included; the one exception
    # is the WMF's cls_proj, which only feeds the window logits that this loss ignores: its gradient is
    # exactly zero and Adam leaves it where it was.
    moved = flax.traverse_util.flatten_dict(
        jax.tree.map(_max_abs, before, nnx.to_pure_dict(nnx.state(model, nnx.Param))), sep="/"
    )
    assert {k for k, v in moved.items() if v == 0} == {"fuser/cls_proj/kernel", "fuser/cls_proj/bias"}
    assert min(v for k, v in moved.items() if "cls_proj" not in k) > 1e-4
    assert all(part in {k.split("/")[0] for k in moved} for part in ("text", "fuser", "head"))
    assert int(optimizer.step[...]) == 6


def test_bridged_module_under_plain_jit_needs_split_merge(nnx_doc):
    """Each call of a ``ToNNX`` draws a key and bumps its RngCount: closing over it in ``jax.jit`` is an error;
    threading its state through ``nnx.split`` / ``nnx.merge`` works and gives the eager result."""
    text = nnx.clone(nnx_doc["model"].text)
    words = normal(1, (2, 5, 16))
    with pytest.raises(flax.errors.TraceContextError):
        jax.jit(lambda w: text(w))(words)

    graphdef, state = nnx.split(text)
    count = lambda: [int(c) for c in jax.tree.leaves(nnx.state(text, nnx.RngCount))]
    before = count()

    @jax.jit
    def forward(state, w):
        m = nnx.merge(graphdef, state)
        return m(w), nnx.state(m)

    y, new_state = forward(state, words)
    nnx.update(text, new_state)
    assert len(before) == 1 and count() == [before[0] + 1]  # the key drawn inside jit was recorded
    assert _max_abs(y, text.to_nnx__module.apply(_linen_vars(text), words)) <= 1e-6


# --- plain JAX transformations ---------------------------------------------------------------------------


def _loop_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """The S6 recurrence written out as a Python loop over time (mamba_ssm's selective_scan_ref), softplus on."""
    delta = jax.nn.softplus(delta if delta_bias is None else delta + delta_bias)
    h = jnp.zeros((u.shape[0], u.shape[2], A.shape[1]))
    ys = []
    for t in range(u.shape[1]):
        h = jnp.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append(jnp.einsum("bdn,bn->bd", h, C[:, t]))
    y = jnp.stack(ys, axis=1)
    y = y if D is None else y + u * D
    return y if z is None else y * jax.nn.silu(z)


def _scan_inputs(b=2, length=9, d=6, n=4):
    u, delta, B, C, z = (
        normal(i, s) for i, s in enumerate([(b, length, d)] * 2 + [(b, length, n)] * 2 + [(b, length, d)])
    )
    A = -jnp.exp(normal(5, (d, n)) * 0.5)
    D, delta_bias = normal(6, (d,)), normal(7, (d,)) * 0.5 - 1.0
    return (u, delta, A, B, C, D, z, delta_bias), normal(8, (b, length, d))


def test_grad_through_selective_scan_matches_a_python_loop():
    args, w = _scan_inputs()

    def ours(*a):
        u, delta, A, B, C, D, z, db = a
        y = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=db, delta_softplus=True)
        return jnp.sum(y * w)

    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(ours, argnums=argnums))(*args)
    want = jax.jit(jax.grad(lambda *a: jnp.sum(_loop_scan(*a) * w), argnums=argnums))(*args)
    for name, g, r in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), got, want):
        assert float(jnp.max(jnp.abs(r))) > 1e-2, name
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)

    # Central finite differences on a few entries (float32: eps 1e-2, loose tolerance).
    f, eps = jax.jit(ours), 1e-2
    for arg, index in ((2, (0, 0)), (0, (1, 3, 2)), (7, (4,)), (1, (0, 8, 5))):
        plus, minus = list(args), list(args)
        plus[arg] = args[arg].at[index].add(eps)
        minus[arg] = args[arg].at[index].add(-eps)
        fd = (float(f(*plus)) - float(f(*minus))) / (2 * eps)
        assert abs(fd - float(got[arg][index])) <= 2e-2 * abs(fd) + 5e-3, (arg, index, fd, float(got[arg][index]))


def test_doc_scan_grad_matches_the_loop(jax_doc):
    (u, delta, A, B, C, _, _, _), _ = _scan_inputs()
    g = jax.jit(jax_doc["scan_grad_A"])(A, u, delta, B, C)
    ref = jax.jit(jax.grad(lambda A: _loop_scan(u, delta, A, B, C).sum()))(A)
    assert g.shape == A.shape and float(jnp.max(jnp.abs(ref))) > 1e-2
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


def test_vmap_of_mamba_apply_equals_the_stacked_outputs(jax_doc):
    block, variables = jax_doc["block"], {"params": jax_doc["params"]}
    x = normal(0, (3, 2, 8, 16))
    got = jax_doc["apply_k"](variables, x)
    one = jax.jit(block.apply)
    want = jnp.stack([one(variables, x[k]) for k in range(x.shape[0])])
    assert got.shape == x.shape
    assert _max_abs(got, want) <= 1e-6
    assert _max_abs(got[0], got[1]) > 1e-2  # the examples differ, so the comparison means something


@pytest.mark.filterwarnings("error:Some donated buffers were not usable")
def test_donated_train_step_equals_the_undonated_one(jax_doc):
    """The doc's ``train_step`` donates params and optimiser state. XLA:CPU honours donation in this JAX (the
    donated inputs are deleted), so "Some donated buffers were not usable" (which JAX warns when it cannot
    reuse a buffer, e.g. on a backend without donation) is turned into an error here rather than filtered:
    a donation that silently stopped happening would fail this test."""
    tx, params0 = jax_doc["tx"], jax_doc["params"]
    x, target = normal(0, (2, 8, 16)), normal(1, (2, 8, 16))
    plain = jax.jit(jax_doc["train_step"].__wrapped__)  # the same step without donation

    p, s = params0, tx.init(params0)
    plain_losses = []
    for _ in range(2):
        p, s, loss = plain(p, s, x, target)
        plain_losses.append(float(loss))
    plain_out = (p, s)

    p, s = jax.tree.map(jnp.copy, params0), tx.init(params0)  # fresh buffers: params0 must survive
    losses = []
    for _ in range(2):
        donated = jax.tree.leaves((p, s))
        p, s, loss = jax_doc["train_step"](p, s, x, target)
        assert all(leaf.is_deleted() for leaf in donated)
        losses.append(float(loss))
    with pytest.raises(RuntimeError, match="deleted"):
        donated[0] + 1

    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params0))
    assert losses == plain_losses and losses[1] < losses[0]
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves(plain_out)):
        np.testing.assert_array_equal(a, b)
    assert _max_abs(p["in_proj"]["kernel"], params0["in_proj"]["kernel"]) > 1e-3  # the step did update
