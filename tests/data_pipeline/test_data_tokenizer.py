"""The offline CLIP tokenizer gives OpenAI's ids and DETRIS's [SOT] + bpe + [EOT], 0-padded, truncated layout."""

import importlib.util
import os
import warnings

import numpy as np
import pytest

from data_pipeline import tokenizer
from data_pipeline.tokenizer import TruncationWarning, VocabularyMissingError, tokenize, vocab_path

SENTENCES = [
    "the man on the left",
    "Guy in RED shirt!!",
    "  lots   of\tspaces \n here ",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "&amp;lt;b&amp;gt; bold &quot;quoted&quot;",
    "it's the dog's bone, isn't it? we'll see, they've gone, I'm here, you'd know",
    "2 people 123 4567 3.5kg",
    "\u4e2d\u6587 \u5b57 \u65e5\u672c\u8a9e\u306e\u6587",
    "emoji \U0001f600 smile \U0001f44d\U0001f3fd",
    "\u00c5ngstr\u00f6m \u212b unit",
    "\u00c3\u00a9 mojibake caf\u00c3\u00a9",
    "non\u00a0breaking\u2009thin space",
    "\u0130stanbul \u0131\u015f\u0131k",
    "\u00df STRASSE stra\u00dfe",
    "a" * 80,
    "x-ray/left-most (partly) [hidden] {braces} <angle>",
    "the<|endoftext|>end <|startoftext|>",
    "UPPER lower MiXeD CaSe",
    "second from right, behind the tall tree ... ???",
    "woman in white holding umbrella near the bus stop on a rainy day in the middle of the city center",
    "\u201csmart quotes\u201d and \u2018single\u2019 \u2014 dashes \u2013 too",
    "tab\tseparated\twords",
    "#hashtag @mention $money 100%",
    "ﬁne ligature ﬂag",
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440",
    "a\u0301 combining accent",
    "L",
    "kid&#39;s toy &#x27;hex&#x27;",
    "zebra giraffe elephant hippopotamus rhinoceros crocodile",
]


@pytest.fixture(scope="module")
def openai():
    path = os.path.join(os.path.dirname(vocab_path()), "simple_tokenizer.py")
    spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # by file path: `import clip` needs torchvision
    return module.SimpleTokenizer(vocab_path())


def test_ids_equal_openai(openai):
    for s in SENTENCES:
        assert tokenizer.encode(s) == openai.encode(s), s


def _tokenize_recording(texts, length):
    """tokenize() and the warnings it emitted (all of them, whatever the filters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tokenize(texts, length)
    return ids, [w for w in caught if issubclass(w.category, TruncationWarning)]


def _whole_characters(openai, ids):
    """True when the BPE tokens ``ids`` spell whole UTF-8 characters (OpenAI's byte decoder, independently)."""
    data = bytes(openai.byte_decoder[c] for i in ids for c in openai.decoder[i].replace("</w>", ""))
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_detris_layout_padding_and_truncation(openai):
    sot, eot = openai.encoder["<|startoftext|>"], openai.encoder["<|endoftext|>"]
    assert tokenizer.special_ids() == (sot, eot)
    for length in (17, 22, 77):
        ids, warned = _tokenize_recording(SENTENCES, length)
        assert ids.shape == (len(SENTENCES), length) and ids.dtype == np.int32
        n_long = 0
        for row, s in zip(ids, SENTENCES):
            full = [sot, *openai.encode(s), eot]
            if len(full) > length:  # DETRIS truncate=True: cut, last forced to EOT (no partial character here)
                n_long += 1
                expected = full[:length]
                expected[-1] = eot
                assert _whole_characters(openai, expected[1:-1]), s
            else:
                expected = full + [0] * (length - len(full))
            assert row.tolist() == expected, (length, s)
            assert int(np.argmax(row)) == row.tolist().index(eot)  # sentence feature position
        assert len(warned) == (1 if n_long else 0), length  # one warning per call, with the count and word length
        if length < 77:
            assert n_long > 0 and str(warned[0].message).startswith(
                f"{n_long} of {len(SENTENCES)} sentences truncated to the word length {length} "
            )
    with pytest.warns(TruncationWarning, match="1 of 1 sentences truncated to the word length 17"):
        assert tokenize(SENTENCES[19], 17)[0, -1] == eot and len(openai.encode(SENTENCES[19])) > 15
    ids, warned = _tokenize_recording("the dog", 17)
    assert ids.shape == (1, 17) and warned == []


def test_truncation_does_not_cut_a_character(openai):
    sot, eot = tokenizer.special_ids()
    text = "\u4e2d\u6587 \u5b57 the dog"  # every CJK character here is 2 byte-level BPE tokens
    bpe = openai.encode(text)
    assert len(bpe) == 8 and _whole_characters(openai, bpe[:2]) and not _whole_characters(openai, bpe[:3])
    ids, warned = _tokenize_recording([text, text + " on the left", "the dog"], 5)  # room for 3 tokens
    assert ids.tolist() == [[sot, *bpe[:2], eot, 0]] * 2 + [[sot, *openai.encode("the dog"), eot, 0]]
    assert len(warned) == 1 and str(warned[0].message).startswith("2 of 3 sentences truncated to the word length 5")
    # a cut on a character boundary is DETRIS's; a lone character longer than the room keeps DETRIS's cut too
    assert _tokenize_recording(text, 6)[0].tolist() == [[sot, *bpe[:4], eot]]
    assert _tokenize_recording("\u4e2d", 3)[0].tolist() == [[sot, bpe[0], eot]]


def test_missing_vocabulary_names_the_fix(monkeypatch):
    tokenizer._tokenizer.cache_clear()
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VocabularyMissingError, match=r"pip install --no-deps clip-anytorch==2\.6\.0"):
        tokenize("dog", 17)
    monkeypatch.undo()
    tokenizer._tokenizer.cache_clear()
    assert tokenize("dog", 5).shape == (1, 5)


def test_context_length_too_small():
    with pytest.raises(ValueError, match="context_length"):
        tokenize("dog", 1)
