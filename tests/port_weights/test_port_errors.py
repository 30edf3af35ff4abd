"""Converter input checks and messages: source dtypes (integer weights refused, half precision upcast with one
warning and recorded), missing keys named by their source name, unsafe or unreadable files in one line, and the
error boundary of ``python -m port_weights``."""

import os
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from port_weights import dinov2, mamba
from port_weights.__main__ import main
from port_weights.checkpoint import MissingCheckpointError, clean_message, load_torch_checkpoint
from port_weights.common import ConversionError, UpcastWarning
from port_weights.names import source_names
from wimfris_jax.io import load_params

SHAPES = {  # a MambaMixer with d_model 4, expand 2 (d_inner 8), d_state 2, dt_rank 1, d_conv 3
    "in_proj.weight": (16, 4), "conv1d.weight": (8, 1, 3), "conv1d.bias": (8,), "x_proj.weight": (5, 8),
    "dt_proj.weight": (8, 1), "dt_proj.bias": (8,), "A_log": (8, 2), "D": (8,), "out_proj.weight": (4, 8),
}  # fmt: skip


def _mixer(dtype=np.float32, prefix=""):
    rng = np.random.default_rng(0)
    return {prefix + k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_integer_and_bool_tensors_are_refused_all_at_once():
    sd = _mixer()
    sd["A_log"] = np.arange(16, dtype=np.int64).reshape(8, 2)
    sd["D"] = np.ones(8, bool)
    sd["conv1d.bias"] = torch.arange(8, dtype=torch.int32)  # a torch tensor is read the same way
    with pytest.raises(ConversionError) as e:
        mamba.convert_state_dict(sd, source="mixer.pth")
    msg = str(e.value)
    assert msg.startswith("mixer.pth: 3 problem(s)")
    for key, dtype, path in (("A_log", "int64", "A_log"), ("D", "bool", "D"), ("conv1d.bias", "int32", "conv1d/bias")):
        assert f"{key!r} holds {dtype} values, but the model's {path!r} is a float32 weight" in msg


@pytest.mark.parametrize("kind", ["float16-pth", "bfloat16-pth", "bfloat16-safetensors"])
def test_half_precision_is_upcast_with_one_warning_and_recorded(kind, tmp_path):
    from safetensors.torch import save_file

    dtype, fmt = kind.split("-")
    tensors = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in _mixer().items()}
    src = str(tmp_path / f"mixer.{fmt}")
    save_file(tensors, src) if fmt == "safetensors" else torch.save(tensors, src)
    assert {str(v.dtype) for v in load_torch_checkpoint(src).values()} == {dtype}  # read in the stored dtype
    with pytest.warns(UpcastWarning) as record:
        params, meta = mamba.from_checkpoint(src)
    assert [str(w.message) for w in record] == [f"{src}: upcast 9 {dtype} tensor(s) to float32"]
    assert meta["source_dtypes"] == {dtype: 9}
    assert params["A_log"].dtype == np.float32
    np.testing.assert_array_equal(params["A_log"], tensors["A_log"].float().numpy())  # exact: widening only
    np.testing.assert_array_equal(params["in_proj"]["kernel"], tensors["in_proj.weight"].float().numpy().T)


def test_float32_is_not_reported_and_float64_is_recorded():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UpcastWarning)
        _, meta = mamba.convert_state_dict(_mixer())
        _, meta64 = mamba.convert_state_dict(_mixer(np.float64))
    assert meta["source_dtypes"] == {"float32": 9} and meta64["source_dtypes"] == {"float64": 9}


def test_missing_key_is_named_by_its_source_key():
    sd = {**_mixer(prefix="backbone.layers.0.mixer."), **_mixer(prefix="backbone.layers.1.mixer.")}
    del sd["backbone.layers.1.mixer.x_proj.weight"]
    with pytest.raises(ConversionError) as e:
        mamba.convert_state_dict(sd, source="model.pth")
    assert (
        "missing: the model's 'layers_1/x_proj/kernel' (8, 5) has no source key; "
        "looked for 'backbone.layers.1.mixer.x_proj.weight'"
    ) in str(e.value)
    # The inverse of the DINOv2 tables: the example, a fused qkv split per leaf, the v4 / v5 names.
    hf, hub = dinov2.rules(num_heads=2, layout="hf"), dinov2.rules(num_heads=2)
    assert source_names("blocks_1/mlp/fc2/kernel", hf) == ["encoder.layer.1.mlp.fc2.weight"]
    assert source_names("blocks_1/attn/key/bias", hub) == ["blocks.1.attn.qkv.bias"]
    assert source_names("blocks_1/attn/out/kernel", hub) == ["blocks.1.attn.proj.weight"]
    assert source_names("blocks_0/attn/value/kernel", hf) == [
        "encoder.layer.0.attention.attention.value.weight",
        "encoder.layer.0.attention.v_proj.weight",
    ]
    prefixed = dinov2.rules("module.dinov2.", "params/image_encoder", num_heads=2)
    assert source_names("params/image_encoder/blocks_2/ls1", prefixed) == ["module.dinov2.blocks.2.ls1.gamma"]
    assert source_names("blocks_0/not/a/param", hub) == []


