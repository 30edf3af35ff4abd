"""DETRIS Dense Aligner, text adapter and neck: parity with PyTorch references (torch_ref/detris_parts.py)
through the converter's rule builders, in evaluation (running statistics) and training (batch statistics) mode."""

import functools

import jax
import numpy as np
import pytest

from port_weights.common import ConversionError, convert
from port_weights.detris import IGNORE, dense_aligner_rules, neck_rules, text_adapter_rules
from wimfris_jax.families.wimfris.adapters.detris import DenseAligner, DMoC
from wimfris_jax.families.wimfris.neck.detris import DetrisNeck, coord_features

torch = pytest.importorskip("torch")


def _state_dict(module, prefix):
    return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}


def _reroot(variables, name):
    return {col: tree[name] for col, tree in variables.items()}


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _check_running_stats(updates, ref_before, ref_after, pairs):
    """flax running mean == PyTorch's; flax running var == PyTorch's with the biased batch variance.

    pairs: (flax path tuple, torch key prefix, n = elements per channel in the batch)."""
    for path, key, n in pairs:
        stats = updates
        for p in path:
            stats = stats[p]
        np.testing.assert_allclose(stats["mean"], ref_after[key + "running_mean"].numpy(), atol=1e-6, rtol=0)
        rv0, rv1 = ref_before[key + "running_var"].numpy(), ref_after[key + "running_var"].numpy()
        biased = (rv1 - 0.9 * rv0) / 0.1 * (n - 1) / n
        np.testing.assert_allclose(stats["var"], 0.9 * rv0 + 0.1 * biased, atol=1e-5, rtol=0)
        assert np.abs(stats["var"] - rv0).max() > 1e-3


# ------------------------------------------------------------------------------------------- text adapter
def _text_setup(width=24, dim=32, b=3, length=6, seed=0):
    from torch_ref.detris_parts import TextAdapter as RefTA
    from torch_ref.detris_parts import randomize

    torch.manual_seed(seed)
    ref = RefTA(width, dim).eval()
    randomize(ref, seed)
    x = np.random.default_rng(seed).normal(size=(b, length, width)).astype(np.float32)
    model = DMoC(width=width, dim=dim)
    expected = {"params": {}, "batch_stats": {}}
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    for col in expected:
        expected[col]["text_adapter_3"] = shapes[col]
    sd = _state_dict(ref, "txt_backbone.transformer.resblocks.3.adapter.")
    variables = _reroot(convert(sd, text_adapter_rules(), expected, ignore=IGNORE), "text_adapter_3")
    return ref, model, variables, x


def test_text_adapter_eval_parity():
    ref, model, variables, x = _text_setup()
    out = model.apply(variables, x, train=False)
    with torch.no_grad():
        want = ref(_t(x)).numpy()
    assert out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)
    # Token 0 bypasses the convolutions (and BatchNorm is per-channel in eval): it only changes its own output.
    x2 = x.copy()
    x2[:, 0] += 3.0
    out2 = np.asarray(model.apply(variables, x2, train=False))
    np.testing.assert_allclose(out2[:, 1:], np.asarray(out)[:, 1:], atol=1e-6, rtol=0)
    assert np.abs(out2[:, 0] - np.asarray(out)[:, 0]).max() > 1e-2


def test_text_adapter_train_parity_and_running_stats():
    ref, model, variables, x = _text_setup(seed=1)
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    ref.train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        want = ref(_t(x)).numpy()
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=0)
    n = 3 * 5  # B * (L - 1) positions per channel
    pairs = [(("dense_branch1", "bn"), "dense_branch1.bn.", n)]
    pairs += [((f"dense_branch{i}_{j}", "bn"), f"dense_branch{i}.{j}.bn.", n) for i in (2, 3) for j in (0, 1)]
    _check_running_stats(updates["batch_stats"], before, ref.state_dict(), pairs)


