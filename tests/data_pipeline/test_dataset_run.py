"""``--config configs/wimfris_b.py:refcoco+`` trains and evaluates on RefCOCO+ (the model shrunk to tiny sizes by
``--set``, the data a fake set in the refer layout holding RefCOCO, RefCOCO+ and G-Ref side by side)."""

import json

from fake_refcoco import write_fake_refcoco

from data_pipeline.refer import load_refs
from wimfris_jax.cli import main
from wimfris_jax.config import load_config

MODEL_KEYS = ("image_size", "vision", "text", "neck_taps", "text_adapter", "vision_adapter", "mamba", "neck", "decoder")


def _tiny_model_overrides() -> list[str]:
    tiny = load_config("configs/tiny.py").model
    items = [f"model.{k}={tiny[k].to_dict() if hasattr(tiny[k], 'to_dict') else tiny[k]!r}" for k in MODEL_KEYS]
    return [arg for item in items for arg in ("--set", item)]


def _sentences(refs: list, split: str) -> int:
    return sum(len(r["sentences"]) for r in refs if r["split"] == split)


def test_wimfris_b_refcoco_plus_trains_and_evaluates_on_refcoco_plus(tmp_path, capsys):
    root, run = str(tmp_path / "refer"), str(tmp_path / "run")
    write_fake_refcoco(root, num_images=24)
    plus, unc = load_refs(f"{root}/refcoco+/refs(unc).p"), load_refs(f"{root}/refcoco/refs(unc).p")
    splits = ("val", "testA", "testB")
    assert [_sentences(plus, s) for s in splits] != [_sentences(unc, s) for s in splits]  # the sets are told apart
    data = ["data.name=refer", f"data.data_root={root}", "data.image_size=128", "data.mask_size=64"]
    train = ["train.global_batch_size=8", "train.epochs=1", "train.eval_every_epochs=0", "train.log_every=1",
             "train.ckpt_every=0", "train.trainable=('^projector/',)"]  # fmt: skip
    sets = _tiny_model_overrides() + [arg for item in data + train for arg in ("--set", item)]
    sets += ["--init", "image_encoder=none", "--init", "text_encoder=none"]  # tiny sizes: random backbones

    assert main(["train", "--config", "configs/wimfris_b.py:refcoco+", "--workdir", run, *sets]) == 0
    with open(f"{run}/config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert (saved["data"]["dataset"], saved["data"]["split_by"], saved["data"]["tfds_config"]) == (
        "refcoco+", "unc", "refcocoplus_unc")  # fmt: skip
    with open(f"{run}/metrics.jsonl", encoding="utf-8") as f:
        steps = {row["step"] for row in map(json.loads, f) if any(k.endswith("loss") for k in row)}
    assert len(steps) == sum(r["split"] == "train" for r in plus) // 8  # one epoch over RefCOCO+'s train objects

    capsys.readouterr()
    assert main(["eval", "--checkpoint", run, "--json", f"{tmp_path}/scores.json"]) == 0  # the run's config.json
    with open(f"{tmp_path}/scores.json", encoding="utf-8") as f:
        results = json.load(f)["results"]
    assert list(results) == list(splits)  # the dataset's evaluation splits
    assert [results[s]["n"] for s in splits] == [_sentences(plus, s) for s in splits]
