"""Builds the tensorflow-datasets `ref_coco` set (array_record) from the refer files.

The set is read by :class:`data_pipeline.refcoco.RefCocoTfdsSource` (which needs no TensorFlow):

    python -m data_pipeline.build_tfds manual --refer-root /data/refer --out /data/refcoco_manual
    python -m data_pipeline.build_tfds build --config refcoco_unc --data-dir /data/tfds \
        --manual-dir /data/refcoco_manual

The tfds builder wants the refer files converted to its manual `refcoco.json` (`make_manual_dir`, our
equivalent of tfds's `manual_download_process.py`), and TensorFlow to serialize (`pip install 'wimfris_jax[tf]'`);
`build(..., without_tensorflow=True)` instead patches the one TF call of tfds 4.9's serializer (docs/DATA.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import importlib.util
import json
import os
import sys
from unittest import mock

import tensorflow_datasets as tfds
from tensorflow_datasets.core.features import feature as feature_lib

from data_pipeline.instances import InstancesFileError, find_ref_entries, read_instances
from data_pipeline.refcoco import CONFIGS
from data_pipeline.refer import VALID, default_image_dir, load_refs

TF_FIX = "pip install 'wimfris_jax[tf]'  (tensorflow-cpu; only building needs it, reading does not)"


def make_manual_dir(
    refer_root: str, out_dir: str, image_dir: str | None = None, coco_instances: str | None = None
) -> str:
    """Writes `<out_dir>/refcoco.json` (+ a `coco_train2014` link) for the tfds builder; returns out_dir.

    Reads every refs file present under `refer_root` (refer layout). The per-image COCO annotation lists
    come from `coco_instances` (e.g. instances_train2014.json) or else from the datasets' instances.json.
    """
    refs, instance_files = [], []
    for dataset, split_by in VALID:
        path = os.path.join(refer_root, dataset, f"refs({split_by}).p")
        if not os.path.isfile(path):
            continue
        anns_path = os.path.join(refer_root, dataset, "instances.json")
        instance_files.append(anns_path)
        images, anns = read_instances(anns_path)
        for ref in load_refs(path):
            _, ann = find_ref_entries(anns_path, ref, images, anns)
            refs.append({**ref, "ann": ann, "dataset": dataset, "dataset_partition": split_by})
    if not refs:
        raise FileNotFoundError(f"no refs(<split_by>).p files under {refer_root}/<refcoco|refcoco+|refcocog>/")
    images, by_image = {}, {}
    for path in [coco_instances] if coco_instances else instance_files:
        file_images, file_anns = read_instances(path)
        images.update(file_images)
        for a in file_anns.values():
            by_image.setdefault(a["image_id"], {})[a["id"]] = a
    needed = sorted({r["image_id"] for r in refs})
    missing = [i for i in needed if i not in images]
    if missing:
        where = coco_instances or ", ".join(instance_files)
        raise InstancesFileError(f"{where}: field 'images' has no id {missing[:5]}, which refs name")
    coco_anns = {str(i): {"info": images[i], "anns": list(by_image.get(i, {}).values())} for i in needed}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "refcoco.json"), "w") as f:
        json.dump({"ref": refs, "coco_anns": coco_anns}, f)
    link = os.path.join(out_dir, "coco_train2014")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(image_dir or default_image_dir(refer_root)), link)
    return out_dir


def build(config: str, data_dir: str, manual_dir: str, *, without_tensorflow: bool = False) -> None:
    """Prepares `ref_coco/<config>` as array_record under `data_dir` from a manual dir (see make_manual_dir)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown ref_coco config {config!r}; valid: {sorted(CONFIGS)}")
    if not os.path.isfile(os.path.join(manual_dir, "refcoco.json")):
        raise FileNotFoundError(f"{manual_dir}/refcoco.json missing: run `python -m data_pipeline.build_tfds manual`")
    if not without_tensorflow:
        try:
            import tensorflow  # noqa: F401  # optional (the [tf] extra): checked here to name the install
        except ImportError as e:
            raise ImportError(
                f"building tfds ref_coco needs TensorFlow: {TF_FIX}; or pass without_tensorflow=True "
                "(--without-tensorflow)"
            ) from e
    builder = tfds.builder(f"ref_coco/{config}", data_dir=data_dir, file_format="array_record")
    dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("importlib_resources") is None:
            # tfds 4.9 imports the `importlib_resources` backport unconditionally but declares it only for
            # Python < 3.9; the standard library's importlib.resources serves the same purpose here.
            stack.enter_context(mock.patch.dict(sys.modules, {"importlib_resources": importlib.resources}))
        if without_tensorflow:
            # tfds 4.9's ragged serializer asks TensorInfo.dtype (a tf.DType) where the NumPy dtype suffices.
            stack.enter_context(
                mock.patch.object(feature_lib.TensorInfo, "dtype", property(lambda self: self.np_dtype))
            )
        builder.download_and_prepare(download_config=dl_config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.build_tfds", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manual", help="refer layout -> tfds manual dir (refcoco.json + coco_train2014 link)")
    m.add_argument("--refer-root", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--image-dir")
    m.add_argument("--coco-instances", help="instances_train2014.json (optional)")
    b = sub.add_parser("build", help="prepare ref_coco/<config> (array_record)")
    b.add_argument("--config", required=True, choices=sorted(CONFIGS))
    b.add_argument("--data-dir", required=True)
    b.add_argument("--manual-dir", required=True)
    b.add_argument("--without-tensorflow", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "manual":
        print(make_manual_dir(a.refer_root, a.out, a.image_dir, a.coco_instances))
    else:
        build(a.config, a.data_dir, a.manual_dir, without_tensorflow=a.without_tensorflow)


if __name__ == "__main__":
    main()
