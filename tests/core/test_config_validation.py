"""Config validation (wimfris_jax/config_check.py, family_check.py): every command refuses a bad config in one
``wimfris <command>: error: config.<key>=<value>: ...`` line, status 1, before it creates a workdir or output
folder; every shipped config (with each of its arguments) validates cleanly. Nothing here builds parameters or
compiles: the commands stop at validation."""

import glob
import json
import os
import re

import jax
import pytest
from helpers import ROOT

from configs.common import DATASETS
from wimfris_jax import cli
from wimfris_jax.config import ConfigError, apply_overrides, load_config, read_run_config
from wimfris_jax.config_check import validate
from wimfris_jax.model import FAMILIES

TINY = os.path.join(ROOT, "configs", "tiny.py")


def _shipped() -> list[str]:
    """Every configs/*.py with each argument it takes: the datasets of the RefCOCO-family configs, "quick" of the
    demo-style ones."""
    paths = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.basename(path)
        if name in ("__init__.py", "common.py"):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        args = sorted(DATASETS) if "referring_config" in source else ["quick"] if '"quick"' in source else []
        paths += [f"configs/{name}"] + [f"configs/{name}:{a}" for a in args]
    return paths


@pytest.mark.parametrize("path", _shipped())
def test_every_shipped_config_validates(path, tmp_path):
    config = load_config(os.path.join(ROOT, path))  # validates
    assert validate(config, devices=1) is config
    (tmp_path / "config.json").write_text(config.to_json_best_effort())  # as a run writes it: tuples become lists
    assert validate(read_run_config(str(tmp_path / "config.json"))).model.image_size == config.model.image_size


def test_every_model_family_has_a_structure_check():
    assert all(row.check.__module__.startswith("wimfris_jax.") and row.check.__name__ == f"check_{name}"
               for name, row in FAMILIES.items())  # fmt: skip


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    code = cli.main(list(args))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("wimfris ")]


def _sets(*items: str) -> list[str]:
    """``--set`` arguments; first one epoch of 16 examples (one step), so that a config that is not refused trains
    briefly and the test fails fast on the workdir it leaves."""
    return [x for item in ("data.num_train=16", "train.epochs=1", *items) for x in ("--set", item)]


TRAIN_CASES = {
    "batch 0": (["train.global_batch_size=0"], r"config\.train\.global_batch_size=0: must be a positive integer$"),
    "batch -8": (["train.global_batch_size=-8"], r"config\.train\.global_batch_size=-8: must be a positive integer$"),
    "bad regex": (['train.trainable=("[",)'], r"config\.train\.trainable: pattern '\[' is not a valid regex \("),
    "patch 0": (["model.vision.patch_size=0"], r"config\.model\.vision\.patch_size=0: must be a positive integer$"),
    "image not a multiple of the patch": (["model.image_size=130", "data.image_size=130"],
                                          r"config\.model\.image_size=130: must be a multiple of the ViT patch, "
                                          r"vision\.patch_size=8 \(the last 2 px"),
    "data and model sizes differ": (["model.image_size=136"],
                                    r"config\.data\.image_size=128: must equal config\.model\.image_size=136"),
    "epochs -1": (["train.epochs=-1"], r"config\.train\.epochs=-1: must be a positive integer$"),
    "epochs 0": (["train.epochs=0"], r"config\.train\.epochs=0: must be a positive integer$"),
    "lr 0": (["train.lr=0"], r"config\.train\.lr=0\.0: must be a number > 0$"),
    "keep_last 0": (["train.keep_last=0"], r"config\.train\.keep_last=0: must be a positive integer$"),
    "negative interval": (["train.log_every=-5"], r"config\.train\.log_every=-5: must be an integer >= 0"),
    "dtype": (["train.compute_dtype=fp16"], r"config\.train\.compute_dtype='fp16': choose one of \['bfloat16'"),
    "remat": (["train.remat=all"], r"config\.train\.remat='all': choose one of \['auto', 'block', 'dots', 'none'\]"),
    "heads": (["model.decoder.num_heads=3"], r"config\.model\.decoder\.num_heads=3: must divide decoder\.d_model=64"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_a_bad_config_in_one_line_and_makes_no_workdir(case, capsys, tmp_path):
    overrides, pattern = TRAIN_CASES[case]
    workdir = tmp_path / "run"
    code, lines = _run(capsys, "train", "--config", TINY, "--workdir", str(workdir), *_sets(*overrides))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("wimfris train: error: config."), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert not workdir.exists()


def test_every_problem_is_reported_at_once(capsys, tmp_path):
    overrides = ["train.global_batch_size=0", "train.epochs=-1", "train.compute_dtype=fp16", "model.text.depth=0"]
    code, lines = _run(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "run"), *_sets(*overrides))
    assert code == 1 and len(lines) == 1
    problems = lines[0].removeprefix("wimfris train: error: ").split("; ")
    keys = [p.split("=")[0] for p in problems]
    assert keys == ["config.model.text.depth", "config.train.global_batch_size", "config.train.epochs",
                    "config.train.compute_dtype"], problems  # fmt: skip


def test_the_global_batch_must_split_over_the_devices(capsys, tmp_path):
    n = jax.device_count()  # 8 virtual CPU devices (tests/conftest.py)
    if n == 1:
        pytest.skip("one device: every batch splits")
    code, lines = _run(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "run"),
                       *_sets(f"train.global_batch_size={n + 1}"))  # fmt: skip
    assert code == 1 and f"config.train.global_batch_size={n + 1}: must be a multiple of the {n} devices" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_configs")
    (d / "syntax.py").write_text("from configs import common\n\n\ndef get_config(:\n    return common\n")
    (d / "returns_int.py").write_text("def get_config():\n    return 3\n")
    (d / "no_get_config.py").write_text("CONFIG = 1\n")
    (d / "fails.py").write_text("def get_config():\n    sizes = {}\n    return sizes['b']\n")
    from PIL import Image

    Image.new("RGB", (20, 10), (200, 30, 30)).save(d / "ok.png")
    (d / "weights.msgpack").write_bytes(b"never read")
    return d


