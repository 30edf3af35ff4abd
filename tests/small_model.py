"""The tiny WIMFRIS (configs/tiny.py) shrunk further, for tests that compile it often: every module kind, fewer
layers and pixels. ``--set`` items (``KEY=VALUE``); :func:`small_tiny_config` applies them in-process."""

from wimfris_jax.config import apply_overrides, load_config

# 2 + 2 layers, 64x64 images: a few seconds a train step on a loaded 2-core machine
SMALL_MODEL = (
    "model.vision.depth=2", "model.text.depth=2", "model.text_adapter.layers=(1,)", "model.vision_adapter.layers=(1,)",
    "model.neck_taps=(0,1)", "model.image_size=64", "model.vision.pos_grid=8", "data.image_size=64",
    "data.mask_size=32", "data.raw_size=64", "data.num_train=400",
)  # fmt: skip


def small_tiny_config():
    """configs/tiny.py with :data:`SMALL_MODEL` applied."""
    return apply_overrides(load_config("configs/tiny.py"), list(SMALL_MODEL))
