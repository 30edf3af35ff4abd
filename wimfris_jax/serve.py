"""An interactive prediction page (``wimfris serve``): an image and one sentence per line -> a mask per sentence.

The page (Gradio) takes an uploaded image (or one of a few synthetic examples) and sentences, one per line, and shows
for each sentence the mask over the image (:func:`wimfris_jax.visualize.overlay`) with its score and area. The same
call is an HTTP API (``api_name="predict"``; e.g. ``gradio_client.Client(url).predict(handle_file("photo.jpg"),
"the red car\\nthe tree", api_name="/predict")``) that returns the overlays and a JSON list of records
``{"sentence", "score", "area"}``:

* ``area``: the mask's fraction of the image's pixels, in [0, 1];
* ``score``: the mean foreground probability (sigmoid of the logits, taken to the original image as the mask is:
  :func:`wimfris_jax.metrics.probability_map`) over the mask's pixels, in (0.35, 1]; 0.0 for an empty mask. It says
  how sure the model is of the pixels it marked, not whether the sentence names anything in the image.

The model is loaded once and its forward (:func:`wimfris_jax.inference.forward_fn`) is compiled once, at start-up, for
one batch size B: the sentences of a request are tokenised (ids (n, L)) and run on the image repeated, B at a time,
each batch padded to B (:func:`wimfris_jax.predict.batch_masks`, the preprocessing of ``wimfris predict``), so the
masks are those ``wimfris predict`` writes. Requests run one at a time (Gradio's default concurrency limit of 1).

Input limits: an image is checked by its header before it is decoded (:func:`data_pipeline.images.image_size`: the
pixel limit ``WIMFRIS_MAX_IMAGE_PIXELS``); at most :data:`MAX_SENTENCES` sentences; blank lines are skipped and a
sentence empty after CLIP's clean-up is refused. Each refusal is one line on the page (``gr.Error``); the server goes
on. The server binds 127.0.0.1 unless told otherwise, with Gradio's analytics, version check, share link, server-side
rendering and MCP server off: it makes no connection to the internet.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipeline.images import ExampleError, image_size, load_image
from data_pipeline.tokenizers import text_ids
from wimfris_jax.errors import UserError
from wimfris_jax.evaluate import data_settings
from wimfris_jax.inference import forward_fn, pad_batch
from wimfris_jax.load import load_model
from wimfris_jax.metrics import THRESHOLD, probability_map
from wimfris_jax.predict import PredictError, batch_masks, check_sentence, find_config, unreadable_image
from wimfris_jax.visualize import overlay

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_SENTENCES = 32  # a request's sentences: at most this many forward passes' worth of batches
NEEDS_GRADIO = "wimfris serve needs Gradio: pip install 'wimfris_jax[serve]'"
API_DESCRIPTION = "image + sentences (one per line) -> overlays, [{sentence, score, area}] per sentence"
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class ServeError(UserError, ValueError):
    """Bad input to the page or the API (one line), or Gradio missing."""


def score_logits(
    logits: np.ndarray, inv_matrix: np.ndarray, orig_size: Sequence[int], image_size: int
) -> tuple[np.ndarray, float, float]:
    """``(mask (H, W) bool, score, area)`` of one (h, w) logit map (arguments as
    :func:`wimfris_jax.metrics.postprocess`): the mask is ``postprocess``'s (probability > 0.35), ``score`` the mean
    probability over the mask (0.0 when it is empty) and ``area`` the mask's fraction of the H x W pixels."""
    prob = probability_map(logits, inv_matrix, orig_size, image_size)
    mask = prob > THRESHOLD
    score = float(prob[mask].mean()) if mask.any() else 0.0
    return mask, score, float(mask.mean())


def parse_sentences(text: str | None) -> list[str]:
    """The non-blank lines of ``text``, stripped; ServeError if there is none, more than :data:`MAX_SENTENCES`, or
    one that is empty after CLIP's clean-up (e.g. only punctuation)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise ServeError("no sentence: write a description of the object to segment (one per line)")
    if len(lines) > MAX_SENTENCES:
        raise ServeError(f"{len(lines)} sentences: at most {MAX_SENTENCES} a request")
    for i, line in enumerate(lines, 1):
        try:
            check_sentence(line)
        except PredictError:
            raise ServeError(f"sentence {i} ({line!r}) is empty once cleaned up: describe the object") from None
    return lines


def read_image(upload: str | dict | None) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an uploaded file (its path, or Gradio's file record {"path": ...}), checked by its header
    before it is decoded (pixel limit); ServeError naming it (by its base name) if it is missing or unusable."""
    path = upload.get("path") if isinstance(upload, dict) else upload
    if not path:
        raise ServeError("no image: upload one (a file, not a URL) or pick an example")
    name = os.path.basename(path)
    try:
        image_size(path, name)
        return load_image(path)
    except ExampleError as e:
        raise ServeError(unreadable_image(name, e).replace(path, name)) from None