FILE_CASES = {
    "syntax.py": r"config file '{f}', line 4: syntax error: ",
    "returns_int.py": r"config file '{f}': get_config\(\) returned int, not an ml_collections ConfigDict$",
    "no_get_config.py": r"config file '{f}' defines no get_config\(\)$",
    "fails.py": r"config file '{f}', line 3: get_config\(\) fails: KeyError: 'b'$",
}


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_a_broken_config_file_is_one_line_naming_the_file(name, bad_files, capsys, tmp_path):
    f = str(bad_files / name)
    pattern = FILE_CASES[name].format(f=re.escape(f))
    for args in (["train", "--config", f, "--workdir", str(tmp_path / "run")], ["summary", "--config", f],
                 ["predict", "--config", f, "--checkpoint", str(bad_files / "weights.msgpack"), "--image",
                  str(bad_files / "ok.png"), "--text", "a cat", "--out", str(tmp_path / "out")]):  # fmt: skip
        code, lines = _run(capsys, *args)
        assert code == 1 and len(lines) == 1, (args[0], lines)
        assert re.search(pattern, lines[0].removeprefix(f"wimfris {args[0]}: error: ")), lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_demo_and_eval_refuse_before_writing(capsys, tmp_path, bad_files):
    workdir = tmp_path / "demo"
    code, lines = _run(capsys, "demo", "--quick", "--workdir", str(workdir), *_sets("train.epochs=0"))
    assert code == 1 and lines == ["wimfris demo: error: config.train.epochs=0: must be a positive integer"]
    assert not workdir.exists()
    # a run whose config.json no longer builds: eval names the file and the key, writes no --json
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(TINY)
    config.model.vision.num_heads = 5
    (run / "config.json").write_text(config.to_json_best_effort())
    out = tmp_path / "scores" / "s.json"
    code, lines = _run(capsys, "eval", "--checkpoint", str(run), "--split", "val", "--json", str(out))
    assert code == 1 and len(lines) == 1
    assert f"{run}/config.json: config.model.vision.num_heads=5: must divide vision.width=64" in lines[0]
    assert not out.parent.exists()


def test_a_run_config_is_checked_for_its_model_not_its_finished_training(tmp_path):
    config = load_config(TINY)
    config.train.keep_last = 0  # refused for training, irrelevant to eval / predict
    path = tmp_path / "config.json"
    path.write_text(config.to_json_best_effort())
    assert read_run_config(str(path)).train.keep_last == 0
    with pytest.raises(ConfigError, match=r"config\.train\.keep_last=0"):
        validate(read_run_config(str(path)))
    from wimfris_jax.load import load_model

    config = load_config(TINY)
    config.model.vision.patch_size = 0
    with pytest.raises(ConfigError, match=r"config\.model\.vision\.patch_size=0: must be a positive integer"):
        load_model(config, str(tmp_path / "never_read.msgpack"))
    with pytest.raises(ConfigError, match=r"config\.model\.vision\.patch_size=0"):
        load_model(config.model, str(tmp_path / "never_read.msgpack"))


