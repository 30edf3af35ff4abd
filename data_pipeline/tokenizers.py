"""Which tokenizer a config names, in one place: ``config.data.tokenizer`` is "clip" (the default, OpenAI's BPE:
:mod:`data_pipeline.tokenizer`; WIMFRIS, DETRIS, TFANet) or "wordpiece:PATH" (BERT's WordPiece from a local
vocab.txt or the folder holding it: :mod:`data_pipeline.wordpiece`; VIPA).

Training, evaluation, prediction and the demo tokenise through :func:`text_ids`; :func:`check_tokenizer` is where a
config's tokenizer meets its model's text tower (the model never imports the data pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline.tokenizer import CLIP_VOCAB_SIZE, tokenize
from wimfris_jax.errors import ConfigError, UserError

DEFAULT_TOKENIZER = "clip"


class TokenizerSpecError(UserError, ValueError):
    """A ``config.data.tokenizer`` that names no known tokenizer."""


def tokenizer_spec(data_config: Any) -> str:
    """``config.data.tokenizer`` (or any mapping's "tokenizer"), :data:`DEFAULT_TOKENIZER` when absent."""
    return str(data_config.get("tokenizer", DEFAULT_TOKENIZER))


def wordpiece_vocab(tokenizer: str) -> str | None:
    """The vocabulary path of a "wordpiece:PATH" ``config.data.tokenizer``, None for "clip"; anything else is a
    :class:`TokenizerSpecError`."""
    if tokenizer == "clip":
        return None
    kind, _, vocab = str(tokenizer).partition(":")
    if kind == "wordpiece" and vocab:
        return vocab
    raise TokenizerSpecError(f"tokenizer {tokenizer!r}: use 'clip' or 'wordpiece:PATH' (a vocab.txt or its folder)")


def vocabulary_size(tokenizer: str = DEFAULT_TOKENIZER) -> int:
    """One more than the largest id ``tokenizer`` can produce, i.e. the rows an embedding needs: 49,408 for CLIP's
    BPE; for WordPiece, read from the file, its largest id + 1 (not its number of entries: a ``tokenizer.json`` may
    number its tokens sparsely; ids are never negative, :func:`data_pipeline.wordpiece.read_vocab`)."""
    vocab = wordpiece_vocab(tokenizer)
    if vocab is None:
        return CLIP_VOCAB_SIZE
    from data_pipeline.wordpiece import read_vocab, vocab_file  # lazy: transformers' tokenizers only when used

    return max(read_vocab(vocab_file(vocab)).values()) + 1


def text_ids(texts: str | Sequence[str], context_length: int, tokenizer: str = DEFAULT_TOKENIZER) -> np.ndarray:
    """Token ids, int32 (N, context_length), 0 = padding, by the tokenizer ``config.data.tokenizer`` names:
    "clip" (:func:`data_pipeline.tokenizer.tokenize`) or "wordpiece:PATH" ([CLS] ... [SEP],
    :func:`data_pipeline.wordpiece.wordpiece_tokenize`)."""
    vocab = wordpiece_vocab(tokenizer)
    if vocab is None:
        return tokenize(texts, context_length)
    from data_pipeline.wordpiece import wordpiece_tokenize  # lazy: only configs with a WordPiece vocabulary

    return wordpiece_tokenize(texts, context_length, vocab)


def check_tokenizer(model: Any, tokenizer: str) -> None:
    """Raises a ConfigError when ``tokenizer`` (``config.data.tokenizer``) can produce ids that ``model``'s text tower
    cannot embed, i.e. its largest id is >= ``model.text_encoder.vocab_size``: the embedding gather would clamp them
    silently (CLIP ids into a BERT, say) or the loss turn non-finite. Models without one are not checked."""
    size = getattr(getattr(model, "text_encoder", None), "vocab_size", None)
    if size is None:
        return
    n = vocabulary_size(tokenizer)  # the largest id + 1, not the number of tokens
    if n > int(size):
        raise ConfigError(
            f"config.data.tokenizer={tokenizer!r} has ids up to {n - 1:,} but the model's text tower embeds "
            f"{int(size):,} (ids 0 to {int(size) - 1:,}, config.model.text.vocab_size): pick the tokenizer of the text "
            "weights"
        )
