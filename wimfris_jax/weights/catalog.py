"""What the configs' default sources are: ``wimfris weights list`` prints these rows beside each config's ``init``.

Sizes are those of the files as published (approximate, from their parameter counts and stored dtypes); the
licence is the publisher's. A source not listed here (your own ``--init``) is shown without them.
"""

from __future__ import annotations

import dataclasses

VMAMBA_B = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/vssm_base_0229_ckpt_epoch_237.pth"


@dataclasses.dataclass(frozen=True)
class Entry:
    """A published weights file: what it is, its size, its licence, and what to know before using it."""

    what: str
    size: str
    licence: str
    note: str = ""


CATALOG = {
    "hf:facebook/dinov2-with-registers-base": Entry(
        "DINOv2 ViT-B/14, 4 registers (LVD-142M)", "346 MB", "Apache-2.0",
        "transformers' copy of torch hub's dinov2_vitb14_reg4_pretrain.pth: the same weights; the config's "
        "vision.interpolation decides how positions are resampled",
    ),
    "hf:facebook/dinov2-with-registers-large": Entry(
        "DINOv2 ViT-L/14, 4 registers (LVD-142M)", "1.22 GB", "Apache-2.0",
        "transformers' copy of torch hub's dinov2_vitl14_reg4_pretrain.pth",
    ),
    "openai:ViT-B/16": Entry(
        "OpenAI CLIP ViT-B/16 (the text tower is used)", "335 MB", "MIT",
        "a TorchScript archive, read as data (never run); sha256 pinned by OpenAI's URL",
    ),
    "openai:ViT-L/14": Entry(
        "OpenAI CLIP ViT-L/14 (the text tower is used)", "890 MB", "MIT",
        "a TorchScript archive, read as data (never run); sha256 pinned by OpenAI's URL",
    ),
    VMAMBA_B: Entry(
        "VMamba-B v2 (ImageNet-1K, epoch 237)", "~1 GB (a training checkpoint)", "MIT",
        "a GitHub release without a published checksum: trusted on first download, its sha256 recorded and "
        "checked from then on",
    ),
    "hf:microsoft/swin-base-patch4-window12-384-in22k": Entry(
        "Swin-B, window 12, 384 px (ImageNet-22K)", "440 MB", "Apache-2.0",
        "the weights of Microsoft's swin_base_patch4_window12_384_22k.pth; the 22K classifier is dropped",
    ),
    "hf:google-bert/bert-base-uncased": Entry(
        "BERT-base uncased (and its vocab.txt, the WordPiece vocabulary)", "440 MB", "Apache-2.0",
    ),
    "hf:thuteam/DETRIS/base/base_refcoco.pth": Entry(
        "DETRIS-B trained on RefCOCO (the whole model)", "703 MB", "see huggingface.co/thuteam/DETRIS",
        "the repository also holds large/ and mix/ checkpoints: name them as hf:thuteam/DETRIS/FOLDER/FILE",
    ),
}  # fmt: skip


def entry(spec: str) -> Entry | None:
    """The catalogue row of ``spec`` (a pinned ``@revision`` or ``#sha256=`` ignored), None if unlisted."""
    return CATALOG.get(spec.split("#")[0].split("@")[0] if spec.startswith(("hf:", "http")) else spec)
