"""Configs take the dataset as their argument (``configs/wimfris_b.py:refcoco+``), and the one data-source builder
reads the dataset the config names, for every dataset and both readers (refer layout, tensorflow-datasets)."""

import pytest
from fake_refcoco import write_fake_refcoco

from configs.common import DATASETS
from data_pipeline.refer import load_refs
from data_pipeline.sources import SourceError, build_source
from wimfris_jax.config import ConfigError, apply_overrides, load_config

CONFIGS = ("configs/wimfris_b.py", "configs/wimfris_l.py", "configs/detris_b.py", "configs/detris_l.py")


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer")
    write_fake_refcoco(str(root), num_images=6)
    return str(root)


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_the_config_argument_sets_every_dataset_field_and_one_word_length(path, dataset):
    config = load_config(f"{path}:{dataset}")
    want = DATASETS[dataset]
    for key in ("tfds_config", "dataset", "split_by", "eval_splits"):
        assert config.data[key] == want[key], key
    assert config.model.word_len == config.data.word_len == want["word_len"]
    apply_overrides(config, ["model.word_len=30"])  # one value: the data pipeline follows the model
    assert config.data.word_len == 30


def test_default_argument_is_refcoco_and_bad_arguments_are_one_line_errors():
    assert load_config("configs/wimfris_b.py").data.tfds_config == "refcoco_unc"
    with pytest.raises(ConfigError, match=r"'coco' is not a dataset; choose one of \['refcoco'"):
        load_config("configs/wimfris_b.py:coco")
    with pytest.raises(ConfigError, match="takes no argument"):
        load_config("configs/tiny.py:refcoco")


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_the_refer_source_reads_the_configs_dataset(dataset, refer_root):
    config = load_config(f"configs/wimfris_b.py:{dataset}")
    apply_overrides(config, ["data.name=refer", f"data.data_root={refer_root}"])
    want = DATASETS[dataset]
    refs = load_refs(f"{refer_root}/{want['dataset']}/refs({want['split_by']}).p")
    for split in ("train", *want["eval_splits"]):
        source = build_source(config.data, split)
        in_split = [r for r in refs if r["split"] == split]
        n = len(in_split) if split == "train" else sum(len(r["sentences"]) for r in in_split)
        assert len(source) == n > 0, (dataset, split)  # train: one example per object; eval: per sentence
        assert {source[i]["ann_id"] for i in range(len(source))} == {r["ann_id"] for r in in_split}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_the_tfds_source_reads_the_configs_dataset(dataset, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    asked = []
    monkeypatch.setattr(tfds, "data_source", lambda name, split, **kw: asked.append((name, split)) or [])
    config = load_config(f"configs/detris_b.py:{dataset}")
    for split in ("train", *DATASETS[dataset]["eval_splits"]):
        build_source(config.data, split)
    tfds_split = {"val": "validation"}
    want = [(f"ref_coco/{DATASETS[dataset]['tfds_config']}", tfds_split.get(s, s)) for s in ("train",
            *DATASETS[dataset]["eval_splits"])]  # fmt: skip
    assert asked == want


def test_unknown_source_name_is_a_one_line_error():
    config = load_config("configs/wimfris_b.py")
    apply_overrides(config, ["data.name=coco"])
    with pytest.raises(SourceError, match="config.data.name='coco'"):
        build_source(config.data, "train")
