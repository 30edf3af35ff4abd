"""Helpers of tests/backbones/test_swin.py: random transformers Swin models, their stage outputs channels last, and the
official (microsoft/Swin-Transformer) state dict built from a transformers one."""

from __future__ import annotations

import copy
import re

import numpy as np
import torch

from torch_ref.backbones import perturb


def hf_swin(seed: int = 0, std: float = 0.02, classifier: bool = False, **config) -> torch.nn.Module:
    """A random transformers ``SwinModel`` (``SwinForImageClassification`` with 3 labels when ``classifier``),
    eager attention, every parameter perturbed by N(0, std^2); eval mode."""
    from transformers import SwinConfig, SwinForImageClassification, SwinModel

    torch.manual_seed(seed)
    cfg = SwinConfig(attn_implementation="eager", num_labels=3, **config)
    return perturb((SwinForImageClassification if classifier else SwinModel)(cfg), seed=seed, std=std)


def hf_outputs(model: torch.nn.Module, images: np.ndarray, double: bool = False) -> tuple[list, np.ndarray]:
    """(stage outputs before merging (B, h_i, w_i, C_i), final layernorm output (B, h, w, C)) of a ``SwinModel`` for
    channels-last ``images``, as numpy (float64 when ``double``).

    The model is copied first: transformers' ``SwinLayer.set_shift_and_window_size`` overwrites the layer's window
    and shift for good when it meets a small map, which would change later calls at other sizes.
    """
    model = copy.deepcopy(model)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    if double:
        model, x = model.double(), x.double()
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    stages = [r.numpy().transpose(0, 2, 3, 1) for r in out.reshaped_hidden_states[1:]]  # [0]: the embeddings
    last = out.last_hidden_state.numpy().reshape(stages[-1].shape)
    return stages, last


def to_microsoft(sd: dict) -> dict:
    """A transformers ``SwinModel`` state dict (v5 in-memory names, no prefix) renamed into the official layout,
    q, k and v fused into ``attn.qkv``."""
    sd = {k: v.detach().clone() for k, v in sd.items()}
    out = {}
    subs = [
        (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"embeddings\.norm\.", "patch_embed.norm."),
        (r"encoder\.layers\.", "layers."),
        (r"\.layernorm_before\.", ".norm1."),
        (r"\.layernorm_after\.", ".norm2."),
        (r"\.attention\.o_proj\.", ".attn.proj."),
        (r"\.attention\.relative_position_bias\.relative_position_bias_table", ".attn.relative_position_bias_table"),
        (r"^layernorm\.", "norm."),
    ]
    for k in [k for k in sd if ".attention.q_proj." in k]:
        stem, leaf = k.split(".attention.q_proj.")
        sd[f"{stem}.attn.qkv.{leaf}"] = torch.cat([sd.pop(f"{stem}.attention.{n}_proj.{leaf}") for n in "qkv"])
    for k, v in sd.items():
        for pattern, repl in subs:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out