def _int_leaves(group, prefix=""):
    for key in group:
        value = group[key]
        if hasattr(value, "keys"):
            yield from _int_leaves(value, f"{prefix}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            yield f"{prefix}{key}"


ZERO_MEANS_NONE = {"vision.num_registers", "neck.window"}  # no registers; one window over the map
TINY_CONFIGS = ["configs/tiny.py", "configs/tfanet_tiny.py:quick", "configs/vipa_tiny.py:quick"]


@pytest.mark.parametrize("path", TINY_CONFIGS)
def test_every_integer_of_every_family_is_checked(path):
    """Each integer of config.model set to 0 -- a size of any family: widths, depths, heads, patch, window, state,
    positions... -- is refused naming its key, except where 0 means "none"."""
    keys = list(_int_leaves(load_config(os.path.join(ROOT, path)).model))
    assert len(keys) >= 12, keys
    for key in keys:
        config = load_config(os.path.join(ROOT, path))
        if key in ZERO_MEANS_NONE:
            apply_overrides(config, [f"model.{key}=0"])
            continue
        with pytest.raises(ConfigError, match=rf"config\.model\.{re.escape(key)}=0: must be a positive integer"):
            apply_overrides(config, [f"model.{key}=0"])


FAMILY_CASES = [
    ("configs/tiny.py", ["model.neck.wmf.gate_heads=3"], r"neck\.wmf\.gate_heads=3: must divide neck\.dim=64"),
    ("configs/tiny.py", ["model.word_len=80", "data.word_len=80"],
     r"config\.model\.word_len=80: must be at most the text tower's text\.context_length=77"),
    ("configs/tiny.py", ["model.neck.window=-4"], r"config\.model\.neck\.window: window size must be positive"),
    ("configs/tiny.py", ["model.vision_adapter.kernels=(3, 4)"],
     r"vision_adapter\.kernels=\(3, 4\): must be a non-empty tuple of positive odd integers"),
    ("configs/detris_b.py", ["model.vision_adapter.num_heads=5"], r"vision_adapter\.num_heads=5: must divide "
                                                                  r"vision_adapter\.dim=128"),
    ("configs/detris_b.py", ["model.vision.preset=b15"], r"config\.model does not build a 'wimfris' model: "
                                                         r"ValueError: unknown DINOv2 preset 'b15'"),
    ("configs/tfanet_tiny.py:quick", ["model.level.mlam.num_heads=3"],
     r"level\.mlam\.num_heads=3: must divide each of the stage widths vision\.dims \[16, 32, 64, 64\]"),
    ("configs/tfanet_tiny.py:quick", ["model.vision.dims=(16, 32, 64)"],
     r"vision\.dims=\(16, 32, 64\): needs one entry per stage of vision\.depths=\(1, 1, 1, 1\)"),
    ("configs/vipa_tiny.py:quick", ["model.vision.num_heads=(1, 2, 3, 8)"],
     r"vision\.num_heads\[2\]=3: must divide stage 2's width vision\.embed_dim \* 2\*\*2=128"),
    ("configs/vipa_tiny.py:quick", ["model.veg.num_heads=3"], r"config\.model\.veg\.num_heads=3: must divide veg"),
    ("configs/vipa_tiny.py:quick", ["model.text.num_heads=3"], r"config\.model\.text\.num_heads=3: must divide "
                                                               r"text\.width=64"),
]  # fmt: skip


@pytest.mark.parametrize("path, overrides, pattern", FAMILY_CASES)
def test_family_structure_problems_name_the_key(path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(load_config(os.path.join(ROOT, path)), overrides)


def test_backbones_that_pad_take_any_image_size():
    """Swin pads to its windows and patches (VIPA runs at 66 px); only the ViT's crop is refused."""
    config = apply_overrides(load_config(os.path.join(ROOT, "configs/vipa_tiny.py:quick")),
                             ["model.image_size=66", "data.image_size=66"])  # fmt: skip
    assert config.model.image_size == 66
    assert json.loads(config.to_json_best_effort())["data"]["image_size"] == 66


def _train_keys_read() -> set[str]:
    """Every config.train key the package's code reads (``tc.get("k")``, ``train_config.k``, ``choice(train_config,
    "k", ...)``, ...) or validates (config_check's rules)."""
    from wimfris_jax.config_check import TRAIN_CHOICES, TRAIN_RULES

    owner = r"(?:\btc|\btrain_config|\bconfig\.train|\bconfig\[\"train\"\])"
    patterns = [
        re.compile(owner + r"\.get\(\s*\"(\w+)\""),
        re.compile(owner + r"\[\"(\w+)\"\]"),
        re.compile(owner + r"\.(?!get\b|update\b|keys\b|items\b|values\b|to_json)(\w+)\b(?!\()"),
        re.compile(r"choice\(\s*train_config,\s*\"(\w+)\""),
    ]
    keys = {k for rule in TRAIN_RULES for k in rule[0]} | set(TRAIN_CHOICES)
    for path in glob.glob(os.path.join(ROOT, "wimfris_jax", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        keys |= {k for p in patterns for k in p.findall(source)}
    return keys


def test_every_train_key_the_code_reads_is_declared_and_settable():
    """configs/common.py's train_config declares every key with its default, so ``--set train.KEY=...`` works."""
    from configs.common import train_config
    from wimfris_jax.train.sharding import DEFAULT_FSDP_MIN_SIZE

    keys = _train_keys_read()
    assert {"fsdp_min_size", "steps_per_epoch", "eval_batch_size", "weight_decay", "lr_schedule"} <= keys
    declared = train_config(global_batch_size=1, lr=1.0)
    assert sorted(keys - set(declared)) == []
    assert declared.fsdp_min_size == DEFAULT_FSDP_MIN_SIZE
    sets = ["train.fsdp_min_size=1024", "train.steps_per_epoch=7", "train.eval_max_examples=5",
            "train.lr_scale=(('^neck/', 0.5),)"]  # fmt: skip
    config = apply_overrides(load_config(TINY), sets)
    assert (config.train.fsdp_min_size, config.train.steps_per_epoch, config.train.eval_max_examples) == (1024, 7, 5)
    assert config.train.lr_scale == (("^neck/", 0.5),)
