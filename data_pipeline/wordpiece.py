"""Offline BERT WordPiece tokenizer, from the ``vocab.txt`` that ships with the BERT weights (CrossVLT's text input).

ids = [CLS] + wordpiece(text) + [SEP], 0-padded to ``context_length`` ([PAD] must be id 0, as in every BERT
vocabulary: :class:`wimfris_jax.backbones.bert.Bert` masks ``ids == 0``). Longer sentences keep their first
``context_length - 2`` pieces and still end with [SEP] (CrossVLT: ``context_length`` 21 with [CLS]); that is
transformers' ``truncation=True, max_length=context_length``, so the ids equal ``BertTokenizerFast(...)(text,
padding="max_length", truncation=True, max_length=context_length)["input_ids"]``. Each call that truncates warns once
(:class:`~data_pipeline.tokenizer.TruncationWarning`) with the number of truncated sentences.

``vocab`` is a ``vocab.txt`` (one token a line, the line number is the id) or a folder holding ``vocab.txt`` or,
failing that, a WordPiece ``tokenizer.json`` (its ``model.vocab`` is used; the normalisation is always BERT's with
``lower_case``). The WordPiece itself runs in transformers' ``BertTokenizerFast`` (Rust ``tokenizers``), imported on
first use and built once per (vocabulary file, ``lower_case``).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence

import numpy as np

from data_pipeline.tokenizer import VocabularyMissingError, transformers_class, warn_truncated
from wimfris_jax.errors import UserError
from wimfris_jax.io import check_file_size, read_json_object

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
# Bounds of a vocabulary file: BERT's are 0.2-1 MB (30,522 to 119,547 entries; XLM-R's 250,002).
MAX_VOCAB_BYTES = 64 << 20
MAX_VOCAB_ENTRIES = 1_000_000


class VocabularyError(UserError, ValueError):
    """A BERT vocabulary that cannot serve the model: unreadable, too large, with an id that is not an integer from 0
    to MAX_VOCAB_ENTRIES - 1, or without [PAD] = 0, [UNK], [CLS] or [SEP]."""


def vocab_file(vocab: str | os.PathLike) -> str:
    """The vocabulary file ``vocab`` names: the file itself, or a folder's ``vocab.txt`` / ``tokenizer.json``, or a
    named source (:mod:`wimfris_jax.weights.sources`): ``hf:ORG/NAME`` (its vocab.txt, e.g.
    ``hf:google-bert/bert-base-uncased``), ``hf:ORG/NAME/FILE`` or a URL, fetched into the caches once."""
    from wimfris_jax.weights.sources import fetch, hub_file, is_named, parse_source

    if isinstance(vocab, str) and is_named(vocab):
        source = parse_source(vocab)
        return hub_file(source, source.path or "vocab.txt") if source.kind == "hf" else fetch(source).path
    path = os.path.abspath(os.fspath(vocab))
    if os.path.isdir(path):
        for name in ("vocab.txt", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise VocabularyMissingError(f"BERT vocabulary not found: {path} holds no vocab.txt or tokenizer.json")
    if not os.path.isfile(path):
        raise VocabularyMissingError(f"BERT vocabulary not found: no file {path}")
    return path


def _read_vocab_txt(path: str) -> dict[str, int]:
    """{token: line number} of a ``vocab.txt`` (transformers' ``load_vocab``), read line by line: more than
    MAX_VOCAB_ENTRIES lines is a VocabularyError before the rest is read."""
    vocab: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= MAX_VOCAB_ENTRIES:
                raise VocabularyError(f"BERT vocabulary {path} has more than {MAX_VOCAB_ENTRIES:,} lines")
            vocab[line.rstrip("\n")] = i  # a repeated token keeps its last id, as load_vocab does
    return vocab


def _read_tokenizer_json(path: str) -> dict[str, int]:
    """``model.vocab`` of a ``tokenizer.json``, checked: at most MAX_VOCAB_ENTRIES entries, each id an integer in
    [0, MAX_VOCAB_ENTRIES)."""
    model = read_json_object(path, VocabularyError, MAX_VOCAB_BYTES).get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict):
        raise VocabularyError(f"BERT vocabulary {path}: field 'model.vocab' is not a {{token: id}} object")
    if len(vocab) > MAX_VOCAB_ENTRIES:
        raise VocabularyError(f"BERT vocabulary {path} has {len(vocab):,} entries, over {MAX_VOCAB_ENTRIES:,}")
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < MAX_VOCAB_ENTRIES:
            raise VocabularyError(
                f"BERT vocabulary {path}: token {token!r:.40} has id {i!r:.40}, not an integer from 0 to "
                f"{MAX_VOCAB_ENTRIES - 1:,}"
            )
    return vocab


def read_vocab(path: str) -> dict[str, int]:
    """{token: id} of a ``vocab.txt`` (line numbers; transformers' ``load_vocab``) or a ``tokenizer.json``
    (``model.vocab``), checked: at most MAX_VOCAB_BYTES (before reading) and MAX_VOCAB_ENTRIES entries, ids from 0
    to MAX_VOCAB_ENTRIES - 1, [PAD] is 0, [UNK], [CLS] and [SEP] exist. VocabularyError, one line naming the file,
    otherwise."""
    try:
        check_file_size(path, MAX_VOCAB_BYTES, "a vocabulary", VocabularyError)
        vocab = _read_tokenizer_json(path) if path.endswith(".json") else _read_vocab_txt(path)
    except (OSError, UnicodeDecodeError) as e:
        raise VocabularyError(f"BERT vocabulary {path} is unreadable ({type(e).__name__}: {e})") from e
    missing = [t for t in SPECIAL if t not in vocab]
    if missing:
        raise VocabularyError(f"BERT vocabulary {path} lacks the special token(s) {missing}")
    if vocab["[PAD]"] != 0:
        raise VocabularyError(
            f"BERT vocabulary {path} has [PAD] at id {vocab['[PAD]']}; the model masks padding as id 0, so [PAD] "
            "must be the first entry"
        )
    return vocab


@functools.cache
def _tokenizer(path: str, lower_case: bool):
    """(transformers BertTokenizerFast, [CLS] id, [SEP] id) for the vocabulary file ``path``; built once."""
    vocab = read_vocab(path)
    BertTokenizerFast = transformers_class("BertTokenizerFast")  # noqa: N806 - a class
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        # transformers 5: ``vocab`` (a dict); its ``vocab_file`` keyword is ignored (a 5-token default vocabulary)
        tok = BertTokenizerFast(vocab=vocab, do_lower_case=lower_case)
    elif path.endswith(".json"):  # transformers 4
        tok = BertTokenizerFast(tokenizer_file=path, do_lower_case=lower_case)
    else:
        tok = BertTokenizerFast(vocab_file=path, do_lower_case=lower_case)
    return tok, vocab["[CLS]"], vocab["[SEP]"]


def wordpiece_tokenize(
    texts: str | Sequence[str], context_length: int, vocab: str | os.PathLike, lower_case: bool = True
) -> np.ndarray:
    """Token ids, int32 (N, context_length): [CLS] + pieces + [SEP], 0-padded.

    Args:
      texts: one sentence or several.
      context_length: ids per row, [CLS] and [SEP] included (>= 2); longer sentences keep their first
        ``context_length - 2`` pieces, and one ``TruncationWarning`` per call gives how many were cut.
      vocab: a ``vocab.txt``, or a folder holding one (or a ``tokenizer.json``).
      lower_case: BERT's ``do_lower_case`` (True for the ``*-uncased`` models, which also strips accents).

    Raises:
      VocabularyMissingError: no vocabulary at ``vocab`` (one line naming the path).
      VocabularyError: an unreadable vocabulary, or one whose [PAD] is not id 0.
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 ([CLS] and [SEP]), got {context_length}")
    tok, cls, sep = _tokenizer(vocab_file(vocab), bool(lower_case))
    out = np.zeros((len(texts), context_length), np.int32)
    if not texts:
        return out
    encoded = tok(list(texts), add_special_tokens=False)["input_ids"]
    keep, truncated = context_length - 2, 0
    for i, ids in enumerate(encoded):
        truncated += len(ids) > keep
        row = [cls, *ids[:keep], sep]
        out[i, : len(row)] = row
    warn_truncated(truncated, len(texts), context_length, f"{keep} WordPiece tokens + [CLS] and [SEP]")
    return out
