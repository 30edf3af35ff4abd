"""A new checkpoint family is one rule table and a few functions: the protocol does the rest (layout, config, checks,
every problem at once, dtypes, meta, reading files and config.json)."""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from port_weights.common import ConversionError, Rule, linear
from port_weights.protocol import Family, Layout, convert_family, only_one, port


def _detect(sd, source):
    return only_one([Layout("torch", k[: -len("fc1.weight")]) for k in sd if k.endswith("fc1.weight")], source, "fc1")


def _config(sd, layout, source, hf_config=None):
    return {"hidden": int(np.shape(sd[layout.prefix + "fc1.weight"])[0]), "act": (hf_config or {}).get("act")}


def _rules(layout, config):
    s = re.escape(layout.prefix)
    return [Rule(s + r"(fc\d)\.weight", r"\1/kernel", linear), Rule(s + r"(fc\d)\.bias", r"\1/bias")]


def _expected(layout, config):
    h, z = config["hidden"], np.zeros
    return {
        "fc1": {"kernel": z((3, h), np.float32), "bias": z(h, np.float32)},
        "fc2": {"kernel": z((h, 2), np.float32)},
    }


TOY = Family(
    name="toy",
    detect_layout=_detect,
    infer_config=_config,
    rules=_rules,
    expected=_expected,
    ignore=lambda layout: [r".*\.position_ids"],
    hf_model_type="toy",
)


def _state_dict(prefix=""):
    w1 = np.arange(12, dtype=np.float16).reshape(4, 3)
    return {prefix + "fc1.weight": w1, prefix + "fc1.bias": np.ones(4), prefix + "fc2.weight": np.full((2, 4), 0.5)}


def test_a_new_family_converts_with_the_standard_meta():
    sd = {**_state_dict("net."), "net.position_ids": np.arange(4), "head.weight": np.zeros(1)}
    with pytest.warns(UserWarning, match="upcast 1 float16"):
        params, meta = convert_family(TOY, sd, "toy.pth")
    assert params["fc1"]["kernel"].shape == (3, 4) and params["fc1"]["kernel"][2, 1] == 5.0  # transposed w1[1, 2]
    assert params["fc1"]["kernel"].dtype == np.float32 and params["fc2"]["kernel"][3, 1] == 0.5
    assert meta == {
        "family": "toy",
        "layout": "torch",
        "prefix": "net.",
        "config": {"hidden": 4, "act": None},
        "dropped": ["net.position_ids"],
        "skipped": 1,  # head.weight: not under the prefix
        "source_dtypes": {"float16": 1, "float64": 2},
    }


def test_every_bad_key_is_reported_in_one_error():
    sd = _state_dict()
    sd["fc2.wieght"] = sd.pop("fc2.weight")
    sd["fc1.bias"] = np.ones(5)
    sd["fc3.weight"] = np.ones((1, 1))
    with pytest.raises(ConversionError) as e:
        convert_family(TOY, sd, "toy.pth")
    msg = str(e.value)
    assert msg.startswith("toy.pth: 4 problem(s)")
    assert "unexpected key 'fc2.wieght' (2, 4): no rule maps it" in msg
    assert "'fc3.weight' maps to 'fc3/kernel', which the model does not have" in msg
    assert "'fc1.bias' -> 'fc1/bias': shape (5,) from the checkpoint, the model expects (4,)" in msg
    assert "missing: the model's 'fc2/kernel' (4, 2) has no source key; looked for 'fc2.weight'" in msg
    with pytest.raises(ConversionError, match=r"found 2 \(\['a\.', 'b\.'\]\) fc1; cannot tell"):
        convert_family(TOY, {**_state_dict("a."), **_state_dict("b.")})


def test_port_reads_the_file_and_its_config_json(tmp_path):
    save_file(_state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toy_v2", "act": "relu"}))
    with pytest.warns(UserWarning):
        params, meta = port(TOY, str(tmp_path))
    assert meta["config"] == {"hidden": 4, "act": "relu"} and params["fc1"]["bias"].tolist() == [1.0] * 4
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "other", "act": "relu"}))
    with pytest.warns(UserWarning):
        assert port(TOY, str(tmp_path))[1]["config"]["act"] is None  # another model's config.json is not read
