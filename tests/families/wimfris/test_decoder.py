"""DETRIS decoder + projector: position tables, parity with a PyTorch reference through the weight converter
(eval and train mode, key padding mask), global BatchNorm statistics under a sharded batch."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from port_weights.common import ConversionError, convert
from port_weights.detris import IGNORE, decoder_rules, projector_rules
from wimfris_jax.families.wimfris.decoder import Decoder, Projector, dynamic_conv, pos1d, pos2d


class Head(nn.Module):
    """Decoder + Projector under the names a full model uses ("decoder", "projector")."""

    d_model: int
    num_heads: int
    dim_ffn: int
    num_layers: int
    word_dim: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, vis, words, pad_mask, state, *, train: bool):
        dec = Decoder(self.num_layers, self.d_model, self.num_heads, self.dim_ffn, self.dropout, name="decoder")
        fq = dec(vis, words, pad_mask, deterministic=not train)
        return fq, Projector(self.word_dim, self.d_model, name="projector")(fq, state, train=train)


def _setup(d_model, heads, dim_ffn, layers, word_dim, b, h, w, lengths, seed=0):
    import torch

    from torch_ref.detris_head import DetrisHead

    torch.manual_seed(seed)
    ref = DetrisHead(d_model, heads, dim_ffn, layers, word_dim).eval()
    ref.randomize(seed)
    rng = np.random.default_rng(seed)
    seq = max(lengths)
    vis = rng.normal(size=(b, h, w, d_model)).astype(np.float32)
    words = rng.normal(size=(b, seq, d_model)).astype(np.float32)
    state = rng.normal(size=(b, word_dim)).astype(np.float32)
    pad = np.arange(seq)[None, :] >= np.asarray(lengths)[:, None]  # (B, L), True = padding
    model = Head(d_model, heads, dim_ffn, layers, word_dim)
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), vis, words, pad, state)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    rules = decoder_rules(num_heads=heads) + projector_rules()
    variables = convert(sd, rules, expected, ignore=IGNORE, source="DetrisHead")
    return ref, model, variables, (vis, words, pad, state)


def _torch_forward(ref, vis, words, pad, state):
    import torch

    with torch.no_grad():
        fq = ref.decoder(torch.from_numpy(vis).permute(0, 3, 1, 2), torch.from_numpy(words), torch.from_numpy(pad))
        logits = ref.proj(fq, torch.from_numpy(state))[:, 0]
    return fq.permute(0, 2, 3, 1).numpy(), logits.numpy()


# ------------------------------------------------------------------------------------------- positions
def test_pos2d_layout_by_hand():
    c, half = 16, 8
    pe = pos2d(3, 5, c)  # (H, W, C)
    assert pe.shape == (3, 5, 16) and pe.dtype == np.float32
    y, x = 2, 4
    for i in range(half // 2):
        f = 10000.0 ** (-2 * i / half)
        np.testing.assert_allclose(pe[y, x, 2 * i], math.sin(x * f), atol=1e-6)
        np.testing.assert_allclose(pe[y, x, 2 * i + 1], math.cos(x * f), atol=1e-6)
        np.testing.assert_allclose(pe[y, x, half + 2 * i], math.sin(y * f), atol=1e-6)
        np.testing.assert_allclose(pe[y, x, half + 2 * i + 1], math.cos(y * f), atol=1e-6)
    np.testing.assert_array_equal(pe[0, :, :half], pe[2, :, :half])  # x half ignores the row
    np.testing.assert_array_equal(pe[:, 1, half:], pe[:, 3, half:])  # y half ignores the column
    with pytest.raises(ValueError, match="divisible by 4"):
        pos2d(2, 2, 18)


def test_pos1d_layout_by_hand():
    pe = pos1d(4, 8)
    assert pe.shape == (4, 8)
    np.testing.assert_allclose(
        pe[3, [0, 1, 2, 3, 6, 7]],
        [math.sin(3), math.cos(3), math.sin(3 / 10), math.cos(3 / 10), math.sin(3e-3), math.cos(3e-3)],
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="even"):
        pos1d(4, 7)


def test_position_tables_match_reference():
    from torch_ref.detris_head import sine_1d, sine_2d

    np.testing.assert_allclose(pos2d(4, 6, 32), sine_2d(4, 6, 32).permute(1, 2, 0).numpy(), atol=1e-6)
    np.testing.assert_allclose(pos1d(17, 512), sine_1d(17, 512).numpy(), atol=1e-6)


# ---------------------------------------------------------------------------------------------- parity
def test_eval_parity_small_with_padding():
    ref, model, variables, (vis, words, pad, state) = _setup(32, 4, 48, 2, 24, 2, 6, 6, lengths=(5, 3))
    assert set(variables) == {"params", "batch_stats"}
    fq, logits = model.apply(variables, vis, words, pad, state, train=False)
    fq_ref, logits_ref = _torch_forward(ref, vis, words, pad, state)
    assert fq.shape == (2, 6, 6, 32) and logits.shape == (2, 24, 24)
    np.testing.assert_allclose(np.asarray(fq), fq_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), logits_ref, atol=1e-5, rtol=0)

    # The key padding mask: padded word features do not matter, real ones do.
    words2 = words.copy()
    words2[1, 3:] += 5.0
    fq2, _ = model.apply(variables, vis, words2, pad, state, train=False)
    np.testing.assert_allclose(np.asarray(fq2), np.asarray(fq), atol=1e-6, rtol=0)
    words2[1, 2] += 1.0
    fq3, _ = model.apply(variables, vis, words2, pad, state, train=False)
    assert np.abs(np.asarray(fq3[1] - fq[1])).max() > 1e-2 and np.abs(np.asarray(fq3[0] - fq[0])).max() == 0


def test_train_mode_projector_batch_statistics():
    import torch

    ref, model, variables, (vis, words, pad, state) = _setup(32, 4, 32, 1, 32, 3, 5, 4, lengths=(4, 2, 1), seed=1)
    fq, _ = _torch_forward(ref, vis, words, pad, state)  # eval-mode decoder output feeds both projectors
    proj = Projector(32, 32)
    pvars = {"params": variables["params"]["projector"], "batch_stats": variables["batch_stats"]["projector"]}
    out, updates = proj.apply(pvars, fq, state, train=True, mutable=["batch_stats"])
    ref.proj.train()
    old = {k: v.clone() for k, v in ref.proj.state_dict().items()}
    with torch.no_grad():
        out_ref = ref.proj(torch.from_numpy(fq).permute(0, 3, 1, 2), torch.from_numpy(state))[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(out), out_ref, atol=1e-5, rtol=0)
    # Batch statistics, not the (random) running ones, were used: eval mode gives something else.
    assert np.abs(np.asarray(proj.apply(pvars, fq, state, train=False)) - out_ref).max() > 1e-2
    new = ref.proj.state_dict()
    for idx, n in ((1, 3 * 10 * 8), (3, 3 * 20 * 16)):  # pixels per BatchNorm: B * H * W at its resolution
        stats = updates["batch_stats"][f"vis_{idx}_1"]
        np.testing.assert_allclose(stats["mean"], new[f"vis.{idx}.1.running_mean"].numpy(), atol=1e-6)
        # PyTorch feeds the unbiased batch variance into the running average, flax the biased one.
        rv0, rv1 = old[f"vis.{idx}.1.running_var"].numpy(), new[f"vis.{idx}.1.running_var"].numpy()
        biased = (rv1 - 0.9 * rv0) / 0.1 * (n - 1) / n
        np.testing.assert_allclose(stats["var"], 0.9 * rv0 + 0.1 * biased, atol=1e-6)
        assert np.abs(stats["var"] - rv0).max() > 1e-2  # it moved


def test_batchnorm_statistics_are_global_under_sharding():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    proj = Projector(word_dim=8, in_dim=8)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 3, 3, 8)) * np.arange(1, 9)[:, None, None, None], jnp.float32)
    state = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    variables = proj.init(jax.random.key(0), x, state, train=False)

    def f(v, x, s):
        return proj.apply(v, x, s, train=True, mutable=["batch_stats"])

    want_out, want_stats = jax.jit(f)(variables, x, state)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data"))
    got_out, got_stats = jax.jit(f)(variables, jax.device_put(x, shard), jax.device_put(state, shard))
    assert len(got_out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    # Per-sample statistics would differ: one sample's own normalisation gives other numbers.
    alone, _ = jax.jit(f)(variables, x[:1], state[:1])
    assert np.abs(np.asarray(alone[0] - want_out[0])).max() > 1e-2


@pytest.mark.slow
def test_eval_parity_full_size():
    ref, model, variables, (vis, words, pad, state) = _setup(512, 8, 512, 3, 512, 1, 32, 32, lengths=(9,))
    words = np.concatenate([words, np.zeros((1, 8, 512), np.float32)], 1)  # L = 17, 8 padded
    pad = np.arange(17)[None] >= 9
    fq, logits = jax.jit(lambda *a: model.apply(variables, *a, train=False))(vis, words, pad, state)
    fq_ref, logits_ref = _torch_forward(ref, vis, words, pad, state)
    assert logits.shape == (1, 128, 128)
    np.testing.assert_allclose(np.asarray(fq), fq_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), logits_ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------- details
def test_dynamic_conv_by_hand():
    x = np.zeros((1, 3, 3, 2), np.float32)
    x[0, 1, 1] = [1.0, 2.0]  # one lit pixel in the centre
    k = np.zeros((1, 2, 3, 3), np.float32)
    k[0, 0, 0, 2] = 10.0  # top-right tap of channel 0
    k[0, 1, 1, 1] = 100.0  # centre tap of channel 1
    out = np.asarray(dynamic_conv(jnp.asarray(x), jnp.asarray(k), jnp.asarray([0.5])))
    want = np.full((3, 3), 0.5, np.float32)
    want[1, 1] += 200.0  # centre sees the pixel through the centre tap
    want[2, 0] += 10.0  # cross-correlation: output (y, x) reads x_pad[y + i, x + j]; (2, 0) + (0, 2) - 1 = (1, 1)
    np.testing.assert_allclose(out[0], want)


def test_dropout_is_active_only_when_not_deterministic():
    dec = Decoder(num_layers=1, d_model=16, num_heads=2, dim_ffn=16, dropout=0.5)
    rng = np.random.default_rng(0)
    vis, words = rng.normal(size=(1, 2, 2, 16)).astype(np.float32), rng.normal(size=(1, 3, 16)).astype(np.float32)
    pad = np.array([[False, False, True]])
    v = dec.init(jax.random.key(0), vis, words, pad, deterministic=True)
    a = dec.apply(v, vis, words, pad, deterministic=True)
    b = dec.apply(v, vis, words, pad, deterministic=False, rngs={"dropout": jax.random.key(1)})
    c = dec.apply(v, vis, words, pad, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(a - b)).max() > 1e-3 and np.abs(np.asarray(b - c)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(a), np.asarray(dec.apply(v, vis, words, pad, deterministic=True)))


def test_converter_reports_bad_checkpoints():
    ref, model, variables, (vis, words, pad, state) = _setup(16, 2, 16, 1, 16, 1, 2, 2, lengths=(2,))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), vis, words, pad, state)
    sd["proj.txt.weight"] = sd["proj.txt.weight"][:-1]
    del sd["decoder.layers.0.norm2.bias"]
    with pytest.raises(ConversionError) as e:
        convert(sd, decoder_rules(num_heads=2) + projector_rules(), expected, ignore=IGNORE, source="x.pth")
    msg = str(e.value)
    assert "'proj.txt.weight'" in msg and "shape (16, 72) from the checkpoint, the model expects (16, 73)" in msg
    assert "missing: the model's 'params/decoder/layers_0/norm2/bias'" in msg
