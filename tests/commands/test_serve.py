"""``wimfris serve``: the page's HTTP API end to end (the command as a subprocess on a free port, random weights of the
small model, called through ``gradio_client``), its one-line errors, and the score of a hand-made logit map."""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import python_path
from limits import limit
from PIL import Image
from small_model import small_tiny_config

from wimfris_jax import cli
from wimfris_jax.evaluate import data_settings
from wimfris_jax.io import save_params
from wimfris_jax.load import load_model
from wimfris_jax.metrics import postprocess
from wimfris_jax.predict import find_config, predict_masks
from wimfris_jax.serve import NEEDS_GRADIO, OFFLINE_ENV, ServeError, parse_sentences, score_logits
from wimfris_jax.visualize import overlay

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # letterbox -> original: the same pixels


def test_score_of_a_hand_made_logit_map():
    p = np.array([[0.75, 0.5], [0.25, 0.9]])  # the probabilities; 0.25 is below the threshold 0.35
    mask, score, area = score_logits(np.log(p / (1 - p)), IDENTITY, (2, 2), 2)
    np.testing.assert_array_equal(mask, [[True, True], [False, True]])
    np.testing.assert_array_equal(mask, postprocess(np.log(p / (1 - p)), IDENTITY, (2, 2), 2))  # the predict mask
    assert area == 0.75
    assert score == pytest.approx((0.75 + 0.5 + 0.9) / 3, abs=1e-6)
    mask, score, area = score_logits(np.full((2, 2), -5.0), IDENTITY, (2, 2), 2)  # nothing above the threshold
    assert not mask.any() and score == 0.0 and area == 0.0


def test_sentences_one_per_line():
    assert parse_sentences(" the red circle \n\n  the blue square\n") == ["the red circle", "the blue square"]
    for text, message in (("", "no sentence"), (" \n \n", "no sentence"), ("\n".join(["a cat"] * 33), "at most 32")):
        with pytest.raises(ServeError, match=message):
            parse_sentences(text)


def test_without_gradio_one_line(monkeypatch, capsys, tmp_path):
    for key in OFFLINE_ENV:  # restored after the test: the command sets them
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    (tmp_path / "weights.msgpack").write_bytes(b"")
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "weights.msgpack"), "--config", "configs/tiny.py"]) == 1
    assert capsys.readouterr().err.strip() == f"wimfris serve: error: {NEEDS_GRADIO}"


def test_address_in_use_one_line(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--checkpoint", str(tmp_path), "--port", str(port)]) == 1  # before any loading
    assert capsys.readouterr().err.strip() == (f"wimfris serve: error: cannot listen on 127.0.0.1:{port} (Address "
                                               "already in use): pass another --port or --host")  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted-weights file of the small model (random weights) with the config.json of its run beside it."""
    d = tmp_path_factory.mktemp("serve")
    config = small_tiny_config()
    from wimfris_jax.model import build_model

    model = build_model(config.model).clone(logits_only=True)
    s, n = int(config.model.image_size), int(config.model.word_len)
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, n), jnp.int32), train=False)
    variables = dict(jax.jit(init)())
    save_params(d / "weights.msgpack", variables, {"collections": sorted(variables)})
    (d / "config.json").write_text(config.to_json_best_effort(indent=2))
    return d / "weights.msgpack"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: str) -> str:
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read()[-3000:]


def _wait_until_up(url: str, server: subprocess.Popen, log: str, seconds: float) -> float:
    """Seconds until ``url`` answers; fails if the server exits or ``seconds`` pass first."""
    t0 = time.time()
    while time.time() - t0 < seconds:
        assert server.poll() is None, f"wimfris serve exited with {server.returncode}:\n{_tail(log)}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return time.time() - t0
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.25)
    raise AssertionError(f"wimfris serve did not answer in {seconds:.0f} s:\n{_tail(log)}")


def test_serve_http_api(checkpoint, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    port, log = _free_port(), str(tmp_path / "serve.log")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a user's machine: one CPU device
    env["PYTHONPATH"] = python_path()
    # --batch-size 1: the two sentences below run as two batches of one
    command = [sys.executable, "-m", "wimfris_jax.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
               "--batch-size", "1"]  # fmt: skip
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        print(f"wimfris serve answered after {_wait_until_up(url, server, log, limit(60)):.1f} s")
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
        sentences = ["the red circle", "the small blue square"]
        gallery, records = client.predict(handle_file(str(tmp_path / "photo.png")), "\n".join(sentences) + "\n\n",
                                          api_name="/predict")  # fmt: skip
        assert [r["sentence"] for r in records] == sentences and len(gallery) == 2
        for item, r in zip(gallery, records):
            assert 0.0 <= r["area"] <= 1.0 and 0.0 <= r["score"] <= 1.0
            assert (r["score"] == 0.0) == (r["area"] == 0.0) and (r["area"] == 0.0 or r["score"] > 0.35)
            shown = np.asarray(Image.open(item["image"]).convert("RGB"))
            assert shown.shape == image.shape  # the overlay is the image's size
            assert (r["area"] == 0.0) == np.array_equal(shown, image)  # tinted iff the mask is not empty
            assert item["caption"].startswith(r["sentence"]) and f"score {r['score']:.3f}" in item["caption"]

        # bad input: one line on the page / in the API's error, and the server goes on
        with pytest.raises(AppError, match=r"^no sentence: write a description"):
            client.predict(handle_file(str(tmp_path / "photo.png")), "  \n ", api_name="/predict")
        (tmp_path / "broken.png").write_bytes(b"not an image")
        with pytest.raises(AppError, match=r"^broken.png is not a readable image \(cannot decode"):
            client.predict(handle_file(str(tmp_path / "broken.png")), "a cat", api_name="/predict")
        # the masks are those of `wimfris predict` (same preprocessing and post-processing), drawn by overlay()
        config = find_config(str(checkpoint))
        model, variables = load_model(config, str(checkpoint))
        settings = {k: v for k, v in data_settings(config).items() if k != "max_size"}
        for item, r in zip(gallery, records):
            mask = predict_masks(model, variables, [image], r["sentence"], batch_size=1, **settings)[0]
            assert r["area"] == round(float(mask.mean()), 6)
            np.testing.assert_array_equal(np.asarray(Image.open(item["image"]).convert("RGB")), overlay(image, mask))

        assert server.poll() is None
        _, again = client.predict(handle_file(str(tmp_path / "photo.png")), sentences[0], api_name="/predict")
        assert again == records[:1]  # the same mask: one compiled forward, deterministic
    finally:
        server.terminate()
        try:
            server.wait(timeout=limit(10))
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
