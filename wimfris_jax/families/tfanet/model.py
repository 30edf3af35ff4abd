"""The TFANet network (Lu et al., Fig. 2): CLIP text tower, VMamba with an alignment unit after every stage, WFDM.

    ids (B, L) --CLIP text tower--> words F_W (B, L, Ct), sentence feature (B, Ct)
    images (B, S, S, 3) CLIP-normalised --ImageNet statistics, VMamba embed--> x (B, S/4, S/4, d0)
    for stage i = 0..3 (eqs. 1-3):
        F_V_i      = VSS_i(x)                                      (B, h_i, w_i, d_i), h_i = S / 2^(i+2)
        F_i, F_LV_i = delta_i(F_V_i, F_W)                          MLAM -> fusion block -> CFSM (TFANetLevel)
        x          = downsample_i(F_V_i + F_i)                     eq. (3): the aligned features feed the next stage
    WFDM(F_i, F_LV_i over the stages, coarsest first) --> scores (B, S/4, S/4, 1 or 2)     eqs. (23)-(26)

Eq. (3) writes the next stage's input as F_V + sigma(F_i): the unit's output is added to the stage's output as a
residual before the stage's own downsample (sigma), so a unit that outputs zeros leaves VMamba unchanged; the
unit runs after every stage, the last one included (eq. 2, i in 1..4), whose F_4 only feeds the decoder.
Parameter names: "text_encoder", "image_encoder" (the VMamba's own names, as converted), "level_<i>", "decoder".

Ablation switches (Table 3 rows a-e; docs/TFANET.md "Ablation switches"): ``level.attention`` "mlam" |
"transformer" | "none", ``level.mixer`` "cfsm" | "conv", ``decoder.kind`` "wfdm" | "simple"
(:mod:`wimfris_jax.families.tfanet.ablations`); the defaults build the full model with the same parameter names.
``level.cfsm_depth`` (default 1, the paper's one CFSM per unit) stacks CFSMs as ReMamber stacks its Twister blocks
(:mod:`wimfris_jax.families.tfanet.level`; docs/TFANET.md "Parameters").

Outputs: "logits" (B, S/4, S/4) the foreground logits, "scores" (B, S/4, S/4, out_channels), "state" (B, Ct).
Decisions where the paper is silent: docs/TFANET.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.backbones.clip_text import ClipText, clip_text_config
from wimfris_jax.backbones.vmamba import VMamba, vmamba_config
from wimfris_jax.config_fields import choice, expand_preset, is_int
from wimfris_jax.errors import ConfigError
from wimfris_jax.families import family_inputs
from wimfris_jax.families.tfanet.ablations import ATTENTIONS, DECODERS, MIXERS, SimpleDecoder
from wimfris_jax.families.tfanet.level import TFANetLevel
from wimfris_jax.families.tfanet.losses import foreground_logits, tfanet_loss
from wimfris_jax.families.tfanet.wfdm import WFDM
from wimfris_jax.normalization import to_imagenet


class TFANet(nn.Module):
    """TFANet; build it with :func:`build_tfanet`.

    Attributes:
      text_encoder: ClipText; image_encoder: VMamba (called stage by stage).
      decoder: WFDM (or the ablation's SimpleDecoder).
      level: keyword arguments of every stage's :class:`TFANetLevel` (mlam, fusion, cfsm, attention, mixer, ...).
      logits_only: as :class:`wimfris_jax.model.Wimfris` (evaluation mode, the logits alone, when ``train`` is None).
    """

    text_encoder: nn.Module
    image_encoder: nn.Module
    decoder: nn.Module
    level: Mapping[str, Any] | None = None
    logits_only: bool = False

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, ids: jnp.ndarray, *, train: bool | None = None
    ) -> dict[str, jnp.ndarray] | jnp.ndarray:
        """images (B, S, S, 3) CLIP-normalised; ids (B, L) int32, 0 = padding -> dict (module docstring), or the
        logits (B, S/4, S/4) alone when ``logits_only`` and ``train`` is not given."""
        logits_only = family_inputs("TFANet", images, ids, self.logits_only, train)
        pad_mask = ids == 0
        text = self.text_encoder(ids)
        words, state = text["last_hidden_state"], text["text_embeds"]

        vision, n = self.image_encoder, len(self.image_encoder.depths)
        x = vision.embed(to_imagenet(images))  # VMamba was pretrained on ImageNet statistics
        feats, langs = [], []
        for i in range(n):
            v = vision.blocks(i, x)
            f, f_lv = TFANetLevel(name=f"level_{i}", dtype=vision.dtype, **dict(self.level or {}))(v, words, pad_mask)
            feats.append(f)
            langs.append(f_lv)
            if i < n - 1:
                x = vision.downsample(i, v + f)
        scores = self.decoder(feats[::-1], langs[::-1])
        logits = foreground_logits(scores)
        if logits_only:
            return logits
        return {"logits": logits, "scores": scores, "state": state}


def build_tfanet(model_config: Any, dtype: Any = None, remat_mode: str = "none") -> TFANet:
    """The TFANet module for ``config.model`` (configs/tfanet_b.py documents the keys): ``text`` ClipText fields or
    ``{"preset": "l14"}``, ``vision`` VMamba fields or ``{"preset": "base"}``, ``level`` (``attention``, ``mixer``,
    ``cfsm_depth`` and the mlam / fusion / cfsm / transformer / conv keyword arguments), ``decoder`` (``kind`` and
    WFDM's or SimpleDecoder's keyword arguments). ``remat_mode`` rematerialises each VSS block."""
    cfg = model_config
    text = ClipText(dtype=dtype, **expand_preset(cfg.text, clip_text_config))
    vision = VMamba(dtype=dtype, remat_mode=remat_mode, **expand_preset(cfg.vision, vmamba_config))
    if int(cfg.image_size) % (4 * 2 ** (len(vision.depths) - 1)):
        raise ConfigError(f"config.model.image_size={cfg.image_size} is not a multiple of the VMamba's total stride")
    raw = dict(cfg.get("level") or {})
    switches = ("attention", "mixer", "cfsm_depth")
    level = {k: dict(v) for k, v in raw.items() if k not in switches}
    for group in level.values():
        group.update({k: tuple(v) for k, v in group.items() if isinstance(v, list)})
    level["attention"] = choice(raw, "attention", "mlam", ATTENTIONS, "level")
    level["mixer"] = choice(raw, "mixer", "cfsm", MIXERS, "level")
    depth = level["cfsm_depth"] = raw.get("cfsm_depth", 1)
    if not is_int(depth) or depth < 1:
        raise ConfigError(f"config.model.level.cfsm_depth={depth!r}: must be a positive integer")
    if depth != 1 and level["mixer"] == "conv":
        raise ConfigError(f"config.model.level.cfsm_depth={depth}: must be 1 with level.mixer='conv' (one conv layer)")
    dec = dict(cfg.decoder)
    if choice(dec, "kind", "wfdm", DECODERS, "decoder") == "simple":
        # WFDM's alpha keys stay in the config so that one override switches the decoder; the simple one has none
        decoder = SimpleDecoder(
            dtype=dtype, **{k: v for k, v in dec.items() if k not in ("kind", "learn_alpha", "alpha_init")}
        )
    else:
        decoder = WFDM(dtype=dtype, **{k: v for k, v in dec.items() if k != "kind"})
    return TFANet(text_encoder=text, image_encoder=vision, decoder=decoder, level=level)


def tfanet_loss_fn(
    model_config: Any, outputs: Mapping[str, jnp.ndarray], mask: jnp.ndarray
) -> tuple[jnp.ndarray, dict]:
    """BCE + Dice on the score maps (weights ``loss_weights`` = (bce, dice), (1, 1) as ReMamber); mask (B, Hm, Wm)."""
    bce, dice = tuple(model_config.get("loss_weights", (1.0, 1.0)))
    loss = tfanet_loss(outputs["scores"], mask, bce_weight=bce, dice_weight=dice)
    return loss, {"loss_bce_dice": loss}