# ------------------------------------------------------------------------------------------ Dense Aligner
def _aligner_setup(dropout=0.1, seed=0, width=40, dim=32, text_dim=24, heads=4, b=2, grid=(3, 4), length=5):
    from torch_ref.detris_parts import DenseAligner as RefDA
    from torch_ref.detris_parts import randomize

    torch.manual_seed(seed)
    ref = RefDA(width, dim, text_dim, heads, prefix=5)
    ref.cross.multihead_attn.dropout = dropout
    ref.eval()
    randomize(ref, seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, 5 + grid[0] * grid[1], width)).astype(np.float32)
    words = rng.normal(size=(b, length, text_dim)).astype(np.float32)
    model = DenseAligner(width=width, dim=dim, text_dim=text_dim, num_heads=heads, dropout=dropout, scale=0.2)
    call = functools.partial(model.init, grid=grid, num_prefix=5, train=False)
    shapes = jax.eval_shape(call, jax.random.key(0), x, words)
    expected = {col: {"vision_adapter_7": shapes[col]} for col in ("params", "batch_stats")}
    sd = _state_dict(ref, "dinov2.blocks.7.adapter.")
    variables = _reroot(convert(sd, dense_aligner_rules(num_heads=heads), expected, ignore=IGNORE), "vision_adapter_7")
    return ref, model, variables, x, words, grid


def test_dense_aligner_eval_parity():
    ref, model, variables, x, words, grid = _aligner_setup()
    out = model.apply(variables, x, words, grid=grid, num_prefix=5, train=False)
    with torch.no_grad():
        want = ref(_t(x), _t(words), *grid).numpy()
    assert out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out), 0.2 * want, atol=1e-5, rtol=0)


def test_dense_aligner_train_parity_and_running_stats():
    ref, model, variables, x, words, grid = _aligner_setup(dropout=0.0, seed=2)
    out, updates = model.apply(variables, x, words, grid=grid, num_prefix=5, train=True, mutable=["batch_stats"])
    ref.train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    with torch.no_grad():
        want = ref(_t(x), _t(words), *grid).numpy()
    np.testing.assert_allclose(np.asarray(out), 0.2 * want, atol=1e-5, rtol=0)
    n = 2 * 3 * 4  # B * h * w
    pairs = [(("dense_branch1", "bn"), "dense_branch1.bn.", n)]
    pairs += [((f"dense_branch{i}_{j}", "bn"), f"dense_branch{i}.{j}.bn.", n) for i in (2, 3) for j in (0, 1)]
    _check_running_stats(updates["batch_stats"], before, ref.state_dict(), pairs)


def test_dense_aligner_dropout_only_in_training():
    _, model, variables, x, words, grid = _aligner_setup(dropout=0.5)
    kw = dict(grid=grid, num_prefix=5, mutable=["batch_stats"])
    a, _ = model.apply(variables, x, words, train=True, rngs={"dropout": jax.random.key(1)}, **kw)
    b, _ = model.apply(variables, x, words, train=True, rngs={"dropout": jax.random.key(2)}, **kw)
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    e1 = model.apply(variables, x, words, grid=grid, num_prefix=5, train=False)
    e2 = model.apply(variables, x, words, grid=grid, num_prefix=5, train=False)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))


def test_dense_aligner_rejects_wrong_grid():
    _, model, variables, x, words, _ = _aligner_setup()
    with pytest.raises(ValueError, match="grid"):
        model.apply(variables, x, words, grid=(4, 4), num_prefix=5, train=False)


# ------------------------------------------------------------------------------------------------- neck
def _neck_setup(seed=0, in_dim=24, dim=16, heads=4, b=2, h=3, w=5, text_dim=16):
    from torch_ref.detris_parts import Neck as RefNeck
    from torch_ref.detris_parts import randomize

    torch.manual_seed(seed)
    ref = RefNeck(in_dim, dim, heads, text_dim).eval()
    randomize(ref, seed)
    rng = np.random.default_rng(seed)
    # Three maps on different scales, as the pre-norm taps and the post-norm output are.
    maps = [(rng.normal(size=(b, h, w, in_dim)) * s).astype(np.float32) for s in (3.0, 1.0, 0.5)]
    state = rng.normal(size=(b, text_dim)).astype(np.float32)
    model = DetrisNeck(dim=dim, num_heads=heads)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), maps, state)
    expected = {col: {"neck": shapes[col]} for col in ("params", "batch_stats")}
    sd = _state_dict(ref, "neck.")
    variables = _reroot(convert(sd, neck_rules(num_heads=heads), expected, ignore=IGNORE), "neck")
    return ref, model, variables, maps, state


