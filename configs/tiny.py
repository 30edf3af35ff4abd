r"""Tiny WIMFRIS for tests and the offline demo: the full architecture at toy sizes, random weights.

DINOv2-like ViT: width 64, depth 4, 2 heads, patch 8, 4 registers, 128x128 input (16x16 patches); CLIP-like
text tower: width 64, depth 4, 2 heads, the real 49408-token vocabulary (so the real tokenizer works),
word_len 17. MTA/MSA at layers 1 and 3, neck taps at blocks 1 and 2, C = 64, 4x4 windows (16 windows),
1 decoder layer; 64x64 logits. Data: the synthetic shapes set (data_pipeline/synthetic.py), nothing to
download. Backbones are random and frozen (the PET recipe); to train everything from scratch instead pass
``--config.train.trainable='(".*",)'``.

Run::

    wimfris train --config configs/tiny.py --workdir /tmp/wimfris_tiny

Expected: the loss falls within a few hundred steps; a train step of batch 16 takes about 310 ms on 2 CPU cores
(``python benchmarks/bench_train.py --config configs/tiny.py``).
"""

from configs import common


def get_config():
    config = common.ml_collections.ConfigDict()
    config.seed = 0
    config.model = common.model_config(
        vision=dict(width=64, depth=4, num_heads=2, patch_size=8, num_registers=4, pos_grid=16),
        text=dict(vocab_size=49408, width=64, depth=4, num_heads=2, context_length=77, proj_dim=64),
        image_size=128,
        word_len=17,
        neck_taps=(1, 2),
        mta_layers=(1, 3),
        msa_layers=(1, 3),
        mta_dim=32,
        msa_dim=16,
        msa_heads=2,
        dim=64,
        decoder_layers=1,
        decoder_heads=4,
        window=4,
        gate_heads=4,
    )
    config.model.mamba.d_state = 8
    config.data = common.data_config(
        name="synthetic", image_size=128, word_len=17, patch_size=8, num_train=2000, raw_size=128, seed=0
    )
    config.train = common.train_config(
        global_batch_size=16, lr=1e-3, epochs=4, lr_milestones=(3,), log_every=10, ckpt_every=200, eval_every_epochs=1
    )
    return config
