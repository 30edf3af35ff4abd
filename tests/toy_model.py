"""A toy stand-in for the WIMFRIS model and data source, following their contracts, for the train tests.

Model: frozen "image_encoder" (conv, stride 2), a text embedding that modulates the features (FiLM),
a trainable conv + BatchNorm + ReLU, Dropout, a 1x1 head -> "logits" (B, S/2, S/2) and per-2x2-window
"window_logits" (B, S*S/16). Loss: mean BCE on the logits + 0.2 * BCE of the window logits against the
window's mean mask. Batches come from the real ``data_pipeline.loader.make_loader``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

VOCAB = 32


class ImageEncoder(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), name="conv")(x))


class ToyModel(nn.Module):
    """(B, S, S, 3) images + (B, L) ids -> {"logits" (B, S/2, S/2), "window_logits" (B, (S/4)**2)}."""

    width: int = 16
    dropout: float = 0.1

    @nn.compact
    def __call__(self, images: jax.Array, ids: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        x = ImageEncoder(name="image_encoder")(images)  # (B, S/2, S/2, 16)
        emb = nn.Embed(VOCAB, 2 * self.width, name="text")(ids)  # (B, L, 2W)
        valid = (ids > 0)[..., None].astype(emb.dtype)
        t = (emb * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)  # (B, 2W)
        x = nn.Conv(self.width, (3, 3), use_bias=False, name="neck_conv")(x)  # bias-free before BN
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="neck_bn")(x)
        gamma, beta = jnp.split(t, 2, axis=-1)
        x = nn.relu(x * (1 + gamma[:, None, None]) + beta[:, None, None])
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        logits = nn.Conv(1, (1, 1), name="head")(x)[..., 0]  # (B, S/2, S/2)
        b, h, w = logits.shape
        windows = logits.reshape(b, h // 2, 2, w // 2, 2).mean((2, 4)).reshape(b, -1)
        return {"logits": logits, "window_logits": windows}


def toy_loss(outputs: dict[str, jax.Array], mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mask (B, S/2, S/2) float32 in [0, 1]."""
    bce = optax.sigmoid_binary_cross_entropy(outputs["logits"], mask).mean()
    b, h, w = mask.shape
    target = (mask.reshape(b, h // 2, 2, w // 2, 2).mean((2, 4)) > 0.5).reshape(b, -1).astype(jnp.float32)
    win = optax.sigmoid_binary_cross_entropy(outputs["window_logits"], target).mean()
    return bce + 0.2 * win, {"bce": bce, "window": win}


class ToySource:
    """Deterministic preprocessed examples: "image" (S, S, 3) f32, "ids" (L,) i32, "mask" (S/2, S/2) f32.

    The mask is where the channel named by the first token is bright, so the sentence matters.
    """

    def __init__(self, n: int = 64, image_size: int = 16, word_len: int = 4, seed: int = 0):
        self.n, self.s, self.l, self.seed = n, image_size, word_len, seed

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:  # grain checks repr(source) when restoring an iterator
        return f"ToySource(n={self.n}, image_size={self.s}, word_len={self.l}, seed={self.seed})"

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng([self.seed, int(i)])
        image = r.normal(size=(self.s, self.s, 3)).astype(np.float32)
        ids = r.integers(1, VOCAB, size=(self.l,)).astype(np.int32)
        ids[r.integers(2, self.l + 1) :] = 0
        small = image[::2, ::2]
        mask = (small[..., ids[0] % 3] > 0.3).astype(np.float32)
        return {"image": image, "ids": ids, "mask": mask}


def identity_transform(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The toy source yields preprocessed examples already."""
    del rng
    return example


def toy_config(**train: Any) -> ml_collections.ConfigDict:
    """A config in the project's layout with tiny sizes; ``train`` overrides config.train entries."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict({"name": "toy"})
    c.data = ml_collections.ConfigDict({"image_size": 16, "word_len": 4, "mask_size": 8})
    c.train = ml_collections.ConfigDict(
        {
            "global_batch_size": 8,
            "epochs": 2,
            "steps_per_epoch": 4,
            "lr": 1e-2,
            "lr_milestones": (1,),
            "lr_decay": 0.1,
            "trainable": (r"^(?!text_encoder/|image_encoder/)",),
            "compute_dtype": "float32",
            "fsdp": False,
            "fsdp_min_size": 256,
            "log_every": 1,
            "ckpt_every": 4,
            "keep_last": 2,
            "eval_every": 0,
            "resume": False,
        }
    )
    c.train.update(train)
    return c


def run_toy_training(workdir: str, config: ml_collections.ConfigDict, **kwargs: Any) -> Any:
    """``wimfris_jax.train.loop.train`` on the toy model, source and loader."""
    from wimfris_jax.train.loop import train

    source = kwargs.pop("train_source", ToySource(64, config.data.image_size, config.data.word_len))
    return train(
        config,
        workdir,
        model=ToyModel(),
        loss_fn=toy_loss,
        train_source=source,
        transform=identity_transform,
        **kwargs,
    )


if __name__ == "__main__":
    # Subprocess worker of the kill/resume test: trains, and after the checkpoint at step ``hang_at`` hangs in
    # the evaluation (printing HANGING) so that the parent can SIGKILL it at a known point.
    import json
    import sys
    import time

    jax.config.update("jax_default_matmul_precision", "float32")
    workdir, overrides, hang_at = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])

    def hang(state: Any) -> dict[str, float]:
        if int(state.step) >= hang_at:
            print("HANGING", int(state.step), flush=True)
            time.sleep(3600)
        return {"mIoU": 0.0}

    run_toy_training(workdir, toy_config(**overrides), eval_fn=hang)