def _torch_neck(ref, maps, state):
    with torch.no_grad():
        out = ref([_t(m).permute(0, 3, 1, 2) for m in maps], _t(state))
    return out.permute(0, 2, 3, 1).numpy()


def test_coord_features_layout():
    c = coord_features(3, 5)
    assert c.shape == (3, 5, 2)
    np.testing.assert_allclose(c[0, :, 0], np.linspace(-1, 1, 5))  # x along the width
    np.testing.assert_allclose(c[:, 0, 1], np.linspace(-1, 1, 3))  # y along the height
    np.testing.assert_array_equal(c[0, :, 0], c[2, :, 0])


def test_neck_eval_parity():
    ref, model, variables, maps, state = _neck_setup()
    out, extra = model.apply(variables, maps, state, train=False)
    assert extra is None and out.shape == (2, 3, 5, 16)
    np.testing.assert_allclose(np.asarray(out), _torch_neck(ref, maps, state), atol=1e-5, rtol=0)


def test_neck_train_parity_and_running_stats():
    ref, model, variables, maps, state = _neck_setup(seed=3)
    (out, _), updates = model.apply(variables, maps, state, train=True, mutable=["batch_stats"])
    ref.train()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    np.testing.assert_allclose(np.asarray(out), _torch_neck(ref, maps, state), atol=1e-5, rtol=0)
    n = 2 * 3 * 5
    pairs = [((f"{k}_1",), f"{k}.1.", n) for k in ("f3_proj", "f4_proj", "f5_proj", "aggr")]
    pairs += [(("coordconv_0_conv1_1",), "coordconv.0.conv1.1.", n), (("coordconv_1_1",), "coordconv.1.1.", n)]
    _check_running_stats(updates["batch_stats"], before, ref.state_dict(), pairs)


def test_neck_rules_report_a_renamed_key():
    ref, model, variables, maps, state = _neck_setup()
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), maps, state)
    expected = {col: {"neck": shapes[col]} for col in ("params", "batch_stats")}
    sd = _state_dict(ref, "neck.")
    sd["neck.coordconv.1.1.runing_var"] = sd.pop("neck.coordconv.1.1.running_var")
    with pytest.raises(ConversionError) as e:
        convert(sd, neck_rules(num_heads=4), expected, ignore=IGNORE, source="neck.pth")
    msg = str(e.value)
    assert "'neck.coordconv.1.1.runing_var'" in msg and "batch_stats/neck/coordconv_1_1/var" in msg


def test_adapter_batch_statistics_are_global_under_sharding():
    """Under jit with the batch sharded over 8 devices, the Dense Aligner's BatchNorm statistics are those of the
    whole batch (SyncBatchNorm's), not per-device ones."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = DenseAligner(width=16, dim=16, text_dim=8, num_heads=2, dropout=0.0)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 5 + 4, 16)) * np.arange(1, 9)[:, None, None]).astype(np.float32)
    words = rng.normal(size=(8, 3, 8)).astype(np.float32)
    kw = dict(grid=(2, 2), num_prefix=5)
    variables = model.init(jax.random.key(0), x, words, train=False, **kw)
    # DETRIS's std-0.02 Linears leave the cross-attention near-uniform, so the conv branches (and their batch
    # statistics) barely reach the output; Kaiming-scaled Linears (fan_in = rows of the 2-D kernels) make them show.
    variables = jax.tree.map(lambda a: a / 0.02 * (2.0 / a.shape[0]) ** 0.5 if a.ndim == 2 else a, variables)

    def f(v, x, t):
        return model.apply(v, x, t, train=True, mutable=["batch_stats"], **kw)

    want_out, want_stats = jax.jit(f)(variables, x, words)
    shard = NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), PartitionSpec("data"))
    got_out, got_stats = jax.jit(f)(variables, jax.device_put(x, shard), jax.device_put(words, shard))
    assert len(got_out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    alone, _ = jax.jit(f)(variables, x[:1], words[:1])  # one sample's own statistics give other numbers
    assert np.abs(np.asarray(alone[0] - want_out[0])).max() > 1e-3
