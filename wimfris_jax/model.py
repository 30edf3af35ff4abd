"""The WIMFRIS network (Fig. 2a): frozen CLIP text + DINOv2 encoders tuned by MTA / MSA, HMF neck, DETRIS head.

    ids (B, L) --CLIP text tower, MTA beside the MLP of layers mta_layers (scale 0.2)--> words (B, L, Ct),
                 sentence feature state (B, C) = text_embeds
    images (B, S, S, 3) --DINOv2, MSA beside the MLP of layers msa_layers (alpha_i)--> 3 maps (B, h, w, Cv):
                 blocks neck_taps (pre-norm, 0-based block indices: hidden_states[t + 1]) and the last
                 block after the final norm, prefix tokens dropped
    neck (HMF: aggregate + WMF, or an ablation) --> (B, h, w, C) [+ window logits (B, n_win)]
    decoder (words, pad_mask = ids == 0) --> projector (state) --> mask logits (B, 4h, 4w)

Text runs first (all blocks), its final word features go to every MSA (DETRIS's order). Top-level parameter
names: "text_encoder", "image_encoder" (frozen), "mta_<i>", "msa_<i>" (i = backbone layer), "neck",
"decoder", "projector". ``train`` switches dropout (needs the "dropout" rng) and BatchNorm batch statistics
(``mutable=["batch_stats"]``).

Outputs: "logits" (B, 4h, 4w); "window_logits" (B, n_win) when the WMF partitions the map; "alphas" (n_msa,)
the emphasis values of the MSA layers (when MSA is on); "state" (B, C) the sentence feature.

:func:`build_model` reads ``config.model`` (configs/common.py documents every key); :func:`loss_fn` is WIMFRIS
eq. (10) for that model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.adapters.msa import MultiScaleAligner
from wimfris_jax.adapters.mta import MambaTextAdapter
from wimfris_jax.decoder import Decoder, Projector
from wimfris_jax.losses import wimfris_loss
from wimfris_jax.neck.hmf import NECKS, build_neck
from wimfris_jax.neck.wmf import normalize_window, resolve_window


class Wimfris(nn.Module):
    """WIMFRIS. Build it with :func:`build_model`.

    Attributes:
      text_encoder: ClipText; image_encoder: DinoV2 (fields patch_size, num_registers, depth are read).
      neck, decoder, projector: the neck (see :mod:`wimfris_jax.neck.hmf`), Decoder, Projector.
      neck_taps: 0-based DINOv2 blocks whose (pre-norm) outputs feed the neck beside the final output.
      mta_layers / msa_layers: 0-based backbone layers carrying an adapter (empty: adapter off).
      mta_kwargs / msa_kwargs: keyword arguments of MambaTextAdapter / MultiScaleAligner (width excluded).
      mta_scale: fixed scale of the MTA output (DETRIS: 0.2).
    """

    text_encoder: nn.Module
    image_encoder: nn.Module
    neck: nn.Module
    decoder: nn.Module
    projector: nn.Module
    neck_taps: tuple[int, ...] = (4, 8)
    mta_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    mta_kwargs: Mapping[str, Any] | None = None
    mta_scale: float = 0.2
    msa_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    msa_kwargs: Mapping[str, Any] | None = None

    def setup(self) -> None:
        self.mta = {
            i: MambaTextAdapter(width=self.text_encoder.width, **dict(self.mta_kwargs or {})) for i in self.mta_layers
        }
        self.msa = {
            i: MultiScaleAligner(width=self.image_encoder.width, **dict(self.msa_kwargs or {})) for i in self.msa_layers
        }

    def _mta_branch(self, i: int, x: jnp.ndarray) -> jnp.ndarray:
        return self.mta_scale * self.mta[i](x)

    def __call__(self, images: jnp.ndarray, ids: jnp.ndarray, *, train: bool) -> dict[str, jnp.ndarray]:
        """images (B, S, S, 3) CLIP-normalised; ids (B, L) int32, 0 = padding -> dict (see module docstring)."""
        if images.ndim != 4 or ids.ndim != 2 or images.shape[0] != ids.shape[0]:
            raise ValueError(f"Wimfris expects images (B, S, S, 3) and ids (B, L); got {images.shape}, {ids.shape}")
        pad_mask = ids == 0
        text = self.text_encoder(ids, adapters={i: functools.partial(self._mta_branch, i) for i in self.mta_layers})
        words, state = text["last_hidden_state"], text["text_embeds"]

        p = self.image_encoder.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        num_prefix = 1 + self.image_encoder.num_registers
        msa = {
            i: functools.partial(
                self.msa[i], words=words, pad_mask=pad_mask, grid=grid, num_prefix=num_prefix, deterministic=not train
            )
            for i in self.msa_layers
        }
        vis = self.image_encoder(images, adapters=msa)
        hidden = vis["hidden_states"]
        tokens = [hidden[t + 1] for t in self.neck_taps] + [vis["last_hidden_state"]]
        b = images.shape[0]
        maps = [x[:, num_prefix:].reshape(b, grid[0], grid[1], x.shape[-1]) for x in tokens]

        fused, window_logits = self.neck(maps, state, train=train)
        dec = self.decoder(fused, words, pad_mask, deterministic=not train)
        out = {"logits": self.projector(dec, state, train=train), "state": state}
        if window_logits is not None:
            out["window_logits"] = window_logits
        if self.msa_layers:
            out["alphas"] = jnp.stack([self.msa[i].alpha() for i in self.msa_layers])
        return out


def _backbones(cfg: Any, dtype: Any = None) -> tuple[nn.Module, nn.Module]:
    from wimfris_jax.backbones.clip_text import ClipText
    from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config

    text_kw = dict(cfg.text)
    vision_kw = dict(cfg.vision)
    preset = vision_kw.pop("preset", None)
    if preset is not None:
        vision_kw = {**dinov2_config(preset), **vision_kw}
    return ClipText(dtype=dtype, **text_kw), DinoV2(dtype=dtype, **vision_kw)


def _check(cfg: Any, text: nn.Module, vision: nn.Module) -> None:
    depth_t, depth_v = text.depth, vision.depth
    for name, layers, depth in (("mta_layers", cfg.mta_layers, depth_t), ("msa_layers", cfg.msa_layers, depth_v)):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"config.model.{name}: layers {bad} outside the backbone's 0..{depth - 1}")
    bad = [t for t in cfg.neck_taps if not 0 <= t < depth_v]
    if bad:
        raise ValueError(f"config.model.neck_taps: blocks {bad} outside 0..{depth_v - 1}")
    dim, proj = cfg.neck.dim, text.proj_dim
    if cfg.decoder.d_model != dim or proj != dim or text.width != dim:
        raise ValueError(
            f"widths disagree: neck.dim={dim}, decoder.d_model={cfg.decoder.d_model}, text width={text.width}, "
            f"text proj_dim={proj}; WIMFRIS needs them equal (512): the decoder attends to the word features and "
            "the WMF class token / projector kernel come from the sentence feature"
        )
    if cfg.neck.kind not in NECKS:
        raise ValueError(f"config.model.neck.kind={cfg.neck.kind!r}: choose one of {NECKS}")


def build_model(model_config: Any, dtype: Any = None) -> Wimfris:
    """The Wimfris module for ``config.model`` (an ml_collections ConfigDict or a mapping with the same keys).

    ``dtype``: computation dtype of the trainable parts (None: float32); parameters stay float32. Adapter
    switches: ``use_mta`` / ``use_msa`` (Table 3b), ``msa.emphasis`` (EP), ``msa.kernels`` (Table 4),
    ``mta_layers`` / ``msa_layers`` (Table 5), ``neck.kind`` and ``neck.window`` (Tables 1, 3a).
    """
    cfg = model_config
    adapter_kind = cfg.get("adapter_kind", "wimfris")
    if adapter_kind != "wimfris":
        raise NotImplementedError(
            f"config.model.adapter_kind={adapter_kind!r}: only 'wimfris' (MTA + MSA) is built here; the DETRIS "
            "adapters (wimfris_jax/adapters/detris.py) plug into the same seams and are wired in by issue 7"
        )
    text, vision = _backbones(cfg, dtype)
    _check(cfg, text, vision)
    mamba = dict(cfg.mamba)
    neck_cfg = dict(cfg.neck)
    kind, dim = neck_cfg.pop("kind"), neck_cfg.pop("dim")
    wmf = {**mamba, **neck_cfg.pop("wmf", {}), "window": normalize_window(neck_cfg.pop("window", 4))}
    neck = build_neck(kind, dim=dim, wmf=wmf, dtype=dtype, **neck_cfg)
    mta_kwargs = {**mamba, **dict(cfg.mta), "dtype": dtype}
    msa_kwargs = {**dict(cfg.msa), "dtype": dtype}
    msa_kwargs["kernels"] = tuple(msa_kwargs.get("kernels", (3, 5, 7)))
    return Wimfris(
        text_encoder=text,
        image_encoder=vision,
        neck=neck,
        decoder=Decoder(dtype=dtype, **dict(cfg.decoder)),
        projector=Projector(word_dim=text.proj_dim, in_dim=dim, dtype=dtype),
        neck_taps=tuple(cfg.neck_taps),
        mta_layers=tuple(cfg.mta_layers) if cfg.use_mta else (),
        mta_kwargs=mta_kwargs,
        mta_scale=float(cfg.mta_scale),
        msa_layers=tuple(cfg.msa_layers) if cfg.use_msa else (),
        msa_kwargs=msa_kwargs,
    )


def feature_grid(model_config: Any) -> tuple[int, int]:
    """(h, w) of the neck's feature map: image_size // patch_size."""
    _, vision = _backbones(model_config)
    s = int(model_config.image_size)
    return (s // vision.patch_size, s // vision.patch_size)


def loss_fn(model_config: Any, outputs: Mapping[str, jnp.ndarray], mask: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """WIMFRIS eq. (10): 0.5 contrastive + 0.3 dice + 0.2 window alignment (weights: ``loss_weights``).

    outputs: the model's dict; mask: (B, Hm, Wm) soft mask at the logit size. Returns (total, aux scalars).
    """
    grid = feature_grid(model_config)
    window = resolve_window(model_config.neck.get("window", 4), grid)
    weights = tuple(model_config.get("loss_weights", (0.5, 0.3, 0.2)))
    return wimfris_loss(outputs, mask, grid=grid, window=window, weights=weights)
