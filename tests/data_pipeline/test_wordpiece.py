"""The offline WordPiece tokenizer gives transformers' BertTokenizerFast ids in the [CLS] + pieces + [SEP], 0-padded,
truncated layout, from a vocab.txt or a folder (vocab.txt or tokenizer.json), and names a missing or bad vocabulary."""

from __future__ import annotations

import functools
import json
import os
import warnings

import numpy as np
import pytest

from data_pipeline import wordpiece
from data_pipeline.tokenizer import TruncationWarning, VocabularyMissingError
from data_pipeline.wordpiece import VocabularyError, wordpiece_tokenize

WORDS = [
    *("the", "man", "woman", "on", "in", "left", "right", "of", "red", "shirt", "play", "holding", "umbrella"),
    *("near", "bus", "stop", "cafe", "resume", "a", "dog", "tall", "tree", ",", ".", "!", "?", "'", "-", "(", ")"),
    *("2", "people", "1", "zebra", "giraffe", "中", "文", "Guy"),
]
PIECES = ["##s", "##ing", "##er", "##ed", "##y", "##a", "##b", "##e", "##ra", "##st", "##2", "##3", "##0"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *PIECES]

SENTENCES = [
    "the man on the left",
    "Guy in RED shirt!!",
    "  lots   of\tspaces \n here ",
    "caf\u00e9 r\u00e9sum\u00e9",  # accents: stripped when lower-casing
    "the dog's tall trees, near the bus-stop (left)",
    "2 people 1230 zebras",
    "中文 giraffe",
    "woman playing holding umbrella near the bus stop on a rainy day in the middle of the city center",
    "",
    "unknownword zz",
]


@pytest.fixture(scope="module")
def vocab_txt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return str(path)


@functools.cache
def hf_tokenizer(folder: str, lower_case: bool):
    """transformers' own reading of the folder's vocab.txt (from_pretrained: transformers 5 ignores the
    ``vocab_file`` keyword of ``BertTokenizerFast(...)``)."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(folder, do_lower_case=lower_case)


def reference(vocab_txt: str, texts: list[str], length: int, lower_case: bool = True) -> np.ndarray:
    tok = hf_tokenizer(os.path.dirname(vocab_txt), lower_case)
    return np.array(tok(texts, padding="max_length", truncation=True, max_length=length)["input_ids"])


@pytest.mark.parametrize("lower_case", [True, False])
def test_ids_equal_transformers(vocab_txt, lower_case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = wordpiece_tokenize(SENTENCES, 21, vocab_txt, lower_case=lower_case)
    assert ids.dtype == np.int32 and ids.shape == (len(SENTENCES), 21)
    np.testing.assert_array_equal(ids, reference(vocab_txt, SENTENCES, 21, lower_case))
    assert [str(w.message) for w in caught if w.category is TruncationWarning] == [
        "1 of 10 sentences truncated to the word length 21 (19 WordPiece tokens + [CLS] and [SEP])"
    ]
    assert (ids[:, 0] == 2).all()
    # pieces, [UNK] and padding as expected on a hand-checked row: "2 people 1230 zebras"
    if lower_case:
        pieces = ["2", "people", "1", "##2", "##3", "##0", "zebra", "##s"]
        assert ids[5].tolist()[:10] == [2, *map(VOCAB.index, pieces), 3]
        assert ids[9].tolist()[:5] == [2, 1, 1, 3, 0]  # unknown words -> [UNK]
    else:  # "Guy" and "RED" keep their case: only "Guy" is in the vocabulary
        assert ids[1].tolist()[:4] == [2, VOCAB.index("Guy"), VOCAB.index("in"), 1]


def test_truncation_keeps_cls_and_sep_and_counts(vocab_txt):
    texts = ["the man " * 20, "red shirt", "tall tree " * 3]
    with pytest.warns(TruncationWarning, match=r"^2 of 3 sentences truncated to the word length 6 \(4 WordPiece"):
        ids = wordpiece_tokenize(texts, 6, vocab_txt)
    np.testing.assert_array_equal(ids, reference(vocab_txt, texts, 6))
    the, man = VOCAB.index("the"), VOCAB.index("man")
    assert ids[0].tolist() == [2, the, man, the, man, 3]
    assert ids[1].tolist() == [2, VOCAB.index("red"), VOCAB.index("shirt"), 3, 0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = wordpiece_tokenize("the man the man", 6, vocab_txt)  # 4 pieces fit exactly: no warning
    assert exact.tolist() == [[2, the, man, the, man, 3]]
    assert wordpiece_tokenize([], 6, vocab_txt).shape == (0, 6)
    assert wordpiece_tokenize("", 3, vocab_txt).tolist() == [[2, 3, 0]]
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        wordpiece_tokenize("x", 1, vocab_txt)


def test_folder_vocab_txt_and_tokenizer_json(vocab_txt, tmp_path, monkeypatch):
    ids = wordpiece_tokenize(SENTENCES[:7], 24, vocab_txt)
    folder = tmp_path / "only_json"
    hf_tokenizer(os.path.dirname(vocab_txt), True).save_pretrained(folder)
    (folder / "vocab.txt").unlink(missing_ok=True)
    assert (folder / "tokenizer.json").exists()
    np.testing.assert_array_equal(wordpiece_tokenize(SENTENCES[:7], 24, folder), ids)
    np.testing.assert_array_equal(wordpiece_tokenize(SENTENCES[:7], 24, os.path.dirname(vocab_txt)), ids)
    monkeypatch.chdir(os.path.dirname(vocab_txt))
    np.testing.assert_array_equal(wordpiece_tokenize(SENTENCES[:7], 24, "vocab.txt"), ids)  # relative path
    # one tokenizer per (file, lower_case)
    before = wordpiece._tokenizer.cache_info().currsize
    wordpiece_tokenize("the man", 5, vocab_txt)
    assert wordpiece._tokenizer.cache_info().currsize == before


def test_missing_and_bad_vocabularies(tmp_path):
    missing = tmp_path / "nowhere" / "vocab.txt"
    with pytest.raises(VocabularyMissingError) as e:
        wordpiece_tokenize("the man", 8, str(missing))
    assert str(e.value) == f"BERT vocabulary not found: no file {missing}" and "\n" not in str(e.value)
    with pytest.raises(VocabularyMissingError, match=f"{tmp_path} holds no vocab.txt or tokenizer.json"):
        wordpiece_tokenize("the man", 8, tmp_path)
    bad = tmp_path / "vocab_pad1.txt"
    bad.write_text("\n".join(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "the"]) + "\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"vocab_pad1.txt has \[PAD\] at id 1; .* must be the first entry"):
        wordpiece_tokenize("the", 8, bad)
    no_sep = tmp_path / "vocab_nosep.txt"
    no_sep.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "the"]) + "\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"lacks the special token\(s\) \['\[SEP\]'\]"):
        wordpiece_tokenize("the", 8, no_sep)


def _tokenizer_json(path, vocab: dict) -> str:
    path.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": vocab}}), encoding="utf-8")
    return str(path)


def test_model_check_uses_the_largest_id_not_the_number_of_tokens(tmp_path):
    """7 tokens numbered up to 60,006 passed a count check, then VIPA's loss went non-finite minutes later."""
    from types import SimpleNamespace

    from data_pipeline.tokenizers import check_tokenizer, vocabulary_size
    from wimfris_jax.config import ConfigError

    sparse = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "the": 4, "dog": 5, "cat": 60006}
    spec = "wordpiece:" + _tokenizer_json(tmp_path / "tokenizer.json", sparse)
    assert vocabulary_size(spec) == 60007
    bert = SimpleNamespace(text_encoder=SimpleNamespace(vocab_size=30522))
    with pytest.raises(ConfigError, match=r"has ids up to 60,006 but the model's text tower embeds 30,522 \(ids 0 to"):
        check_tokenizer(bert, spec)
    check_tokenizer(SimpleNamespace(text_encoder=SimpleNamespace(vocab_size=60007)), spec)  # fits: no error


