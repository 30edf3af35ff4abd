r"""The offline demo (``wimfris demo``): WIMFRIS at toy sizes trained from scratch on synthetic shapes, on CPU.

The architecture of configs/tiny.py (every WIMFRIS part: CLIP-like text tower + MTA, DINOv2-like ViT with
registers + MSA, HMF neck with WMF, DETRIS decoder and projector, eq. (10) loss) at 64 x 64 pixels, patch 8
(an 8 x 8 feature grid, 2 x 2 windows of 4 x 4, 32 x 32 logits). Demo-only settings, beside the sizes:

- ``train.trainable = (".*",)``: the backbones train too (random weights; wimfris_jax/demo.py says why);
- the synthetic set is drawn at the network's size (``raw_size = image_size``), scored at that size;
- evaluation only at the end (``eval_every = 0``), on ``num_val`` fresh scenes.

Run::

    wimfris demo                       # 7 min on 2 CPU cores (AMD EPYC), ~130 images/s
    wimfris demo --quick               # ~1 min smoke run, no quality target

Expected: validation mIoU >= 0.6 with the true sentences and at most half of it when each sentence is swapped
for one naming another object in the image (the demo prints both). Measured: 65.3 / 8.5 (oIoU 62.8 / 7.4)
after 3,200 steps (lr x0.1 at 2,600) with the DETRIS adapter init; the build before it: 66.4 / 7.9 in 428 s
(earlier: 64.9 / 7.3 in 669 s; 62.3 / 10.0 after 2,800 steps; 54.2 / 16.8 after 1,500): the colour words are
learnt first, the spatial ones ("the rightmost", "the bottommost") need the longer run.
"""

from configs import common, tiny


def get_config(arg: str | None = None):
    """``arg``: "quick" for the smoke run (fewer layers, steps and validation scenes)."""
    quick = arg == "quick"
    config = tiny.get_config()
    m = config.model
    m.image_size = 64
    m.vision.update(patch_size=8, pos_grid=8)
    m.neck.window = 4
    config.data = common.data_config(
        name="synthetic", image_size=64, word_len=17, patch_size=8, raw_size=64, max_size=64, num_train=8000,
        num_val=300, seed=0,
    )  # fmt: skip
    config.train = common.train_config(
        global_batch_size=16, lr=1e-3, epochs=32, steps_per_epoch=100, lr_milestones=(26,), trainable=(".*",),
        log_every=50, ckpt_every=0, keep_last=1, eval_every_epochs=0, eval_every=0, eval_batch_size=16,
    )  # fmt: skip
    if quick:  # a smoke run of the whole pipeline: fewer layers, steps and validation scenes
        m.vision.depth, m.text.depth = 2, 2
        m.neck_taps, m.text_adapter.layers, m.vision_adapter.layers = (0, 1), (1,), (1,)
        config.data.num_train, config.data.num_val = 64, 16
        config.train.update(global_batch_size=8, epochs=1, steps_per_epoch=10, lr_milestones=(), log_every=5,
                            eval_batch_size=8)  # fmt: skip
    return config
