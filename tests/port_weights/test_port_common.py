"""The converter core reports every bad key at once and maps names through its rule table."""

import ml_dtypes
import numpy as np
import pytest

from port_weights.common import ConversionError, Rule, UpcastWarning, conv2d, convert, convert_with_dtypes, linear

RULES = [
    Rule(r"blocks\.(\d+)\.fc\.weight", r"block_\1/fc/kernel", linear),
    Rule(r"blocks\.(\d+)\.fc\.bias", r"block_\1/fc/bias"),
    Rule(r"conv\.weight", "conv/kernel", conv2d),
    Rule(r"qkv\.weight", "attn", lambda w: {n: linear(x) for n, x in zip("qkv", np.split(w, 3))}),
]


def _sd():
    rng = np.random.default_rng(0)
    return {
        "blocks.0.fc.weight": rng.normal(size=(3, 2)),
        "blocks.0.fc.bias": rng.normal(size=(3,)),
        "conv.weight": rng.normal(size=(4, 2, 3, 5)),
        "qkv.weight": rng.normal(size=(6, 2)),
    }


def _expected():
    def z(s):
        return np.zeros(s, np.float32)

    return {
        "block_0": {"fc": {"kernel": z((2, 3)), "bias": z((3,))}},
        "conv": {"kernel": z((3, 5, 2, 4))},
        "attn": {"q": z((2, 2)), "k": z((2, 2)), "v": z((2, 2))},
    }


def test_convert_maps_and_transforms():
    sd = _sd()
    p = convert(sd, RULES, _expected())
    np.testing.assert_array_equal(p["block_0"]["fc"]["kernel"], sd["blocks.0.fc.weight"].T.astype(np.float32))
    assert p["conv"]["kernel"][1, 4, 0, 3] == np.float32(sd["conv.weight"][3, 0, 1, 4])
    np.testing.assert_array_equal(p["attn"]["k"], sd["qkv.weight"][2:4].T.astype(np.float32))
    assert p["conv"]["kernel"].dtype == np.float32


def test_convert_reports_every_problem_at_once():
    sd = _sd()
    sd["blocks.0.fc.weigth"] = sd.pop("blocks.0.fc.weight")  # renamed
    sd["conv.weight"] = sd["conv.weight"][:, :, :, :3]  # mis-shaped
    sd["extra.thing"] = np.zeros(2)
    with pytest.raises(ConversionError) as e:
        convert(sd, RULES, _expected(), source="ckpt.pth")
    msg = str(e.value)
    assert "3 problem" not in msg and "4 problem(s)" in msg
    assert "'blocks.0.fc.weigth'" in msg and "'extra.thing'" in msg
    assert "missing: the model's 'block_0/fc/kernel'" in msg
    assert "shape (3, 3, 2, 4)" in msg and msg.startswith("ckpt.pth")


def test_without_expected_floats_become_float32_and_integers_stay():
    sd = {"blocks.0.fc.weight": np.full((3, 2), 1.5, ml_dtypes.bfloat16), "blocks.0.fc.bias": np.arange(3)}
    with pytest.warns(UpcastWarning, match=r"^ckpt: upcast 1 bfloat16 tensor\(s\) to float32$"):
        p, dtypes = convert_with_dtypes(sd, RULES, source="ckpt")
    assert p["block_0"]["fc"]["kernel"].dtype == np.float32 and p["block_0"]["fc"]["kernel"][1, 2] == 1.5
    assert p["block_0"]["fc"]["bias"].dtype == np.int64 and dtypes == {"bfloat16": 1, "int64": 1}


def test_ignore_patterns_drop_known_keys():
    sd = _sd()
    sd["head.weight"] = np.zeros((1,))
    convert(sd, RULES, _expected(), ignore=[r"head\..*"])


def test_split_in_proj_matches_torch_multihead_attention():
    import flax.linen as nn
    import jax
    import torch

    from port_weights.common import heads_out, split_in_proj

    torch.manual_seed(0)
    c, h = 8, 2
    mha = torch.nn.MultiheadAttention(c, h, batch_first=True).eval()
    sd = {k: v.detach().numpy() for k, v in mha.state_dict().items()}
    rules = [
        Rule(r"in_proj_(weight|bias)", "", split_in_proj(h)),
        Rule(r"out_proj\.weight", "out/kernel", heads_out(h)),
        Rule(r"out_proj\.bias", "out/bias"),
    ]
    flax_mha = nn.MultiHeadDotProductAttention(num_heads=h, qkv_features=c, out_features=c)
    q = np.random.default_rng(0).normal(size=(2, 5, c)).astype(np.float32)
    kv = np.random.default_rng(1).normal(size=(2, 3, c)).astype(np.float32)
    expected = jax.eval_shape(flax_mha.init, jax.random.key(0), q, kv)["params"]
    params = convert(sd, rules, expected)
    ours = flax_mha.apply({"params": params}, q, kv)
    ref = mha(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv), need_weights=False)[0]
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=1e-5)
