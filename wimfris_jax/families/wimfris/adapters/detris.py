"""DETRIS adapters: the Dense Aligner (vision) and the D-MoC text adapter, DETRIS eq. (1)-(4).

Source: DETRIS (Huang et al. 2025) Sec. "Dense Aligner" / "Text Adapter", eq. (1)-(4), and the facts read from
its public code (docs/detris_code.md "Where adapters sit"). With d the adapter width (128 vision, 64 text):

    F      = ReLU(D_fc1(x))                                       (B, T, d)              eq. (1), (4)
    D-MoC  on the tokens after the first P (cls [+ registers]), channels-last:              eq. (2)
        b1 = CBR_1(F)                                             d/2 channels, kernel 1
        b2 = CBR_3(CBR_1(cat[F, b1]))                             d/16 -> d/4, kernel 3
        b3 = CBR_5(CBR_1(cat[F, b1, b2]))                         d/16 -> d/4, kernel 5
        dense = cat[b1, b2, b3] (+ F for the Dense Aligner)       d channels
    CBR = conv (with bias) + BatchNorm(eps 1e-3) + ReLU; 2-D on the (h, w) patch grid (vision), 1-D over the
    word positions 1..L-1 (text).
    Dense Aligner:  cross = back_proj(MHA(q=image_proj(dense), k=v=text_proj(f_t)))     eq. (3), 8 heads
                    out   = D_fc2(cat[F[:, :P], cross] + F)
    Text adapter:   out   = D_fc2(cat[F[:, :1], dense] + F)
    The prefix (bypassing) tokens thus leave as D_fc2(2 F), exactly as in the official code.

The Dense Aligner sits parallel to the MLP of a DINOv2 block and reads n2 = norm2(x); it returns
``scale * out`` (DETRIS: 0.2) so that it plugs into the backbone seam ``x + ls2(mlp(n2) + adapter(n2))`` as is.
The text adapter reads x after attention (un-normed); its 0.2 is applied by the model (``mta_scale``).

Parameter names map one-to-one onto the official keys (``dense_branch2.0.conv`` -> ``dense_branch2_0/conv``,
``cross.multihead_attn`` -> ``cross/multihead_attn``, ``D_fc1``); :mod:`port_weights.detris` is a renaming.

BatchNorm uses batch statistics when ``train`` (global over the mesh under jit with a sharded batch: the
reduction runs over the logical batch) and running statistics otherwise; flax momentum 0.9 = PyTorch 0.1.
No key padding mask in the cross-attention: DETRIS attends to padded word positions too.

Initialisation (not needed for converted weights) is DETRIS's final one, see
docs/detris_code.md "Initialisation of the adapters". Dense Aligner: ``DenseAligner._initialize_weights``
(model/adapter.py) gives every Conv2d and Linear Kaiming-normal (fan_in, ReLU gain) and zero bias, but the
DINOv2 ViT that holds it then runs ``named_apply(init_weights_vit_timm, self)``
(model/dinov2/models/vision_transformer.py, ``init_weights``, after the blocks are built; the pretrained load
is strict=False and has no adapter keys), which re-initialises every ``nn.Linear`` with
trunc_normal_(std=0.02) (+-2 absolute: a plain normal) and zero bias. So: D_fc1, D_fc2, image_proj,
text_proj, back_proj and the attention's out-projection (``out_proj`` is a NonDynamicallyQuantizableLinear,
an nn.Linear subclass) get N(0, 0.02^2) kernels (:data:`vit_trunc_normal`) and zero biases; the
convolutions keep Kaiming-normal / zero bias; the attention's fused in-projection (a Parameter, not an
nn.Linear) keeps PyTorch's Xavier-uniform over the fused (3d, d) matrix, zero bias. The text adapter lives
in CLIP, whose ``initialize_parameters`` touches only named CLIP weights: it keeps PyTorch's defaults
(uniform +-1/sqrt(fan_in) for kernels and biases).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from wimfris_jax.attention import multi_head_attention
from wimfris_jax.layers import ConvBNReLU, kaiming_normal, torch_default_bias, torch_default_kernel, vit_trunc_normal

BN_EPS = 1e-3  # the adapters' BatchNorm (the neck/projector use 1e-5)

# PyTorch's xavier_uniform_ on the fused (3d, d) in_proj_weight: var = 2 / (d + 3d) = 0.5 / d per q/k/v block.
fused_xavier = nn.initializers.variance_scaling(0.5, "fan_in", "uniform")


def dense_mixture(
    xs: jnp.ndarray, *, ndim: int, train: bool, torch_init: bool = False, dtype: Any = None
) -> jnp.ndarray:
    """D-MoC, DETRIS eq. (2): (B, *spatial, d) -> (B, *spatial, d) = cat[b1 (d/2), b2 (d/4), b3 (d/4)].

    Call inside a compact method: it creates the submodules ``dense_branch1``, ``dense_branch2_{0,1}``,
    ``dense_branch3_{0,1}`` of the calling module.
    """
    d = xs.shape[-1]
    if d % 16:
        raise ValueError(f"the dense mixture needs a width divisible by 16, got {d}")
    k1, k3, k5 = ((1,) * ndim, (3,) * ndim, (5,) * ndim)

    def cbr(y: jnp.ndarray, width: int, k: tuple[int, ...], name: str) -> jnp.ndarray:
        # DETRIS BasicConv1d/2d: conv with bias + BatchNorm(eps 1e-3) + ReLU
        if torch_init:  # PyTorch's defaults (text adapter)
            fan_in = y.shape[-1] * math.prod(k)
            inits = dict(kernel_init=torch_default_kernel, bias_init=torch_default_bias(fan_in))
        else:  # DETRIS's Dense Aligner convs: Kaiming normal, zero bias (init_weights_vit_timm skips convs)
            inits = dict(kernel_init=kaiming_normal, bias_init=nn.initializers.zeros)
        return ConvBNReLU(width, k, use_bias=True, eps=BN_EPS, dtype=dtype, name=name, **inits)(y, train=train)

    b1 = cbr(xs, d // 2, k1, "dense_branch1")
    b2 = cbr(cbr(jnp.concatenate([xs, b1], -1), d // 16, k1, "dense_branch2_0"), d // 4, k3, "dense_branch2_1")
    b3 = cbr(cbr(jnp.concatenate([xs, b1, b2], -1), d // 16, k1, "dense_branch3_0"), d // 4, k5, "dense_branch3_1")
    return jnp.concatenate([b1, b2, b3], -1)


class CrossModalAttention(nn.Module):
    """DETRIS ``CrossModalAttention``: back_proj(MHA(q=image_proj(img), k=v=text_proj(text))), no mask.

    img (B, N, d), text (B, L, Ct) -> (B, N, d). Dropout on the attention weights when not deterministic.
    """

    embed_dim: int = 128
    num_heads: int = 8
    dropout: float = 0.1
    dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(self, img: jnp.ndarray, text: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
        def dense(features: int, name: str) -> nn.Dense:
            # nn.Linear in DETRIS: re-initialised by init_weights_vit_timm (see the module docstring)
            return nn.Dense(features, kernel_init=vit_trunc_normal, dtype=self.dtype, name=name)

        q = dense(self.embed_dim, "image_proj")(img)
        kv = dense(self.embed_dim, "text_proj")(text)
        y = multi_head_attention(
            self.num_heads,
            self.embed_dim,
            implementation=self.attention,
            dropout_rate=self.dropout,  # drawn per attention weight, as PyTorch
            dtype=self.dtype,
            name="multihead_attn",
            kernel_init=fused_xavier,  # in_proj_weight: a Parameter, not re-initialised
            out_kernel_init=vit_trunc_normal,  # out_proj: an nn.Linear subclass, re-initialised (zero bias)
        )(q, kv, kv, deterministic=deterministic)
        return dense(img.shape[-1], "back_proj")(y)


class DenseAligner(nn.Module):
    """DETRIS Dense Aligner (vision adapter), eq. (1)-(3): (B, T, width) -> scale * (B, T, width).

    Attributes:
      width: the vision backbone's width (768 for B/14, 1024 for L/14).
      dim: adapter width d (128).
      text_dim: width of the word features (512).
      num_heads, dropout: of the cross-attention (8, 0.1).
      scale: fixed output scale (DETRIS: 0.2).
      dtype: computation dtype (parameters stay float32).
      attention: attention implementation (:mod:`wimfris_jax.attention`).
    """

    width: int = 768
    dim: int = 128
    text_dim: int = 512
    num_heads: int = 8
    dropout: float = 0.1
    scale: float = 0.2
    dtype: Any = None
    attention: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        words: jnp.ndarray,
        pad_mask: jnp.ndarray | None = None,
        *,
        grid: tuple[int, int],
        num_prefix: int,
        train: bool,
    ) -> jnp.ndarray:
        """x: (B, T, width) = norm2 of the block input, T = num_prefix + h*w; words: (B, L, text_dim).

        ``pad_mask`` (B, L) is part of the vision-adapter protocol (:mod:`wimfris_jax.families.wimfris.adapters`) and
        NOT used:
        DETRIS's cross-attention attends to padded words too (docs/detris_code.md), replicated as is."""
        b, t, c = x.shape
        h, w = grid
        if c != self.width or t != num_prefix + h * w or words.shape[-1] != self.text_dim:
            raise ValueError(
                f"DenseAligner(width={self.width}, text_dim={self.text_dim}) got x {x.shape} with grid {grid} and "
                f"{num_prefix} prefix tokens, words {words.shape}"
            )
        f = nn.relu(nn.Dense(self.dim, kernel_init=vit_trunc_normal, dtype=self.dtype, name="D_fc1")(x))
        xs = f[:, num_prefix:].reshape(b, h, w, self.dim)
        dense = dense_mixture(xs, ndim=2, train=train, dtype=self.dtype) + xs
        cross = CrossModalAttention(
            self.dim, self.num_heads, self.dropout, dtype=self.dtype, attention=self.attention, name="cross"
        )(
            dense.reshape(b, h * w, self.dim), words, deterministic=not train
        )
        out = jnp.concatenate([f[:, :num_prefix], cross], axis=1) + f
        return self.scale * nn.Dense(self.width, kernel_init=vit_trunc_normal, dtype=self.dtype, name="D_fc2")(out)


class DMoC(nn.Module):
    """DETRIS text adapter (D-MoC over word positions, 1-D convolutions), eq. (4): (B, L, width) -> (B, L, width).

    Token 0 (SOT) bypasses the convolutions. Unscaled: the model multiplies by its text-adapter scale (0.2).

    Attributes:
      width: the text tower's width (512); dim: adapter width d (64); dtype: computation dtype.
    """

    width: int = 512
    dim: int = 64
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """x: (B, L, width), the block's stream after attention (not layer-normed); L >= 2."""
        if x.shape[-1] != self.width or x.shape[1] < 2:
            raise ValueError(f"DMoC(width={self.width}) needs (B, L >= 2, {self.width}); got {x.shape}")

        def dense(features: int, fan_in: int, name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=torch_default_kernel,
                bias_init=torch_default_bias(fan_in),
                dtype=self.dtype,
                name=name,
            )

        f = nn.relu(dense(self.dim, self.width, "D_fc1")(x))
        dense_out = dense_mixture(f[:, 1:], ndim=1, train=train, torch_init=True, dtype=self.dtype)
        out = jnp.concatenate([f[:, :1], dense_out], axis=1) + f
        return dense(self.width, self.dim, "D_fc2")(out)
