"""``wimfris train`` and ``wimfris weights`` with weights by name, offline: the image encoder from a Hugging Face cache
the test populates (``HF_HUB_OFFLINE=1``), the text encoder from a local HTTP server (pinned sha256); converted once,
then found in the cache without a request; ``wimfris weights list`` shows every config's sources."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, python_path
from http_server import LocalServer
from hub_fixtures import DINOV2_REPO, TEXT_SETS, clip_text_bin, hub_env, tiny_dinov2
from limits import limit
from small_model import SMALL_MODEL

from wimfris_jax.cli import main

TRAIN_SETS = (*SMALL_MODEL, *TEXT_SETS, "train.epochs=1", "train.global_batch_size=8", "data.num_train=16",
              "train.eval_every_epochs=0", "train.log_every=1")  # fmt: skip


def _wimfris(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": python_path()}
    return subprocess.run([sys.executable, "-m", "wimfris_jax.cli", *args], capture_output=True, text=True,
                          timeout=limit(300), env=full, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    folder = tiny_dinov2(d / "hf")
    data, digest = clip_text_bin()
    with LocalServer({"/clip/clip_text.bin": data}) as server:
        yield dict(
            env=hub_env(d / "hf", d / "wimfris_cache"), folder=folder, server=server, root=d,
            text=f"{server.url('/clip/clip_text.bin')}#sha256={digest}", text_bytes=data,
        )  # fmt: skip


def test_train_from_named_sources(hub):
    """The run starts from the converted sources (its frozen backbones hold exactly their values); a second use
    finds both in the cache without downloading; a source that is nowhere is one line."""
    from port_weights import clip, dinov2
    from wimfris_jax.checkpoints import read_checkpoint
    from wimfris_jax.io import flatten

    run = hub["root"] / "run"
    inits = ["--init", f"image_encoder=hf:{DINOV2_REPO}", "--init", f"text_encoder={hub['text']}"]
    sets = [x for s in TRAIN_SETS for x in ("--set", s)]
    r = _wimfris(hub["env"], "train", "--config", "configs/tiny.py", "--workdir", str(run), *inits, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("converting ") == 2 and len(hub["server"].requests) == 1

    params = read_checkpoint(str(run), "latest")[0]["params"]
    src = hub["root"] / "clip_text.bin"
    src.write_bytes(hub["text_bytes"])
    for subtree, (want, _) in {"image_encoder": dinov2.from_checkpoint(hub["folder"]),
                               "text_encoder": clip.from_checkpoint(str(src))}.items():  # fmt: skip
        got = flatten(params[subtree])
        assert got.keys() == flatten(want).keys()
        for k, v in flatten(want).items():
            np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=f"{subtree}/{k}")

    r = _wimfris(hub["env"], "weights", "fetch", "configs/tiny.py", *inits)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["image_encoder", "text_encoder"]
    cached = os.listdir(os.path.join(hub["env"]["WIMFRIS_CACHE"], "converted"))
    assert all(ln.split(" -> ")[1].split(" (")[0] in [os.path.join(hub["env"]["WIMFRIS_CACHE"], "converted", c)
                                                      for c in cached] for ln in lines)  # fmt: skip
    assert "converting" not in r.stderr and len(hub["server"].requests) == 1  # no second download or conversion

    r = _wimfris(hub["env"], "train", "--config", "configs/tiny.py", "--workdir", str(hub["root"] / "run2"),
                 "--init", "image_encoder=hf:test-org/absent", *sets)  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith("wimfris train: error: hf:test-org/absent: model.safetensors / pytorch_model.bin not")
    assert not (hub["root"] / "run2").exists()  # nothing written before the sources resolve


def test_weights_list_names_every_config(capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    for config in ("detris_b", "detris_l", "tfanet_b", "vipa_b", "wimfris_b", "wimfris_l"):
        assert f"configs/{config}.py\n" in out
    assert "configs/tiny.py" not in out  # random values: nothing to fetch
    assert out.count("hf:facebook/dinov2-with-registers-base\n") == 2  # WIMFRIS-B and DETRIS-B
    assert "dinov2, 346 MB, Apache-2.0, not fetched" in out and "clip, 890 MB, MIT, not fetched" in out
    assert "vocabulary     hf:google-bert/bert-base-uncased (its vocab.txt, data.tokenizer)" in out


@pytest.mark.parametrize(
    "init, message",
    [
        ("text_encoder", "--init 'text_encoder' is not SUBTREE=SOURCE"),
        ("neck=hf:a/b", "--init neck=hf:a/b: no converter for subtree 'neck' of this model family (known: "
                        "image_encoder (dinov2), text_encoder (clip))"),
        ("text_encoder=missing.msgpack", "missing.msgpack: no such file or folder"),
        ("text_encoder=openai:RN50", "openai:RN50: unknown OpenAI CLIP model"),
    ],
)  # fmt: skip
def test_init_errors_are_one_line(init, message, tmp_path, capsys):
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    code = main(["train", "--config", tiny, "--workdir", str(tmp_path / "run"), "--init", init])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()
