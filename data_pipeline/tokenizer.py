"""OpenAI CLIP byte-level BPE tokenizer, offline, in the DETRIS convention.

Source: OpenAI CLIP `simple_tokenizer.py` and DETRIS `utils/dataset.py::tokenize(..., truncate=True)`:
ids = [SOT] + bpe(clean(text)) + [EOT], cut to `context_length` with the last id forced to EOT, padded with
**0** (DETRIS's decoder masks padding with `id == 0`; the sentence feature is read at argmax(id) = EOT).
One departure from DETRIS: where that cut would fall between the byte-level BPE tokens of one character (a CJK
character or emoji spelt by several tokens), the cut moves back to the character's first token, so no partial
character is kept (unless that would leave no token). Sentences that fit are unchanged. Each `tokenize` call that
truncates warns once (`TruncationWarning`) with the number of truncated sentences.

The vocabulary is the 49,408-entry `bpe_simple_vocab_16e6.txt.gz` that ships inside the `clip-anytorch`
wheel; it is located through `importlib.util.find_spec("clip")` without importing `clip` (which would need
torchvision). The BPE itself runs in `transformers.CLIPTokenizer` (Rust `tokenizers` backend) built from an
in-memory vocab/merges; the text clean-up that tokenizer lacks (ftfy, double HTML unescape) is done here,
so ids equal OpenAI's exactly.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import logging
import os
import warnings
from collections.abc import Sequence

import ftfy
import numpy as np
import regex

from wimfris_jax.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2  # OpenAI keeps merges[1 : 48895]
CLIP_VOCAB_SIZE = 49408  # 256 bytes x 2 (with and without </w>) + the merges + SOT and EOT
_FIX = "pip install --no-deps clip-anytorch==2.6.0"


class VocabularyMissingError(UserError, FileNotFoundError):
    """The CLIP BPE vocabulary file could not be found."""


class TruncationWarning(UserWarning):
    """Sentences longer than the context length were truncated."""


def vocab_path() -> str:
    """Path of `bpe_simple_vocab_16e6.txt.gz` inside the installed `clip` package (not imported)."""
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, VOCAB_FILE)
        if os.path.isfile(path):
            return path
    where = ", ".join(locations) if locations else "no `clip` package installed"
    raise VocabularyMissingError(f"CLIP BPE vocabulary {VOCAB_FILE} not found ({where}). Install it with: {_FIX}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


class _NoTorchNotice(logging.Filter):
    """Drops transformers' "PyTorch was not found. Models won't be available ..." notice, logged when it is imported
    without torch: only its tokenizer is used here, which needs none. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


def transformers_class(name: str) -> type:
    """A class of transformers (``"CLIPTokenizer"``, ``"BertTokenizerFast"``), imported on first use (heavy: ~0.8 s)
    without the no-torch notice (:class:`_NoTorchNotice`)."""
    logger, notice = logging.getLogger("transformers"), _NoTorchNotice()  # the logger transformers/__init__ uses
    logger.addFilter(notice)
    try:
        import transformers

        return getattr(transformers, name)  # transformers resolves its exports lazily: the import happens here
    finally:
        logger.removeFilter(notice)


@functools.cache
def _tokenizer():
    """Builds (once) the transformers CLIPTokenizer from OpenAI's vocabulary, in OpenAI's id order."""
    path = vocab_path()
    try:
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise VocabularyMissingError(f"CLIP BPE vocabulary {path} is unreadable ({e}). Reinstall: {_FIX}") from e
    merges = [tuple(m.split()) for m in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise VocabularyMissingError(f"CLIP BPE vocabulary {path} is truncated or malformed. Reinstall: {_FIX}")
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = transformers_class("CLIPTokenizer")(vocab=vocab, merges=merges)
    return tok, vocab[SOT_TOKEN], vocab[EOT_TOKEN]


@functools.cache
def _continues_character() -> np.ndarray:
    """Bool per id: True where the token's first byte is a UTF-8 continuation byte (it ends a character begun
    by the previous token)."""
    tok, _, _ = _tokenizer()
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    out = np.zeros(len(tok.get_vocab()), bool)
    for token, i in tok.get_vocab().items():
        out[i] = 0x80 <= byte_of.get(token[0], 0) < 0xC0
    return out


def clean(text: str) -> str:
    """OpenAI's text clean-up: ftfy repair, HTML-unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def encode(text: str) -> list[int]:
    """BPE ids of `text` without SOT/EOT (OpenAI `SimpleTokenizer.encode`)."""
    tok, _, _ = _tokenizer()
    return list(tok(clean(text), add_special_tokens=False)["input_ids"])


def special_ids() -> tuple[int, int]:
    """(SOT id, EOT id) = (49406, 49407)."""
    _, sot, eot = _tokenizer()
    return sot, eot


def tokenize(texts: str | Sequence[str], context_length: int) -> np.ndarray:
    """Token ids, int32 (N, context_length): [SOT] + bpe + [EOT], 0-padded.

    Longer sentences keep their first ``context_length - 2`` tokens (fewer where that would cut a character: see
    the module docstring) and end with EOT; one ``TruncationWarning`` per call gives how many were truncated.
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
    tok, sot, eot = _tokenizer()
    out = np.zeros((len(texts), context_length), np.int32)
    if not texts:
        return out
    encoded = tok([clean(t) for t in texts], add_special_tokens=False)["input_ids"]
    keep, truncated = context_length - 2, 0
    for i, ids in enumerate(encoded):
        if len(ids) > keep:
            truncated += 1
            n = keep
            while n > 0 and _continues_character()[ids[n]]:
                n -= 1
            ids = ids[: n or keep]
        row = [sot, *ids, eot]
        out[i, : len(row)] = row
    warn_truncated(truncated, len(texts), context_length, f"{keep} tokens + SOT and EOT")
    return out


def warn_truncated(truncated: int, total: int, context_length: int, detail: str) -> None:
    """One :class:`TruncationWarning` for a tokenizer call that cut ``truncated`` of ``total`` sentences (none: no
    warning), attributed to the caller's caller."""
    if truncated:
        warnings.warn(
            f"{truncated} of {total} sentences truncated to the word length {context_length} ({detail})",
            TruncationWarning,
            stacklevel=3,
        )
