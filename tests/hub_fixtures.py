"""Offline stand-ins for the places weights come from: a Hugging Face cache populated by the test (tiny random
transformers models written with ``save_pretrained`` into ``models--ORG--NAME/snapshots/<commit>/`` with
``refs/main``, the layout ``huggingface_hub`` reads with ``HF_HUB_OFFLINE=1``) and files for tests/http_server.py.

Sizes fit tests/small_model.py's SMALL_MODEL (DINOv2 64 wide, 2 layers, 2 heads, patch 8, 4 registers, 8x8
positions; CLIP text 64 wide, 2 layers, 77 positions, projection 64).
"""

from __future__ import annotations

import hashlib
import io
import os

COMMIT = "0123456789abcdef0123456789abcdef01234567"
DINOV2_REPO = "test-org/tiny-dinov2-reg4"
BERT_REPO = "test-org/tiny-bert"
# WIMFRIS's SMALL_MODEL text tower with one head: a bare .bin (no config.json) is sized with heads of 64 channels
TEXT_SETS = ("model.text.num_heads=1",)


def snapshot(cache: str | os.PathLike, repo: str, commit: str = COMMIT) -> str:
    """The snapshot folder of ``repo`` in the Hugging Face cache ``cache`` (created, ``refs/main`` -> ``commit``)."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    folder = os.path.join(root, "snapshots", commit)
    os.makedirs(folder, exist_ok=True)
    return folder


def tiny_dinov2(cache: str | os.PathLike) -> str:
    """A random Dinov2WithRegistersModel (safetensors + config.json) cached as :data:`DINOV2_REPO`; its folder."""
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, patch_size=8,
        image_size=64, num_register_tokens=4,
    )  # fmt: skip
    folder = snapshot(cache, DINOV2_REPO)
    Dinov2WithRegistersModel(cfg).eval().save_pretrained(folder)
    return folder


def tiny_bert(cache: str | os.PathLike, vocab: list[str]) -> str:
    """A cached BERT repo holding only its ``vocab.txt`` (the WordPiece vocabulary source); its folder."""
    folder = snapshot(cache, BERT_REPO)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return folder


def clip_text_bin() -> tuple[bytes, str]:
    """``(bytes, sha256)`` of a random CLIP text tower saved with ``torch.save`` (HF names, no config.json)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(1)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=1, max_position_embeddings=77, projection_dim=64)  # fmt: skip
    buf = io.BytesIO()
    torch.save(CLIPTextModelWithProjection(cfg).eval().state_dict(), buf)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def offline_hub(monkeypatch, hf_cache: str | os.PathLike, wimfris_cache: str | os.PathLike) -> None:
    """This process: the Hub offline with ``hf_cache`` as its cache (huggingface_hub read the environment when it
    was imported, so its constants are set), converted weights in ``wimfris_cache``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WIMFRIS_CACHE", str(wimfris_cache))


def hub_env(cache: str | os.PathLike, wimfris_cache: str | os.PathLike) -> dict[str, str]:
    """Environment of a subprocess that must find weights only in these caches (offline Hub)."""
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WIMFRIS_CACHE": str(wimfris_cache)}
