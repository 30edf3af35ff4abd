"""WIMFRIS losses, eqs. (5)-(10), against values worked out by hand on tiny examples."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wimfris_jax.families.wimfris.losses import wimfris_loss, window_alignment_loss, window_targets
from wimfris_jax.losses import bce_loss, dice_loss, nearest_indices

L3 = math.log(3.0)  # sigmoid(L3) = 0.75, sigmoid(-L3) = 0.25
# Sample 0 of the running example: logits -> probabilities [[0.75, 0.25], [0.5, 0.75]].
LOGITS = np.array([[[L3, -L3], [0.0, L3]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)
MASK = np.array([[[1.0, 0.0], [1.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)


def test_contrastive_loss_by_hand():
    # Sample 0: -ln .75, -ln .75, -ln .5, soft target .5 at p = .75: -(.5 ln .75 + .5 ln .25) = .5 ln(16/3).
    # Sample 1: four pixels at p = .5: ln 2 each.
    s0 = 2 * math.log(4 / 3) + math.log(2) + 0.5 * math.log(16 / 3)  # 2.10549954
    want = (s0 + 4 * math.log(2)) / 8  # 0.60976103
    assert float(bce_loss(LOGITS, MASK)) == pytest.approx(want, abs=1e-6)
    assert want == pytest.approx(0.60976103, abs=1e-7)


def test_contrastive_loss_matches_torch_bce_with_logits():
    import torch

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 8, 8)).astype(np.float32) * 4, rng.uniform(size=(3, 8, 8)).astype(np.float32)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(x), torch.from_numpy(y))
    assert float(bce_loss(x, y)) == pytest.approx(float(ref), abs=1e-6)


def test_dice_loss_by_hand_is_per_sample():
    mask = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)
    # Sample 0: sum pg = .75 + .5 = 1.25, sum p = 2.25, sum g = 2 -> dice = 2.5 / 4.25 = 0.5882353.
    # Sample 1: empty mask -> dice 0. Loss = 1 - (0.5882353 + 0) / 2 = 0.7058824 (a batch-global dice gives 0.6).
    assert float(dice_loss(LOGITS, mask)) == pytest.approx(1 - (2.5 / (4.25 + 1e-6)) / 2, abs=1e-6)
    assert float(dice_loss(LOGITS, mask)) == pytest.approx(0.7058824, abs=1e-6)
    # Perfect, confident prediction -> ~0.
    assert float(dice_loss(np.where(mask > 0, 30.0, -30.0)[:1], mask[:1])) == pytest.approx(0.0, abs=1e-6)


def test_nearest_indices_follow_pytorch():
    import torch

    np.testing.assert_array_equal(nearest_indices(448, 128)[:6], [0, 3, 7, 10, 14, 17])  # floor(3.5 i)
    for n_in, n_out in ((448, 128), (448, 32), (7, 3), (5, 8)):
        x = torch.arange(n_in, dtype=torch.float32)[None, None, :, None].expand(1, 1, n_in, 1)
        ref = torch.nn.functional.interpolate(x, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long().numpy()
        np.testing.assert_array_equal(nearest_indices(n_in, n_out), ref)


def test_window_targets_by_hand():
    mask = np.zeros((1, 8, 8), np.float32)
    mask[0, 2, 6] = 1.0  # sampled (rows/cols 0, 2, 4, 6) -> grid (1, 3) -> window (0, 1) -> j = 1
    mask[0, 3, 0] = 1.0  # odd row: never sampled by the nearest rule
    mask[0, 4, 0] = 0.6  # grid (2, 0) -> window (1, 0) -> j = 2; 0.6 >= 0.5
    mask[0, 6, 6] = 0.4  # grid (3, 3) -> window (1, 1) -> j = 3; 0.4 < 0.5 -> 0
    np.testing.assert_array_equal(window_targets(mask, (4, 4), (2, 2)), [[0.0, 1.0, 1.0, 0.0]])
    # Non-square: grid (2, 4), windows (1, 2) -> j = r * 2 + c // 2; the mask is already at grid size.
    m = np.zeros((2, 2, 4), np.float32)
    m[0, 1, 3] = 1.0  # j = 3
    m[1, 0, 0] = m[1, 1, 1] = 1.0  # j = 0 and j = 2
    np.testing.assert_array_equal(window_targets(m, (2, 4), (1, 2)), [[0, 0, 0, 1], [1, 0, 1, 0]])
    with pytest.raises(ValueError, match="does not tile"):
        window_targets(m, (2, 4), (2, 3))


def test_window_alignment_loss_by_hand():
    logits = np.array([[L3, -L3, 0.0, L3]], np.float32)
    targets = np.array([[1.0, 1.0, 0.0, 0.0]], np.float32)
    # -ln .75, -ln .25, -ln .5, -ln .25 -> mean
    want = (math.log(4 / 3) + math.log(4) + math.log(2) + math.log(4)) / 4  # 0.93435
    assert float(window_alignment_loss(logits, targets)) == pytest.approx(want, abs=1e-6)


def test_wimfris_loss_combines_terms():
    mask = np.repeat(np.repeat(MASK, 2, axis=1), 2, axis=2)  # (2, 4, 4): nearest back to 2x2 gives MASK
    mask[:, 1, :] = 7.0  # odd rows are never read by the 4 -> 2 nearest rule (0, 2)
    wl = np.array([[L3, -L3, 0.0, L3], [0.0, 0.0, 0.0, 0.0]], np.float32)  # grid (2, 2), window (1, 1)
    fn = jax.jit(functools.partial(wimfris_loss, grid=(2, 2), window=(1, 1)))
    total, parts = fn({"logits": LOGITS, "window_logits": wl}, mask)
    con, dice = float(bce_loss(LOGITS, MASK)), float(dice_loss(LOGITS, MASK))
    # Window targets = MASK >= .5 -> [[1, 0, 1, 1], [0, 0, 0, 0]]: -ln .75, -ln .75, -ln .5, -ln .75; 4 x ln 2.
    align = (3 * math.log(4 / 3) + math.log(2) + 4 * math.log(2)) / 8
    assert float(parts["loss_con"]) == pytest.approx(0.60976103, abs=1e-6)
    assert float(parts["loss_dice"]) == pytest.approx(dice, abs=1e-6)
    assert float(parts["loss_align"]) == pytest.approx(align, abs=1e-6)
    assert float(total) == pytest.approx(0.5 * con + 0.3 * dice + 0.2 * align, abs=1e-6)
    # Without window logits the alignment term is absent and the other weights are unchanged.
    total2, parts2 = fn({"logits": LOGITS}, mask)
    assert float(parts2["loss_align"]) == 0.0
    assert float(total2) == pytest.approx(0.5 * con + 0.3 * dice, abs=1e-6)
    with pytest.raises(ValueError, match="window_logits"):
        wimfris_loss({"logits": LOGITS, "window_logits": wl[:, :3]}, mask, grid=(2, 2), window=(1, 1))


def test_loss_falls_under_adam():
    rng = np.random.default_rng(0)
    mask = (rng.uniform(size=(2, 16, 16)) > 0.7).astype(np.float32)
    params = {"logits": jnp.zeros((2, 8, 8)), "window_logits": jnp.zeros((2, 4))}
    opt = optax.adam(0.1)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        (loss, _), g = jax.value_and_grad(functools.partial(wimfris_loss, grid=(4, 4), window=(2, 2)), has_aux=True)(
            p, mask
        )
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