class Predictor:
    """The loaded model and its one compiled forward on batches of ``batch_size``."""

    def __init__(self, checkpoint: str, *, config: str | None = None, which: str | int = "auto", batch_size: int = 8):
        if batch_size < 1:
            raise ServeError(f"batch size must be a positive integer, got {batch_size}")
        cfg = find_config(checkpoint, config)
        self.settings = data_settings(cfg)
        self.model, self.variables = load_model(cfg, checkpoint, which=which)
        self.forward = forward_fn(self.model)
        self.batch_size = batch_size
        size = self.settings["image_size"]
        self.predict(np.zeros((size, size, 3), np.uint8), ["warm up"])  # compiles now, not at the first request

    def predict(self, image: np.ndarray, sentences: Sequence[str]) -> list[tuple[np.ndarray, float, float]]:
        """``(mask (H, W) bool, score, area)`` (:func:`score_logits`) per sentence on ``image`` uint8 (H, W, 3)."""
        s = self.settings
        ids = text_ids(list(sentences), s["word_len"], s["tokenizer"])  # (n, L)
        out: list[tuple[np.ndarray, float, float]] = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            padded = pad_batch([chunk], self.batch_size)[0]  # (B, L): one compiled shape
            out += batch_masks(self.forward, self.variables, [image] * len(chunk), padded, s["image_size"],
                                post=score_logits)  # fmt: skip
        return out

    def __call__(self, upload: str | dict | None, text: str | None) -> tuple[list[tuple[np.ndarray, str]], list[dict]]:
        """The page's and the API's call: ``([(overlay (H, W, 3), caption)] per sentence, [{"sentence", "score",
        "area"}] per sentence)``; ServeError (one line) for bad input."""
        sentences = parse_sentences(text)
        image = read_image(upload)
        gallery, records = [], []
        for sentence, (mask, score, area) in zip(sentences, self.predict(image, sentences)):
            gallery.append((overlay(image, mask), f"{sentence} | score {score:.3f} | area {100 * area:.1f}%"))
            records.append({"sentence": sentence, "score": round(score, 6), "area": round(area, 6)})
        return gallery, records


def example_images(folder: str, n: int = 3) -> list[list[str]]:
    """``[[PNG path, sentences]]`` of ``n`` synthetic scenes (:class:`data_pipeline.synthetic.SyntheticRefer`)
    written into ``folder``: the page's examples (target and distractor sentence of each scene)."""
    from data_pipeline.synthetic import SyntheticRefer
    from wimfris_jax.visualize import save_png

    source = SyntheticRefer(n, image_size=256, seed=7)
    out = []
    for i in range(n):
        scene = source.scene(i)
        path = save_png(os.path.join(folder, f"shapes_{i}.png"), scene["image"])
        out.append([path, f"{scene['sentence']}\n{scene['distractor_sentence']}"])
    return out


def check_address(host: str, port: int) -> None:
    """ServeError (one line) unless a server could listen on ``host:port`` now."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except (OSError, OverflowError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ServeError(f"cannot listen on {host}:{port} ({reason}): pass another --port or --host") from None


def _gradio() -> Any:
    """The gradio module, imported with everything that would reach the internet off; ServeError if missing."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    try:
        import gradio
    except ImportError:
        raise ServeError(NEEDS_GRADIO) from None
    return gradio


def build_app(checkpoint: str, *, config: str | None = None, which: str | int = "auto", batch_size: int = 8) -> Any:
    """The page (a ``gradio.Blocks``, not launched) over a :class:`Predictor` (model loaded and compiled now); its
    event is also the HTTP API ``/predict``: (uploaded image, sentences one per line) -> (overlays, records)."""
    gr = _gradio()
    predictor = Predictor(checkpoint, config=config, which=which, batch_size=batch_size)

    def predict(upload: dict | None, text: str | None) -> tuple[list[tuple[np.ndarray, str]], list[dict]]:
        try:
            return predictor(upload, text)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None

    with gr.Blocks(title="wimfris serve", analytics_enabled=False) as app:
        gr.Markdown(
            f"### Referring image segmentation: `{os.path.basename(os.path.normpath(checkpoint))}`\n"
            "One sentence per line; each gets its mask (cyan), a **score** (mean probability inside the mask, 0 for "
            "an empty mask) and its **area** (fraction of the image)."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="image")
                text = gr.Textbox(lines=3, label="sentences (one per line)", placeholder="the red circle")
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="masks", format="png", columns=2, object_fit="contain")
                records = gr.JSON(label="records")
        folder = tempfile.mkdtemp(prefix="wimfris_serve_")  # Gradio copies the examples into its cache
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        gr.Examples(example_images(folder), inputs=[image, text], label="synthetic examples")
        # preprocess=False: the upload reaches read_image as Gradio's file record (its path checked to be an upload),
        # not opened by PIL first (which would raise a traceback for a bad file and skip the pixel limit)
        button.click(predict, inputs=[image, text], outputs=[gallery, records], preprocess=False, api_name="predict",
                     api_description=API_DESCRIPTION)  # fmt: skip
    return app


def serve(
    checkpoint: str,
    *,
    config: str | None = None,
    which: str | int = "auto",
    batch_size: int = 8,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
) -> None:
    """Builds the page (:func:`build_app`) and serves it on ``http://host:port`` until interrupted; ServeError before
    the model is loaded if that address cannot be listened on (in use, not this machine's)."""
    check_address(host, port)
    app = build_app(checkpoint, config=config, which=which, batch_size=batch_size)
    print(f"wimfris serve: http://{host}:{port} (Ctrl-C stops)", flush=True)
    app.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, mcp_server=False,
        run_history=False, footer_links=["api"], quiet=True,
    )  # fmt: skip
