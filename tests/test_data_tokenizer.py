"""The offline CLIP tokenizer gives OpenAI's ids and DETRIS's [SOT] + bpe + [EOT], 0-padded, truncated layout."""

import importlib.util
import os

import numpy as np
import pytest

from data_pipeline import tokenizer
from data_pipeline.tokenizer import VocabularyMissingError, tokenize, vocab_path

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


def test_detris_layout_padding_and_truncation(openai):
    sot, eot = openai.encoder["<|startoftext|>"], openai.encoder["<|endoftext|>"]
    assert tokenizer.special_ids() == (sot, eot)
    for length in (17, 22, 77):
        ids = tokenize(SENTENCES, length)
        assert ids.shape == (len(SENTENCES), length) and ids.dtype == np.int32
        for row, s in zip(ids, SENTENCES):
            full = [sot, *openai.encode(s), eot]
            if len(full) > length:  # DETRIS truncate=True: cut, last forced to EOT
                expected = full[:length]
                expected[-1] = eot
            else:
                expected = full + [0] * (length - len(full))
            assert row.tolist() == expected, (length, s)
            assert int(np.argmax(row)) == row.tolist().index(eot)  # sentence feature position
    assert tokenize(SENTENCES[19], 17)[0, -1] == eot and len(openai.encode(SENTENCES[19])) > 15
    assert tokenize("the dog", 17).shape == (1, 17)


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
