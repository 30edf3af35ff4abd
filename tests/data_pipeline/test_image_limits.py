"""Images are checked by their header before any decoder runs (data_pipeline.images): a 65-byte PNG that says
20000 x 20000 is refused in one line naming it and its size, the limit comes from WIMFRIS_MAX_IMAGE_PIXELS; and
``wimfris predict`` on a folder decodes one batch at a time, reporting each bad image without stopping the others."""

from __future__ import annotations

import os
import time
import weakref

import cv2
import numpy as np
import pytest
from fake_images import header_only_png
from PIL import Image, ImageFile

from data_pipeline import images
from data_pipeline.images import (
    ExampleError,
    ImageLimitError,
    ImageTooLargeError,
    decode_image,
    decode_mask,
    image_size,
    load_image,
)
from wimfris_jax import predict
from wimfris_jax.errors import UserError


def _never_decode(*args, **kwargs):
    raise AssertionError("a decoder ran on an image above the limit")


@pytest.mark.parametrize("side", [20000, 50000])  # > 9 GB through OpenCV; a cv2 traceback
def test_bomb_header_is_refused_before_decoding(tmp_path, monkeypatch, side):
    path = tmp_path / "photo.png"
    path.write_bytes(header_only_png(side, side))
    monkeypatch.delenv(images.MAX_PIXELS_VARIABLE, raising=False)
    monkeypatch.setattr(cv2, "imdecode", _never_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", _never_decode)  # PIL's fallback decode
    want = (
        f"{path}: {side} x {side} pixels ({side * side / 1e6:.1f} Mpx) is above the limit of 89.5 Mpx "
        "(set WIMFRIS_MAX_IMAGE_PIXELS to raise it)"
    )
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as e:
        load_image(str(path))
    assert str(e.value) == want and isinstance(e.value, UserError)
    with pytest.raises(ImageTooLargeError, match=r"^record 3: .* is above the limit of 89\.5 Mpx"):
        decode_image(path.read_bytes(), "record 3")  # the tfds readers' bytes
    with pytest.raises(ImageTooLargeError, match=r"^record 3 mask 0: "):
        decode_mask(path.read_bytes(), "record 3 mask 0")
    assert time.perf_counter() - t0 < 1.0


def test_limit_comes_from_the_environment(tmp_path, monkeypatch):
    small = tmp_path / "small.png"
    Image.new("RGB", (11, 10), (1, 2, 3)).save(small)
    assert load_image(str(small)).shape == (10, 11, 3)
    monkeypatch.setenv(images.MAX_PIXELS_VARIABLE, "100")
    with pytest.raises(ImageTooLargeError, match=r"small\.png: 11 x 10 pixels \(110 px\) is above the limit of 100 px"):
        load_image(str(small))
    monkeypatch.setenv(images.MAX_PIXELS_VARIABLE, "110")
    assert load_image(str(small)).shape == (10, 11, 3)
    # raised above PIL's own refusal (2 x 89.5 Mpx): the header is read, PIL's setting is left as it was
    monkeypatch.setenv(images.MAX_PIXELS_VARIABLE, "500_000_000")
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert image_size(header_only_png(20000, 20000)) == (20000, 20000)
    assert pil_limit == Image.MAX_IMAGE_PIXELS
    for bad in ("lots", "-5", "0", "1.5"):
        monkeypatch.setenv(images.MAX_PIXELS_VARIABLE, bad)
        with pytest.raises(ImageLimitError, match=rf"^WIMFRIS_MAX_IMAGE_PIXELS='{bad}' is not a positive whole"):
            image_size(str(small))


def test_unidentifiable_and_damaged_headers_fail_in_one_line(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ExampleError, match=r"cannot decode image .*notes\.png: UnidentifiedImageError"):
        load_image(str(tmp_path / "notes.png"))
    with pytest.raises(ExampleError, match=r"cannot read image file .*missing\.png"):
        image_size(str(tmp_path / "missing.png"))
    bad_ihdr = bytearray(header_only_png(10, 10))
    bad_ihdr[24] = 3  # bit depth 3: no PNG mode
    with pytest.raises(ExampleError, match=r"^cannot decode image x: ") as e:
        image_size(bytes(bad_ihdr), "x")
    assert "\n" not in str(e.value)


def _settings(monkeypatch, forward_calls: list[int]) -> None:
    """predict.run without a model: the config, the weights, the tokenizer and the network are stand-ins."""

    def forward(variables, x, ids):
        forward_calls.append(len(x))
        return np.full((len(x), 4, 4), -10.0, np.float32)  # sigmoid < 0.35 everywhere: empty masks

    monkeypatch.setattr(predict, "find_config", lambda checkpoint, config=None: {})
    monkeypatch.setattr(
        predict, "data_settings", lambda cfg: {"image_size": 16, "word_len": 8, "tokenizer": "clip", "max_size": 640}
    )
    monkeypatch.setattr(predict, "load_model", lambda cfg, checkpoint, which="auto": (object(), {}))
    monkeypatch.setattr(predict, "forward_fn", lambda model: forward)
    monkeypatch.setattr(predict, "text_ids", lambda text, n, tokenizer="clip": np.ones((1, n), np.int32))


def test_predict_decodes_a_folder_one_batch_at_a_time_and_reports_each_bad_image(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = [f"a{k}.png" for k in range(7)]
    for k, name in enumerate(good):
        Image.fromarray(rng.integers(0, 256, (12 + k, 20 - k, 3), np.uint8)).save(folder / name)
    (folder / "b_bomb.png").write_bytes(header_only_png(20000, 20000))
    (folder / "c_notes.png").write_text("not an image")
    whole = (folder / "a0.png").read_bytes()
    (folder / "d_cut.png").write_bytes(whole[: len(whole) // 2])  # a readable header, then damaged data
    forward_calls: list[int] = []
    _settings(monkeypatch, forward_calls)
    decoded, alive_at_decode = [], []

    def tracking_load_image(path: str) -> np.ndarray:
        alive_at_decode.append(sum(ref() is not None for ref in decoded))
        image = load_image(path)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(predict, "load_image", tracking_load_image)
    records = predict.run("ckpt", [str(folder)], "the dog", str(tmp_path / "out"), batch_size=2, progress=False)

    names = sorted(os.listdir(folder))
    assert [os.path.basename(r["image"]) for r in records] == names
    by_name = {os.path.basename(r["image"]): r for r in records}
    assert by_name["b_bomb.png"] == {
        "image": str(folder / "b_bomb.png"),
        "error": f"{folder / 'b_bomb.png'}: 20000 x 20000 pixels (400.0 Mpx) is above the limit of 89.5 Mpx "
        "(set WIMFRIS_MAX_IMAGE_PIXELS to raise it)",
    }
    assert by_name["c_notes.png"]["error"].startswith(f"{folder / 'c_notes.png'} is not a readable image (")
    assert by_name["d_cut.png"]["error"].startswith(f"{folder / 'd_cut.png'} is not a readable image (")
    for name in good:
        assert by_name[name]["area"] == 0.0 and os.path.isfile(by_name[name]["mask"])
    assert all("\n" not in r.get("error", "") for r in records)
    # 8 decodes (the 7 images and the damaged one; never the bomb nor the text file), 4 forward calls of batch 2;
    # when an image is decoded at most one other batch-worth is still alive (a folder read whole would have 7)
    assert len(alive_at_decode) == 8 and len(decoded) == 7 and forward_calls == [2, 2, 2, 2]
    assert max(alive_at_decode) <= 2 and alive_at_decode[:3] == [0, 1, 1]
