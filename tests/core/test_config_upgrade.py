"""The adapter schema (text_adapter / vision_adapter with a kind): run configs written before it load, upgraded to
the same model (same parameter tree), and old keys in a hand-written config fail with one clear line."""

import json

import jax
import pytest

from wimfris_jax.config import ConfigError, load_config, read_run_config, upgrade_model_config
from wimfris_jax.model import build_model
from wimfris_jax.summary import abstract_params

TINY = "configs/tiny.py"


def _legacy_wimfris(model: dict) -> dict:
    """config.model of configs/tiny.py as the schema before the change wrote it."""
    model = dict(model)
    text, vision = dict(model.pop("text_adapter")), dict(model.pop("vision_adapter"))
    assert text.pop("kind") == "mta" and vision.pop("kind") == "msa"
    model.update(use_mta=True, mta_layers=list(text.pop("layers")), mta_scale=text.pop("scale"), mta=text)
    model.update(use_msa=False, msa_layers=list(vision.pop("layers")), msa=vision)  # MSA switched off (Table 3b)
    return model


def _shapes(model_config) -> dict:
    return jax.tree.map(lambda x: x.shape, abstract_params(model_config))


def test_run_config_json_in_the_old_schema_builds_the_same_model(tmp_path):
    config = load_config(TINY)
    saved = json.loads(config.to_json_best_effort())
    saved["model"] = _legacy_wimfris(saved["model"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"upgraded to the adapter schema \(old keys \['use_mta'"):
        upgraded = read_run_config(str(path))
    assert upgraded.model.text_adapter.kind == "mta" and upgraded.model.vision_adapter.kind == "none"
    assert tuple(upgraded.model.text_adapter.layers) == (1, 3) and upgraded.model.text_adapter.dim == 32
    config.model.vision_adapter.kind = "none"
    params = _shapes(upgraded.model)
    assert params == _shapes(config.model)
    assert {"mta_1", "mta_3"} <= set(params) and not any(k.startswith("msa_") for k in params)


def test_old_detris_schema_upgrades_to_dmoc_and_dense_aligner():
    new = load_config("configs/detris_b.py").model.to_dict()
    old = dict(new, adapter_kind="detris")
    for key in ("text_adapter", "vision_adapter"):
        old[key] = {k: v for k, v in new[key].items() if k != "kind"}
    upgraded, replaced = upgrade_model_config(old)
    assert replaced == ["adapter_kind"]
    assert upgraded == new
    assert upgrade_model_config(new) == (new, [])


def test_old_keys_in_a_config_name_the_new_schema():
    config = load_config(TINY)
    config.model.use_mta = True
    with pytest.raises(ConfigError, match=r"old adapter keys \['use_mta'\]; write text_adapter / vision_adapter"):
        build_model(config.model)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("text_adapter.kind", "msa", r"text_adapter.kind='msa': choose one of \['dmoc', 'mta', 'none'\]"),
        ("vision_adapter.kind", "lora", r"vision_adapter.kind='lora': choose one of \['dense_aligner', 'msa'"),
        ("vision_adapter.kernel", 3, r"vision_adapter: \['kernel'\] are not sizes of 'msa'"),
        ("text_adapter.layers", (1, 9), r"text_adapter.layers: \[9\] outside the backbone's 0..3"),
    ],
)
def test_bad_adapter_settings_fail_with_one_line(key, value, message):
    config = load_config(TINY)
    group, leaf = key.split(".")
    config.model[group][leaf] = value
    with pytest.raises(ConfigError, match=message):
        build_model(config.model)