@pytest.mark.parametrize("bad_id", [-1, "7", 1.5, True, 10**6])
def test_ids_that_are_negative_or_not_integers_are_refused(tmp_path, bad_id):
    path = _tokenizer_json(tmp_path / "tokenizer.json", {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "x": bad_id})
    with pytest.raises(VocabularyError) as e:
        wordpiece.read_vocab(path)
    assert str(e.value) == f"BERT vocabulary {path}: token 'x' has id {bad_id!r}, not an integer from 0 to 999,999"


def test_vocabulary_size_and_lines_are_bounded_before_reading(tmp_path, monkeypatch):
    """A 500 MB vocabulary cost 5.2 GB and 142 s before its refusal: now the size is checked first."""
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    size = os.path.getsize(path)
    monkeypatch.setattr(wordpiece, "MAX_VOCAB_BYTES", size - 1)
    monkeypatch.setattr(wordpiece, "_read_vocab_txt", lambda p: pytest.fail("read a file over the limit"))
    with pytest.raises(VocabularyError) as e:
        wordpiece.read_vocab(str(path))
    assert str(e.value) == f"{path}: {size:,} bytes, over the {size - 1:,}-byte limit of a vocabulary"
    monkeypatch.undo()
    monkeypatch.setattr(wordpiece, "MAX_VOCAB_ENTRIES", 10)
    with pytest.raises(VocabularyError, match=r"vocab\.txt has more than 10 lines"):
        wordpiece.read_vocab(str(path))
    json_path = _tokenizer_json(tmp_path / "tokenizer.json", {t: i for i, t in enumerate(VOCAB)})
    with pytest.raises(VocabularyError, match=rf"tokenizer\.json has {len(VOCAB)} entries, over 10"):
        wordpiece.read_vocab(json_path)
    (tmp_path / "tokenizer.json").write_text('{"model": []}')
    with pytest.raises(VocabularyError, match=r"field 'model.vocab' is not a \{token: id\} object"):
        wordpiece.read_vocab(json_path)
