r"""DETRIS-L (Huang et al. 2025): CLIP ViT-B/16 text tower + DINOv2-L/14 with 4 registers, 448x448, RefCOCO.

As configs/detris_b.py (the module docstring there describes the model) with DINOv2-L/14 (24 layers, width
1024): Dense Aligners at layers 2,6,10,14,18,22, neck on blocks 8, 16 (pre-norm) and 23 (post-norm). Adam 2e-4,
batch 64, 50 epochs, lr x0.1 at epoch 35.

Run::

    python -m port_weights detris large_refcoco.pth detris_l_refcoco.msgpack   # or by name: hf:thuteam/DETRIS/large/...
    python -m wimfris_jax.summary --config configs/detris_l.py
    wimfris train --config configs/detris_l.py --workdir runs/detris_l

Expected (paper, DETRIS Table 1, IoU): RefCOCO val 77.3 / testA 79.0 / testB 75.2; RefCOCO+ 70.8 / 75.3 / 64.7;
G-Ref val(u) 69.3, test(u) 70.2, val(g) 67.9.
"""

from configs import common
from configs.detris_b import model_config


def get_config(arg: str | None = None):
    """``arg``: the dataset, "refcoco" (default) | "refcoco+" | "refcocog_umd" | "refcocog_google"."""
    model = model_config(vision=dict(preset="l14_reg4"), vision_layers=(2, 6, 10, 14, 18, 22), neck_taps=(8, 16))
    return common.referring_config(model, arg, global_batch_size=64, lr=2e-4, init=common.INIT_L)
