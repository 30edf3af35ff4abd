"""Weights by name, offline: source strings, the Hugging Face cache read with the Hub offline (populated by the test,
hub_fixtures.py), URLs from a local HTTP server (pinned, trusted on first use, mismatched, missing), the converted
cache (a hit the second time, a new key for a new converter version) and a WordPiece vocabulary by name."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from http_server import LocalServer
from hub_fixtures import BERT_REPO, COMMIT, DINOV2_REPO, offline_hub, tiny_bert, tiny_dinov2

from wimfris_jax.weights import sources
from wimfris_jax.weights.download import DownloadError
from wimfris_jax.weights.sources import OPENAI_CLIP, Source, SourceError, UntrustedDownload, fetch, local, parse_source


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    tiny_dinov2(cache)
    tiny_bert(cache, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "circle"])
    return cache


@pytest.fixture
def offline(hf_cache, tmp_path, monkeypatch):
    """The Hub offline, its cache the test's; the converted-weights cache in tmp_path."""
    offline_hub(monkeypatch, hf_cache, tmp_path / "wimfris_cache")
    return hf_cache


@pytest.mark.parametrize(
    "spec, want",
    [
        ("hf:facebook/dinov2-with-registers-base", Source("hf:facebook/dinov2-with-registers-base", "hf",
                                                          "facebook/dinov2-with-registers-base")),
        ("hf:thuteam/DETRIS/base/base_refcoco.pth@v1", Source("hf:thuteam/DETRIS/base/base_refcoco.pth@v1", "hf",
                                                              "thuteam/DETRIS", "base/base_refcoco.pth", "v1")),
        ("https://h.org/w/a.pth#sha256=" + "AB" * 32, Source("https://h.org/w/a.pth#sha256=" + "AB" * 32, "url",
                                                             "https://h.org/w/a.pth", sha256="ab" * 32)),
        ("http://h.org/a.bin", Source("http://h.org/a.bin", "url", "http://h.org/a.bin")),
        ("weights/clip.msgpack", Source("weights/clip.msgpack", "file", "weights/clip.msgpack")),
    ],
)  # fmt: skip
def test_parse_source(spec, want):
    assert parse_source(spec) == want


def test_openai_alias_is_pinned_by_its_url():
    s = parse_source("openai:ViT-B/16")
    assert s.kind == "url" and s.location == OPENAI_CLIP["ViT-B/16"] and s.location.endswith("/ViT-B-16.pt")
    assert s.sha256 == "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty weights source"),
        ("hf:facebook", "not hf:ORG/NAME[/FILE][@REVISION]"),
        ("hf:a/b@", "not hf:ORG/NAME[/FILE][@REVISION]"),
        ("openai:ViT-H/14", "unknown OpenAI CLIP model; known: ViT-B/32, ViT-B/16"),
        ("https://h.org/a.pth#sha256=abc", "the fragment must be #sha256=<64 hex digits>"),
        ("https://h.org/", "the URL names no file"),
        ("ftp://h.org/a.pth", "unsupported scheme"),
    ],
)
def test_bad_sources_are_one_line(spec, message):
    with pytest.raises(SourceError) as e:
        parse_source(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hf_from_the_offline_cache(offline):
    got = fetch(f"hf:{DINOV2_REPO}", progress=False)
    assert got.path == os.path.join(offline, "models--test-org--tiny-dinov2-reg4", "snapshots", COMMIT,
                                    "model.safetensors")  # fmt: skip
    assert got.identity == f"hf:{DINOV2_REPO}/model.safetensors@{COMMIT}"
    assert local(f"hf:{DINOV2_REPO}") == got  # known without the network
    pinned = fetch(f"hf:{DINOV2_REPO}/config.json@{COMMIT}", progress=False)
    assert pinned.path == os.path.join(os.path.dirname(got.path), "config.json")
    with pytest.raises(SourceError) as e:
        fetch("hf:test-org/absent", progress=False)
    msg = str(e.value)
    assert msg.startswith("hf:test-org/absent: model.safetensors / pytorch_model.bin not in the Hugging Face cache")
    assert "the Hub is off (HF_HUB_OFFLINE=1)" in msg and "\n" not in msg
    assert local("hf:test-org/absent") is None


def test_url_pinned_once_then_from_the_cache(offline):
    data = os.urandom(3000)
    digest = hashlib.sha256(data).hexdigest()
    with LocalServer({"/w/a.bin": data}) as server:
        spec = f"{server.url('/w/a.bin')}#sha256={digest}"
        assert local(spec) is None
        got = fetch(spec, progress=False)
        with open(got.path, "rb") as f:
            assert f.read() == data and got.identity == f"sha256:{digest}"
        assert fetch(spec, progress=False) == got and local(spec) == got
        assert len(server.requests) == 1  # the second fetch used the copy on disk

        with pytest.raises(DownloadError) as e:
            fetch(f"{server.url('/w/b.bin')}#sha256={digest}", progress=False)
        assert str(e.value) == f"{server.url('/w/b.bin')}: HTTP 404 Not Found"

        server.files["/w/c.bin"] = data
        with pytest.raises(DownloadError) as e:
            fetch(f"{server.url('/w/c.bin')}#sha256={'0' * 64}", progress=False)
        assert f"sha256 mismatch: expected {'0' * 64}, got {digest}" in str(e.value)
        folder = os.path.dirname(sources._download_paths(server.url("/w/c.bin"))[0])
        assert os.listdir(folder) == []  # nothing kept


def test_url_unpinned_is_trusted_on_first_use(offline):
    with LocalServer({"/v.pth": b"first bytes"}) as server:
        url = server.url("/v.pth")
        with pytest.warns(UntrustedDownload, match="has no pinned sha256; recorded"):
            first = fetch(url, progress=False)
        os.remove(first.path)  # the copy is lost, and the server now sends other bytes
        server.files["/v.pth"] = b"other bytes"
        with pytest.raises(DownloadError, match="sha256 mismatch"):
            fetch(url, progress=False)


def test_converted_once(offline, monkeypatch):
    """The first conversion writes the cache; the second is a hit; a new converter version converts again."""
    from port_weights import cache, dinov2
    from wimfris_jax.io import flatten, load_params

    spec = f"hf:{DINOV2_REPO}"
    assert not cache.cached(spec, "dinov2")
    path, hit = cache.converted(spec, "dinov2", progress=False)
    assert not hit and cache.cached(spec, "dinov2")
    params, meta = load_params(path)
    assert meta["source"] == spec and meta["identity"] == f"hf:{DINOV2_REPO}/model.safetensors@{COMMIT}"
    want, _ = dinov2.from_checkpoint(fetch(spec, progress=False).path)
    for k, v in flatten(want).items():
        np.testing.assert_array_equal(flatten(params)[k], v, err_msg=k)
    assert cache.converted(spec, "dinov2", progress=False) == (path, True)
    assert cache.resolve(path, "dinov2") == path  # a converted file is used as it is
    monkeypatch.setattr(dinov2, "VERSION", dinov2.VERSION + 1)
    newer, hit = cache.converted(spec, "dinov2", progress=False)
    assert not hit and newer != path


def test_vocabulary_by_name(offline):
    from data_pipeline.wordpiece import read_vocab, vocab_file

    path = vocab_file(f"hf:{BERT_REPO}")
    assert path.endswith(os.path.join(COMMIT, "vocab.txt"))
    assert read_vocab(path)["circle"] == 5
