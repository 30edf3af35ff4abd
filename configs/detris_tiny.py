r"""Tiny DETRIS for tests, smoke runs and compile checks: DETRIS's parts (D-MoC text adapters, Dense Aligners, the
DETRIS neck) on configs/tiny.py's toy backbones and synthetic data, random weights.

D-MoC (d = 16) and Dense Aligners (d = 16, 2 heads) at layers 1 and 3 of the 4-block towers, neck taps at blocks
1 and 2 (C = 64, 4 heads), 1 decoder layer; 64x64 logits from 128x128 images.

Run::

    wimfris train --config configs/detris_tiny.py --workdir /tmp/detris_tiny

Expected: the loss falls within a few hundred steps, as configs/tiny.py's.
"""

from configs import tiny
from configs.detris_b import model_config


def get_config():
    config = tiny.get_config()
    t = config.model
    model = model_config(vision=dict(t.vision), vision_layers=(1, 3), neck_taps=(1, 2))
    model.image_size, model.word_len, model.text = t.image_size, t.word_len, dict(t.text)
    model.text_adapter.update(dict(layers=(1, 3), dim=16))
    model.vision_adapter.update(dict(dim=16, num_heads=2))
    model.neck.update(dict(dim=t.neck.dim, num_heads=4))
    model.decoder = dict(t.decoder)
    config.model = model
    return config
