"""Shared helpers of the backbone parity tests (tests/backbones/test_dinov2.py, tests/backbones/test_clip_text.py,
tests/backbones/test_bert.py) and
benchmarks/bench_backbones.py: random transformers models at full size, and the one comparison they use."""

from __future__ import annotations

import numpy as np
import torch


def perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Adds noise to every parameter, so constants (LayerScale 1, zero biases and registers) are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def max_abs(a, b) -> float:
    """max |a - b| in float64."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def output_errors(ours: dict, theirs: dict) -> dict[str, float]:
    """max-abs errors per entry of the backbones' one output convention (wimfris_jax.backbones): each of
    "hidden_states" ("layer<i>"), "last_hidden_state" ("last") and, where the reference has them, "pooled" and
    "text_embeds"; an entry the reference lacks must be absent from ours too. ``theirs``: the same keys, numpy."""
    assert len(ours["hidden_states"]) == len(theirs["hidden_states"])
    errs = {f"layer{i}": max_abs(a, b) for i, (a, b) in enumerate(zip(ours["hidden_states"], theirs["hidden_states"]))}
    errs["last"] = max_abs(ours["last_hidden_state"], theirs["last_hidden_state"])
    for key in ("pooled", "text_embeds"):
        if key in theirs:
            errs[key] = max_abs(ours[key], theirs[key])
        else:
            assert key not in ours, key
    return errs


def assert_outputs_match(ours: dict, theirs: dict, tol: float) -> None:
    errs = output_errors(ours, theirs)
    assert max(errs.values()) <= tol, errs


def hf_outputs(out) -> dict:
    """A transformers output (run with ``output_hidden_states=True``) in the one output convention, as numpy."""
    d = {"hidden_states": tuple(h.detach().numpy() for h in out.hidden_states),
         "last_hidden_state": out.last_hidden_state.detach().numpy()}  # fmt: skip
    if getattr(out, "pooler_output", None) is not None:
        d["pooled"] = out.pooler_output.detach().numpy()
    return d


def dinov2_b14_reg4(seed: int = 0) -> torch.nn.Module:
    """A random transformers DINOv2-B/14 with 4 registers (518-pixel position table), DETRIS's backbone; eval mode."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    cfg = Dinov2WithRegistersConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_register_tokens=4,
        image_size=518,
        patch_size=14,
    )
    return Dinov2WithRegistersModel(cfg).eval()


def clip_b16_text(seed: int = 0) -> torch.nn.Module:
    """A random transformers CLIP ViT-B/16 text tower with its projection (49408 x 512, 12 layers, 8 heads,
    77 positions, projection 512; EOT id 49407); eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(projection_dim=512)).eval()
