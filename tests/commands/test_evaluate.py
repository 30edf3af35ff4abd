"""evaluate(): an oracle model scores mIoU 1 with the true sentences and 0 with swapped ones; batching, padding,
sharding and max_examples leave the scores unchanged; the synthetic eval splits are disjoint from training."""

import jax
import numpy as np
import pytest

from data_pipeline.preprocess import letterbox_image, letterbox_mask, nearest_downsample, normalize
from data_pipeline.sources import SourceError, build_source
from data_pipeline.synthetic import SyntheticRefer
from data_pipeline.tokenizer import tokenize
from wimfris_jax.errors import UserError
from wimfris_jax.evaluate import EvalError, data_settings, evaluate
from wimfris_jax.train.state import TrainState


class OracleModel:
    """Not a network: logits (B, m, m) = +-10 on the mask of the object each sentence names, looked up on the
    host (``jax.pure_callback``, so it runs inside evaluate's jit) by (preprocessed image, ids)."""

    def __init__(self, source: SyntheticRefer, image_size: int, logit_size: int, word_len: int = 17):
        self.logit_size = logit_size
        self.table = {}
        for i in range(len(source)):
            scene = source.scene(i)
            key_image = normalize(letterbox_image(scene["image"], image_size)).tobytes()
            for sentence, obj in (
                (scene["sentence"], scene["target"]),
                (scene["distractor_sentence"], scene["distractor"]),
            ):
                soft = letterbox_mask(scene["object_masks"][obj], image_size)
                logits = np.where(nearest_downsample(soft, logit_size) > 0.5, 10.0, -10.0).astype(np.float32)
                self.table[(key_image, tokenize(sentence, word_len)[0].tobytes())] = logits
        self.calls = 0

    def _lookup(self, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
        self.calls += 1
        images, ids = np.asarray(images), np.asarray(ids)
        return np.stack([self.table[(im.tobytes(), t.tobytes())] for im, t in zip(images, ids)])

    def apply(self, variables, images, ids, *, train):
        assert train is False
        shape = jax.ShapeDtypeStruct((images.shape[0], self.logit_size, self.logit_size), np.float32)
        return {"logits": jax.pure_callback(self._lookup, shape, images, ids, vmap_method="sequential")}


def _config(size, word_len=17):
    return {"data": {"image_size": size, "word_len": word_len, "max_size": 128}, "model": {}}


class _Cfg(dict):
    """A minimal config object with attribute access (like ConfigDict's .data / .get)."""

    def __getattr__(self, key):
        value = self[key]
        return _Cfg(value) if isinstance(value, dict) else value


def test_oracle_scores_one_and_swapped_scores_zero():
    source = SyntheticRefer(10, image_size=64, seed=3)
    model = OracleModel(source, image_size=64, logit_size=64)
    cfg = _Cfg(_config(64))
    true = evaluate(model, {}, source, config=cfg, batch_size=4, progress=False)  # batches 4, 4, 2 (+2 padding)
    assert true["n"] == 10
    assert true["mIoU"] == pytest.approx(1.0, abs=1e-6) and true["oIoU"] == pytest.approx(1.0, abs=1e-9)
    assert all(true[f"Prec@{x}"] == 1.0 for x in (0.5, 0.6, 0.7, 0.8, 0.9))
    swapped = evaluate(model, {}, source, config=cfg, batch_size=4, swap_sentences=True, progress=False)
    assert swapped["n"] == 10
    assert swapped["mIoU"] == 0.0 and swapped["Prec@0.5"] == 0.0  # another object, which never overlaps


def test_batching_sharding_and_max_examples_agree():
    source = SyntheticRefer(9, image_size=96, seed=5)  # scored at 96 px from 64 px inputs and 32 x 32 logits
    model = OracleModel(source, image_size=64, logit_size=32)
    cfg = _Cfg(_config(64))
    one = evaluate(model, {}, source, config=cfg, batch_size=1, progress=False)
    assert len(jax.local_devices()) == 8  # tests/conftest.py: batch 8 runs sharded over 8 CPU devices
    sharded = evaluate(model, {}, source, config=cfg, batch_size=8, progress=False)
    assert one == sharded
    assert 0.75 < one["mIoU"] < 0.95  # the oracle's 32 x 32 mask, upsampled: close to the truth, not equal
    head = evaluate(model, {}, source, config=cfg, batch_size=8, max_examples=4, progress=False)
    assert head["n"] == 4
    with pytest.raises(EvalError, match="batch_size must be positive, got 0"):
        evaluate(model, {}, source, config=cfg, batch_size=0)


def test_swap_needs_distractor_sentences():
    class NoDistractor:
        def __init__(self):
            self.inner = SyntheticRefer(2, image_size=64)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            ex = dict(self.inner[i])
            del ex["distractor_sentence"]
            return ex

        def __repr__(self):
            return "NoDistractor()"

    model = OracleModel(SyntheticRefer(2, image_size=64), 64, 64)
    with pytest.raises(ValueError, match=r"distractor_sentence.*image_id=0"):
        evaluate(model, {}, NoDistractor(), config=_Cfg(_config(64)), batch_size=2, swap_sentences=True)


def test_eval_sources_and_settings():
    import ml_collections

    data = ml_collections.ConfigDict(
        {"name": "synthetic", "num_train": 5, "num_val": 3, "raw_size": 64, "seed": 0, "image_size": 64,
         "word_len": 17, "mask_size": 32}
    )  # fmt: skip
    train, val, test = build_source(data, "train"), build_source(data, "val"), build_source(data, "test")
    assert len(val) == len(test) == 3
    images = [s[i]["image"].tobytes() for s in (train, val, test) for i in range(3)]
    assert len(set(images)) == 9  # three disjoint sets of scenes
    with pytest.raises(SourceError, match="unknown split 'bogus'") as info:  # the CLI's one-line errors: a UserError
        build_source(data, "bogus")
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert data_settings(ml_collections.ConfigDict({"data": data, "model": {}})) == {
        "image_size": 64, "word_len": 17, "max_size": 640, "tokenizer": "clip"
    }  # fmt: skip


def test_eval_fn_reads_the_train_state():
    from wimfris_jax.evaluate import make_eval_fn

    source = SyntheticRefer(3, image_size=64, seed=1)
    model = OracleModel(source, 64, 64)
    state = TrainState(step=0, params={}, frozen={}, batch_stats={}, opt_state=(), rng=np.zeros(2, np.uint32))
    out = make_eval_fn(_Cfg(_config(64)), model, source, batch_size=2)(state)
    assert out["n"] == 3 and out["mIoU"] == pytest.approx(1.0, abs=1e-6)