def test_unsafe_and_unreadable_files_fail_in_one_line(tmp_path):
    evil_zip, evil_legacy = tmp_path / "evil.pth", tmp_path / "legacy.pth"
    torch.save({"w": _Evil()}, evil_zip)
    with open(evil_legacy, "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=2)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    (tmp_path / "text.pth").write_text("hello world\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "bad.safetensors").write_text("hello")
    cases = {
        "evil.pth": r"refused as unsafe: loading it would import (posix|nt|os)\.system",
        "legacy.pth": r"refused as unsafe: loading it would import (posix|nt|os)\.system",
        "module.pth": r"refused as unsafe: loading it would import torch\.nn\.modules\.linear\.Linear",
        "text.pth": r"not a PyTorch checkpoint .*: unrecognised format$",
        "empty.pth": r"not a PyTorch checkpoint .*: the file ends early \(empty or truncated\)$",
        "bad.safetensors": r"not a safetensors file",
    }
    for name, pattern in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(ConversionError) as e:
            load_torch_checkpoint(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
        reason = msg[len(path) :]  # the path itself may hold anything (pytest-101/...)
        assert not any(s in reason for s in ("weights_only", "likely succeed", "object at 0x", "101")), msg
        assert re.search(pattern, msg), msg
    with pytest.raises(MissingCheckpointError, match="no checkpoint at"):
        load_torch_checkpoint(tmp_path / "nothing.pth")
    err = RuntimeError(
        "cannot read <_io.BytesIO object at 0x7f3a2b1c0d90>: \x1b[1mbad\x1b[0m header.\n\tRe-running `torch.load` "
        "with `weights_only` set to `False` will likely succeed, but it can result in arbitrary code execution."
    )
    assert clean_message(err) == "cannot read: bad header."
    assert clean_message(KeyError(101)) == "KeyError"


def _lines(capsys):
    return capsys.readouterr().err.splitlines()


def test_cli_error_boundary(tmp_path, capsys, monkeypatch):
    src = str(tmp_path / "mixer.pth")
    torch.save({k: torch.from_numpy(v).half() for k, v in _mixer().items()}, src)
    nowhere = str(tmp_path / "no" / "out.msgpack")
    # OUT's folder is checked first: the missing folder is reported although SRC does not exist either.
    assert main(["mamba", str(tmp_path / "nothing.pth"), nowhere]) == 1
    assert _lines(capsys) == [f"python -m port_weights: error: {nowhere}: its folder {tmp_path / 'no'} does not exist"]
    assert main(["mamba", src, str(tmp_path)]) == 1
    assert _lines(capsys) == [f"python -m port_weights: error: {tmp_path}: is a folder; give the output file's name"
                              " (e.g. out.msgpack)"]  # fmt: skip
    assert main(["mamba", str(tmp_path / "nothing.pth"), str(tmp_path / "x.msgpack")]) == 1
    assert _lines(capsys) == [f"python -m port_weights: error: no checkpoint at {str(tmp_path / 'nothing.pth')!r}"]
    with pytest.raises(MissingCheckpointError):  # --debug: the traceback of a user error too
        main(["mamba", str(tmp_path / "nothing.pth"), str(tmp_path / "x.msgpack"), "--debug"])
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda *a, **k: False)  # a read-only folder (root would ignore chmod)
        assert main(["mamba", src, str(tmp_path / "x.msgpack")]) == 1
    assert _lines(capsys) == [f"python -m port_weights: error: {tmp_path / 'x.msgpack'}: its folder {tmp_path} is "
                              "not writable"]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(mamba, "from_checkpoint", lambda src: 1 / 0)  # a bug keeps its traceback
        with pytest.raises(ZeroDivisionError):
            main(["mamba", src, str(tmp_path / "x.msgpack")])
    out = str(tmp_path / "x.msgpack")
    assert main(["mamba", src, out]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"python -m port_weights: warning: {src}: upcast 9 float16 tensor(s) to float32"
    ]
    assert captured.out.startswith(f"wrote {out}: 9 arrays")
    assert load_params(out)[1]["source_dtypes"] == {"float16": 9}


def test_cli_process_exit_status(tmp_path):
    """The real command: status 1 and one stderr line, no traceback."""
    nowhere = str(tmp_path / "no" / "out.msgpack")
    run = subprocess.run(
        [sys.executable, "-m", "port_weights", "mamba", "src.pth", nowhere], capture_output=True, text=True
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [f"python -m port_weights: error: {nowhere}: its folder {tmp_path / 'no'} does "
                                       "not exist"]  # fmt: skip
