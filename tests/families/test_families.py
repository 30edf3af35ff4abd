"""A new model family is one package and one registry row: a toy family registered at run time builds, trains
through :func:`wimfris_jax.train.loop.train` (model and loss taken from its row), keeps its untrainable parameters
frozen, is summarised by its own groups and checked by its own structural rule -- with no other code changed."""

import json

import jax
import numpy as np
import pytest
from toy_model import ToyModel, ToySource, identity_transform, toy_config, toy_loss

from wimfris_jax import model as model_lib
from wimfris_jax.config_check import model_problems
from wimfris_jax.families import Family
from wimfris_jax.summary import abstract_params, count_params
from wimfris_jax.train.loop import train


def build_toy(model_config, dtype=None, remat_mode="none"):
    return ToyModel(width=int(model_config.get("width", 16)))


def check_toy(model_config, module) -> list[str]:
    return [] if module.width % 4 == 0 else [f"config.model.width={module.width}: must be a multiple of 4"]


TOY = Family(
    name="toy",
    build=build_toy,
    loss=lambda model_config, outputs, mask: toy_loss(outputs, mask),
    untrainable=(r"^head/bias$",),  # as a family lists what no loss can train
    summary_groups=(("FiLM text", "text"), ("neck", "neck_"), ("head", "head")),
    check=check_toy,
)


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(model_lib.FAMILIES, TOY.name, TOY)
    config = toy_config(epochs=1, steps_per_epoch=6, trainable=(".*",))
    config.model.update(family="toy", width=8, image_size=16, word_len=4)
    return config


def test_a_registered_family_builds_trains_and_is_summarised(toy_family, tmp_path):
    config = toy_family
    model, loss = model_lib.training_model(config)
    assert isinstance(model, ToyModel) and model.width == 8
    assert model_lib.trainable_patterns(config) == (".*", "!^head/bias$")

    params = abstract_params(config.model)
    counts = count_params(params, model_lib.trainable_patterns(config), config.model)
    assert list(counts)[:5] == ["vision backbone", "FiLM text", "neck", "head", "trainable"]
    assert counts["head"] == 8 + 1 and counts["total"] - counts["trainable"] == 1  # the head's bias is frozen

    state = train(config, str(tmp_path), train_source=ToySource(48, 16, 4), transform=identity_transform)
    assert int(state.step) == 6
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]  # fmt: skip
    assert losses[-1] < losses[0]
    trained = state.variables()["params"]
    init = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), np.ones((1, 4), np.int32), train=False
    )["params"]
    assert float(trained["head"]["bias"][0]) == float(init["head"]["bias"][0])  # untrainable: never stepped
    assert not np.allclose(trained["head"]["kernel"], init["head"]["kernel"])


def test_a_family_brings_its_own_structural_check(toy_family):
    config = toy_family
    assert model_problems(config.model) == []
    config.model.width = 6
    assert model_problems(config.model) == ["config.model.width=6: must be a multiple of 4"]
    config.model.family = "nope"
    with pytest.raises(ValueError, match=r"config.model.family='nope': choose one of \['tfanet', 'toy', 'vipa', "):
        model_lib.build_model(config.model)
