"""The WIMFRIS network (Fig. 2a): frozen CLIP text + DINOv2 encoders tuned by MTA / MSA, HMF neck, DETRIS head;
and DETRIS itself as a configuration of the same parts (adapter kinds "dmoc" / "dense_aligner", ``neck.kind="detris"``).

    ids (B, L) --CLIP text tower, text adapter (MTA) beside the MLP of text_adapter.layers (x scale 0.2)-->
                 words (B, L, Ct), sentence feature state (B, C) = text_embeds
    images (B, S, S, 3) --DINOv2, vision adapter (MSA, alpha_i) beside the MLP of vision_adapter.layers-->
                 3 maps (B, h, w, Cv):
                 blocks neck_taps (pre-norm, 0-based block indices: hidden_states[t + 1]) and the last
                 block after the final norm, prefix tokens dropped
    neck (HMF: aggregate + WMF, or an ablation) --> (B, h, w, C) [+ window logits (B, n_win)]
    decoder (words, pad_mask = ids == 0) --> projector (state) --> mask logits (B, 4h, 4w)

Text runs first (all blocks), its final word features go to every vision adapter (DETRIS's order). Adapters
follow one schema and protocol (:mod:`wimfris_jax.families.wimfris.adapters`): a new kind is a row of ``ADAPTERS``,
not a branch
here. Top-level parameter names: "text_encoder", "image_encoder" (frozen), "<prefix>_<i>" for the adapters
(i = backbone layer; "mta", "msa", DETRIS's "text_adapter", "dense_aligner"), "neck", "decoder", "projector".
``train`` switches dropout (needs the "dropout" rng) and BatchNorm batch statistics (``mutable=["batch_stats"]``).

Outputs: "logits" (B, 4h, 4w); "window_logits" (B, n_win) when the WMF partitions the map; "alphas" (n,)
the emphasis values of the vision adapters that have one (MSA); "state" (B, C) the sentence feature.

:func:`build_model` reads ``config.model`` (configs/common.py documents every key); :func:`loss_fn` is WIMFRIS
eq. (10) for that model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.attention import IMPLEMENTATIONS
from wimfris_jax.backbones.clip_text import ClipText
from wimfris_jax.backbones.dinov2 import DinoV2, dinov2_config
from wimfris_jax.config_fields import choice, expand_preset
from wimfris_jax.errors import ConfigError
from wimfris_jax.families import family_inputs
from wimfris_jax.families.wimfris.adapters import ADAPTERS
from wimfris_jax.families.wimfris.decoder import Decoder, Projector
from wimfris_jax.families.wimfris.losses import wimfris_loss
from wimfris_jax.families.wimfris.neck.hmf import NECKS, build_neck
from wimfris_jax.families.wimfris.neck.wmf import normalize_window
from wimfris_jax.layers import check_remat

# config.model keys of the schema before text_adapter / vision_adapter (wimfris_jax.config.upgrade_model_config)
LEGACY_KEYS = ("adapter_kind", "use_mta", "use_msa", "mta_layers", "msa_layers", "mta_scale", "mta", "msa")


class Wimfris(nn.Module):
    """WIMFRIS, or DETRIS with the "dmoc" / "dense_aligner" adapters and DETRIS neck. Built by :func:`build_model`.

    Attributes:
      text_encoder: ClipText; image_encoder: DinoV2 (fields patch_size, num_registers, depth are read).
      neck, decoder, projector: the neck (see :mod:`wimfris_jax.families.wimfris.neck.hmf`), Decoder, Projector.
      neck_taps: 0-based DINOv2 blocks whose (pre-norm) outputs feed the neck beside the final output.
      text_kind / vision_kind: adapter kinds (keys of :data:`wimfris_jax.families.wimfris.adapters.ADAPTERS`, or
      "none").
      text_layers / vision_layers: 0-based backbone layers carrying an adapter (empty: adapter off).
      text_kwargs / vision_kwargs: keyword arguments of the adapter modules (width excluded).
      text_scale: fixed scale of the text adapter's output (0.2, both models).
      logits_only: when ``train`` is not given, run in evaluation mode and return the logits alone
        (:func:`wimfris_jax.load_model` sets it).
    """

    text_encoder: nn.Module
    image_encoder: nn.Module
    neck: nn.Module
    decoder: nn.Module
    projector: nn.Module
    neck_taps: tuple[int, ...] = (4, 8)
    text_kind: str = "mta"
    text_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    text_kwargs: Mapping[str, Any] | None = None
    text_scale: float = 0.2
    vision_kind: str = "msa"
    vision_layers: tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    vision_kwargs: Mapping[str, Any] | None = None
    logits_only: bool = False

    def _adapter_modules(self, kind: str, layers: tuple[int, ...], kwargs: Any, width: int) -> dict[int, nn.Module]:
        """{layer: adapter module} of one side (empty when ``kind`` is "none")."""
        if kind == "none":
            return {}
        a = ADAPTERS[kind]
        return {i: a.module(width=width, name=f"{a.prefix}_{i}", **dict(kwargs or {})) for i in layers}

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, ids: jnp.ndarray, *, train: bool | None = None
    ) -> dict[str, jnp.ndarray] | jnp.ndarray:
        """images (B, S, S, 3) CLIP-normalised; ids (B, L) int32, 0 = padding -> dict (module docstring), or the
        logits (B, 4h, 4w) alone when ``logits_only`` and ``train`` is not given (evaluation mode)."""
        logits_only = family_inputs("Wimfris", images, ids, self.logits_only, train)
        train = bool(train)
        pad_mask = ids == 0
        text_mods = self._adapter_modules(self.text_kind, self.text_layers, self.text_kwargs, self.text_encoder.width)
        text_adapters = {i: (lambda x, m=m: self.text_scale * m(x, train=train)) for i, m in text_mods.items()}
        text = self.text_encoder(ids, adapters=text_adapters)
        words, state = text["last_hidden_state"], text["text_embeds"]

        p = self.image_encoder.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        num_prefix = 1 + self.image_encoder.num_registers
        vis_mods = self._adapter_modules(
            self.vision_kind, self.vision_layers, self.vision_kwargs, self.image_encoder.width
        )
        context = dict(words=words, pad_mask=pad_mask, grid=grid, num_prefix=num_prefix, train=train)
        vision_adapters = {i: functools.partial(m, **context) for i, m in vis_mods.items()}
        vis = self.image_encoder(images, adapters=vision_adapters)
        hidden = vis["hidden_states"]
        tokens = [hidden[t + 1] for t in self.neck_taps] + [vis["last_hidden_state"]]
        b = images.shape[0]
        maps = [x[:, num_prefix:].reshape(b, grid[0], grid[1], x.shape[-1]) for x in tokens]

        fused, window_logits = self.neck(maps, state, train=train)
        dec = self.decoder(fused, words, pad_mask, deterministic=not train)
        logits = self.projector(dec, state, train=train)
        if logits_only:
            return logits
        out = {"logits": logits, "state": state}
        if window_logits is not None:
            out["window_logits"] = window_logits
        alphas = [m.alpha() for m in vis_mods.values() if hasattr(m, "alpha")]
        if alphas:
            out["alphas"] = jnp.stack(alphas)
        return out


def vision_fields(model_config: Any) -> dict[str, Any]:
    """:class:`DinoV2` fields of ``config.model.vision``: a ``preset`` expanded (:func:`dinov2_config`), then the
    explicit fields on top."""
    return expand_preset(model_config.vision, dinov2_config)


def build_backbones(model_config: Any, dtype: Any = None, remat_mode: str = "none") -> tuple[ClipText, DinoV2]:
    """The text and vision towers of ``config.model`` (``attention``, ``dtype`` and ``remat_mode`` applied)."""
    common = dict(dtype=dtype, attention=_attention(model_config), remat_mode=remat_mode)
    return ClipText(**common, **dict(model_config.text)), DinoV2(**common, **vision_fields(model_config))


def _attention(cfg: Any) -> str:
    """``config.model.attention`` (default "auto"), checked."""
    return choice(cfg, "attention", "auto", IMPLEMENTATIONS)


def _check(cfg: Any, text: nn.Module, vision: nn.Module, text_layers: tuple, vision_layers: tuple) -> None:
    for side, layers, depth in (("text", text_layers, text.depth), ("vision", vision_layers, vision.depth)):
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"config.model.{side}_adapter.layers: {bad} outside the backbone's 0..{depth - 1}")
    depth_v = vision.depth
    bad = [t for t in cfg.neck_taps if not 0 <= t < depth_v]
    if bad:
        raise ConfigError(f"config.model.neck_taps: blocks {bad} outside 0..{depth_v - 1}")
    dim, proj = cfg.neck.dim, text.proj_dim
    if cfg.decoder.d_model != dim or proj != dim or text.width != dim:
        raise ConfigError(
            f"widths disagree: neck.dim={dim}, decoder.d_model={cfg.decoder.d_model}, text width={text.width}, "
            f"text proj_dim={proj}; the model needs them equal (512): the decoder attends to the word features and "
            "the WMF class token / projector kernel come from the sentence feature"
        )
    if cfg.neck.kind not in NECKS:
        raise ConfigError(f"config.model.neck.kind={cfg.neck.kind!r}: choose one of {NECKS}")


def adapter_settings(
    model_config: Any, side: str, text_width: int, dtype: Any = None
) -> tuple[str, tuple[int, ...], dict[str, Any], float]:
    """(kind, layers, module keyword arguments, scale) of ``config.model.<side>_adapter`` (side "text" | "vision");
    kind "none" and no layers when the adapter is off. ``scale`` (text side: applied by the model) defaults to 1."""
    cfg, key = model_config, f"{side}_adapter"
    legacy = [k for k in LEGACY_KEYS if k in cfg]
    if legacy:
        raise ConfigError(
            f"config.model uses the old adapter keys {legacy}; write text_adapter / vision_adapter with a kind "
            "(configs/common.py), or convert it with wimfris_jax.config.upgrade_model_config"
        )
    spec = dict(cfg.get(key) or {"kind": "none"})
    kind, layers = spec.pop("kind", "none"), tuple(int(i) for i in spec.pop("layers", ()))
    scale = float(spec.pop("scale", 1.0)) if side == "text" else 1.0
    if kind == "none" or not layers:
        return "none", (), {}, scale
    kinds = sorted(k for k, a in ADAPTERS.items() if a.side == side)
    if kind not in kinds:
        raise ConfigError(f"config.model.{key}.kind={kind!r}: choose one of {kinds + ['none']}")
    adapter = ADAPTERS[kind]
    fields = {f.name for f in dataclasses.fields(adapter.module)} - {"width", "parent", "name"}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ConfigError(f"config.model.{key}: {unknown} are not sizes of {kind!r}; it takes {sorted(fields)}")
    for group in adapter.shared:
        spec = {**{k: v for k, v in dict(cfg[group]).items() if k in fields}, **spec}
    spec["dtype"] = dtype
    if side == "vision":
        spec.update(text_dim=text_width, attention=_attention(cfg))
    return kind, layers, {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}, scale


def model_window(model_config: Any) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(grid, window): the neck's feature grid (h, w) = image_size // patch_size, and the WMF window (wh, ww)
    resolved from ``neck.window`` -- None when the neck has no WMF or one window covers the map without alignment
    logits (window None / 0 / "none", Table 3a). The model and the loss both take the window from here."""
    s, p = int(model_config.image_size), int(vision_fields(model_config).get("patch_size", DinoV2.patch_size))
    grid = (s // p, s // p)
    if model_config.neck.kind != "hmf":
        return grid, None
    try:
        window = normalize_window(model_config.neck.get("window", 4))
    except ValueError as e:
        raise ConfigError(f"config.model.neck.window: {e}") from e
    if window is None:
        return grid, None
    window = (window, window) if isinstance(window, int) else window
    if min(window) < 1 or grid[0] % window[0] or grid[1] % window[1]:
        raise ConfigError(f"config.model.neck.window={window} does not tile the {grid} feature grid")
    return grid, window


def build_wimfris(model_config: Any, dtype: Any = None, remat_mode: str = "none") -> Wimfris:
    """The Wimfris module for ``config.model`` (an ml_collections ConfigDict or a mapping with the same keys).

    ``dtype``: computation dtype of the trainable parts (None: float32); parameters stay float32.
    ``remat_mode``: rematerialisation of the backbone blocks' attention and MLP, the WMF's Mamba, the decoder
    layers and the projector's visual path,
    "auto" | "none" | "block" | "dots" (:func:`wimfris_jax.layers.remat`; training passes ``train.remat``).
    Ablation switches: ``text_adapter.kind`` / ``vision_adapter.kind`` = "none" (Table 3b), ``vision_adapter``
    ``.emphasis`` (EP) and ``.kernels`` (Table 4), ``text_adapter.layers`` / ``vision_adapter.layers`` (Table 5),
    ``neck.kind`` and ``neck.window`` (Tables 1, 3a); DETRIS: kinds "dmoc" / "dense_aligner" (configs/detris_b.py).
    """
    cfg = model_config
    remat_mode = check_remat(remat_mode)  # "auto" stays: resolved for the platform the model is compiled for
    text, vision = build_backbones(cfg, dtype, remat_mode)
    text_kind, text_layers, text_kwargs, text_scale = adapter_settings(cfg, "text", text.width, dtype)
    vision_kind, vision_layers, vision_kwargs, _ = adapter_settings(cfg, "vision", text.width, dtype)
    _check(cfg, text, vision, text_layers, vision_layers)
    grid, window = model_window(cfg)
    neck_cfg = dict(cfg.neck)
    kind, dim = neck_cfg.pop("kind"), neck_cfg.pop("dim")
    wmf_cfg, _ = neck_cfg.pop("wmf", {}), neck_cfg.pop("window", None)
    wmf = None
    if kind == "hmf":
        wmf = {**dict(cfg.mamba), **dict(wmf_cfg), "window": window or grid, "remat_mode": remat_mode}
    neck = build_neck(kind, dim=dim, wmf=wmf, align=window is not None, dtype=dtype, **neck_cfg)
    return Wimfris(
        text_encoder=text,
        image_encoder=vision,
        neck=neck,
        decoder=Decoder(dtype=dtype, attention=_attention(cfg), remat_mode=remat_mode, **dict(cfg.decoder)),
        projector=Projector(word_dim=text.proj_dim, in_dim=dim, dtype=dtype, remat_mode=remat_mode),
        neck_taps=tuple(cfg.neck_taps),
        text_kind=text_kind,
        text_layers=text_layers,
        text_kwargs=text_kwargs,
        text_scale=text_scale,
        vision_kind=vision_kind,
        vision_layers=vision_layers,
        vision_kwargs=vision_kwargs,
    )


def wimfris_loss_fn(
    model_config: Any, outputs: Mapping[str, jnp.ndarray], mask: jnp.ndarray
) -> tuple[jnp.ndarray, dict]:
    """WIMFRIS eq. (10): 0.5 contrastive + 0.3 dice + 0.2 window alignment (weights: ``loss_weights``).

    outputs: the model's dict; mask: (B, Hm, Wm) soft mask at the logit size. Returns (total, aux scalars).
    """
    grid, window = model_window(model_config)
    weights = tuple(model_config.get("loss_weights", (0.5, 0.3, 0.2)))
    return wimfris_loss(outputs, mask, grid=grid, window=window or grid, weights=weights)
