"""Weights are data: TorchScript archives are read without running their code, and no file can claim more memory
than its size allows (port_weights/torchscript.py)."""

import os
import zipfile

import numpy as np
import pytest
import torch
from torch import Tensor

from port_weights.__main__ import FAMILIES, main
from port_weights.checkpoint import load_torch_checkpoint
from port_weights.common import ConversionError
from port_weights.torchscript import load_torchscript, memory_budget

VICTIM_TEXT = "untouched\n"


class _Evil(torch.nn.Module):
    """An archive whose ``__setstate__`` (run by ``torch.jit.load``) overwrites the file named in its state."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4))
        self.target = target

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[Tensor, str, bool]:
        return (self.weight, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.target = state[1]
        f = torch.from_file(state[1], shared=True, size=5, dtype=torch.uint8)
        f.fill_(65)  # "AAAAA"
        self.training = bool(f[0] == 65) and state[2]  # uses f: TorchScript keeps the write


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.attn = torch.nn.MultiheadAttention(4, 2)
        self.register_buffer("scale", torch.arange(3.0))
        self.mask = torch.ones(2, 2)  # a plain tensor attribute: a constant of the trace, not in the state dict
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.fc(x) + self.scale + self.mask.sum())


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_Block(), _Block())  # two instances: mangled TorchScript class names
        self.p = torch.nn.Parameter(torch.randn(3).half())
        self.e = torch.nn.Embedding(5, 3)
        self.tied = torch.nn.Linear(3, 5, bias=False)
        self.tied.weight = self.e.weight  # one storage, two names

    def forward(self, x: Tensor) -> Tensor:
        return self.tied(self.blocks(x + self.p.float()))


@pytest.fixture(scope="module")
def evil_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evil")
    victim = folder / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    path = str(folder / "ViT-B-16.pt")
    torch.jit.script(_Evil(str(victim))).save(path)
    victim.write_text(VICTIM_TEXT)  # scripting may run it once
    return path, victim


def test_the_evil_archive_bites_under_torch_jit_load(evil_archive, tmp_path):
    """The fixture is a real exploit: torch.jit.load writes the victim file (so the tests below can fail)."""
    path, victim = evil_archive
    torch.jit.load(path)
    assert victim.read_text().startswith("AAAAA")
    victim.write_text(VICTIM_TEXT)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_converter_runs_code_from_a_torchscript_archive(family, evil_archive, tmp_path, capsys):
    path, victim = evil_archive
    out = str(tmp_path / "out.msgpack")
    assert main([family, path, out]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m port_weights: error: {path}: refused"), err
    assert "__setstate__" in err[0] or "__getstate__" in err[0]
    assert victim.read_text() == VICTIM_TEXT and not os.path.exists(out)


def test_torchscript_state_dict_equals_torch_jit_load(tmp_path):
    """Parameters and buffers under torch's names, stored dtypes, bit-identical; no constants, no other
    attributes; a tied weight under both names."""
    path = str(tmp_path / "net.pt")
    torch.jit.trace(_Net(), torch.randn(2, 3)).save(path)
    ref = {k: v.numpy() for k, v in torch.jit.load(path).state_dict().items()}
    ours = load_torchscript(path)
    assert sorted(ours) == sorted(ref) and "e.weight" in ours and "tied.weight" in ours
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    assert ours["p"].dtype == np.float16
    assert load_torch_checkpoint(path).keys() == ours.keys()  # the converters' reader takes this path


def _rewrite(src: str, dst: str, edit) -> None:
    """Copies the zip ``src`` to ``dst`` with ``edit(name, data) -> data`` applied to each member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, edit(info.filename, zin.read(info.filename)))


def test_hostile_archives_are_refused_in_one_line(tmp_path):
    path = str(tmp_path / "net.pt")
    torch.jit.trace(_Net(), torch.randn(2, 3)).save(path)
    pkl = lambda edit: lambda n, d: edit(d) if n.endswith("/data.pkl") else d  # noqa: E731
    cases = {  # pickle has no offsets: a GLOBAL's text can change length
        "global.pt": (pkl(lambda d: d.replace(b"collections\nOrderedDict\n", b"posix\nsystem\n")),
                      r"refused as unsafe: its data\.pkl names posix\.system; "),
        "storage.pt": (lambda n, d: d[:3] if n.endswith("/data/0") else d, r"holds 3 bytes, fewer than"),
        "beyond.pt": (pkl(lambda d: d.replace(b"(K\x03t(K\x01t", b"(K\x07t(K\x01t", 1)),  # p: size (3,) -> (7,)
                      r"a tensor of size \(7,\) \(stride \(1,\), offset 0\) reaches beyond its storage"),
        "nodata.pt": (lambda n, d: b"" if n.endswith("/data.pkl") else d, r"damaged TorchScript archive"),
    }  # fmt: skip
    for name, (edit, pattern) in cases.items():
        dst = str(tmp_path / name)
        _rewrite(path, dst, edit)
        with pytest.raises(ConversionError, match=pattern) as e:
            load_torch_checkpoint(dst)
        assert str(e.value).startswith(f"{dst}: ") and "\n" not in str(e.value)


def test_zip_bomb_is_refused_before_decompressing(tmp_path):
    """A .pth of half a megabyte whose one member inflates to 512 MiB (the report's 2 MB file inflating to 2 GiB made
    torch.load take 2.5 GB): refused from the declared sizes, nothing decompressed; the same weights saved plainly
    by torch.save pass the check."""
    good = str(tmp_path / "good.pth")
    torch.save({"w": torch.zeros(1000)}, good)
    assert load_torch_checkpoint(good)["w"].shape == (1000,)
    bomb = str(tmp_path / "bomb.pth")
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        with zout.open("good/data/1", "w", force_zip64=True) as f:  # 512 MiB of zeros, ~0.5 MB deflated
            chunk = bytes(2**24)
            for _ in range(32):
                f.write(chunk)
    size = os.path.getsize(bomb)
    assert size < 2**20 and memory_budget(size) < 2**29
    with pytest.raises(ConversionError, match=r"declare 512 MiB uncompressed, .* refused as a possible zip bomb"):
        load_torch_checkpoint(bomb)
