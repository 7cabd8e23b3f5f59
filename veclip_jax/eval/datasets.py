"""Evaluation datasets as random-access sources: nothing is decoded until an example is read.

Each source has `len()` and `source[i] -> {"image": ..., "label": int}`
(classification) or `{"image": ...}` (retrieval, whose captions are listed
up front: they are small). An image is what the data holds: a decoded array
(TFDS), encoded bytes (our records) or a file path (ImageFolder, Karpathy);
`load_image` turns any of them into a PIL image or an RGB array for the
model's preprocessing. The embedding pass (veclip_jax/eval/embed.py) reads
each process's slice of a source in batches, so no dataset is held in memory.

  tfds:NAME       TFDS's `data_source` over a prepared ArrayRecord copy in data_dir (no TensorFlow)
  folder:DIR      an ImageFolder tree: DIR/<class>/<image>; classnames.txt / templates.txt in DIR
  karpathy:JSON   Karpathy's split file for COCO / Flickr30k, every image with all its captions
  records:FILES   our ArrayRecord shards (veclip_jax/data/records.py): `labels` or captions
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from veclip_jax.data import captions as captions_lib
from veclip_jax.data import image_ops, records
from veclip_jax.eval.classnames import read_lines, readable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DatasetError(ValueError):
    """Evaluation data that is missing or not in the expected layout (the message says where and how)."""


@dataclasses.dataclass
class ClassificationData:
    """Labelled images, with the dataset's own class names and templates when it brings them."""

    source: Any  # len(), source[i] -> {"image": ..., "label": int}
    classnames: list[str]
    templates: list[str] | None  # None: the task's (CLIP's 80 by default)
    description: str
    # What identifies the images (tasks on the same images share one embedding pass) and their
    # labels, when both are known without reading the images; None otherwise.
    images_key: tuple | None = None
    labels: np.ndarray | None = None


@dataclasses.dataclass
class RetrievalData:
    """Images and, per image, all its captions (an image may have none: it is then only a target)."""

    source: Any  # len(), source[i] -> {"image": ...}
    captions: list[list[str]]
    description: str
    images_key: tuple | None = None  # as ClassificationData's


def load_image(image: Any) -> Image.Image | np.ndarray:
    """A PIL image or an RGB uint8 array from a decoded array, encoded bytes or a file path
    (image_ops.open_image: the decode budget checked from the header, 16-bit images scaled)."""
    return image_ops.open_image(image)


class _Mapped:
    """source[i] = fn(base[indices[i]]): a view that selects and reshapes examples lazily."""

    def __init__(self, base: Any, indices: Sequence[int] | None, fn: Callable[[Any], dict]):
        self.base, self.fn = base, fn
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.fn(self.base[int(self.indices[i])])


def head(source: Any, n: int) -> Any:
    """The first n examples of a source (all when n is 0 or more than there are)."""
    return source if not n or n >= len(source) else _Mapped(source, range(n), lambda x: x)


# --- TFDS ---------------------------------------------------------------------------------------


def tfds_classification(builder: str, split: str, data_dir: str) -> ClassificationData:
    """A TFDS image classification set through `tfds.data_source` (its `image` and `label` features)."""
    import tensorflow_datasets as tfds  # imports no TensorFlow

    try:
        src = tfds.data_source(builder, split=split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises several types for "not prepared here"
        where = data_dir or "TFDS's default data_dir (~/tensorflow_datasets, or $TFDS_DATA_DIR)"
        raise DatasetError(
            f"tfds:{builder} split {split!r} is not readable in {where}: {type(e).__name__}: {e}. "
            f"Prepare it in ArrayRecord format (README, 'Evaluate': `tfds build {builder} "
            "--file_format=array_record --data_dir=DIR` on a machine with TensorFlow, then copy DIR) "
            "and pass --data_dir=DIR"
        ) from e
    label = src.dataset_info.features["label"]
    names = [readable(n) for n in label.names]
    return ClassificationData(
        _Mapped(src, None, lambda ex: {"image": ex["image"], "label": int(ex["label"])}),
        names,
        None,
        f"tfds:{builder} {split} ({len(src)} images, {label.num_classes} classes)",
    )


# --- ImageFolder ----------------------------------------------------------------------------------


def _class_folders(root: str) -> list[str]:
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def folder_split_dir(root: str, split: str) -> str:
    """The folder that holds the class folders: DIR/split, or (no split) DIR/test or DIR/val if present."""
    if split:
        return os.path.join(root, split)
    for name in ("test", "val"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return root


def image_folder(root: str, split: str = "") -> ClassificationData:
    """An ImageFolder tree: one folder per class (sorted names = label order), images at any depth.

    Class names: DIR/classnames.txt (one a line, in the sorted folder order)
    when present, else the folder names (underscores as spaces). Templates:
    DIR/templates.txt when present. DIR is the tree's root or the split's folder.
    """
    root = os.path.expanduser(root)
    d = folder_split_dir(root, split)
    if not os.path.isdir(d):
        raise DatasetError(f"folder:{root}: no folder {d} (an ImageFolder tree: DIR/<class>/<image>)")
    classes = _class_folders(d)
    if not classes:
        raise DatasetError(f"folder:{root}: {d} holds no class folders (a tree DIR/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for top, dirs, files in os.walk(os.path.join(d, name)):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(top, f))
                    labels.append(label)
    if not paths:
        raise DatasetError(f"folder:{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {d}")
    # A class without images would still take a place among the zero-shot classes (and shift the
    # chance level): refused, as torchvision's ImageFolder refuses it.
    empty = [name for label, name in enumerate(classes) if label not in set(labels)]
    if empty:
        raise DatasetError(
            f"folder:{root}: class folder(s) {', '.join(empty)} under {d} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): remove them or add their images"
        )
    names = [readable(c) for c in classes]
    templates = None
    for where in dict.fromkeys([d, root]):  # the split's folder first, then the tree's root
        f = os.path.join(where, "classnames.txt")
        if os.path.exists(f) and names == [readable(c) for c in classes]:
            names = read_lines(f)
            if len(names) != len(classes):
                raise DatasetError(f"{f} has {len(names)} class names for {len(classes)} folders in {d}")
        f = os.path.join(where, "templates.txt")
        if os.path.exists(f) and templates is None:
            templates = read_lines(f)
    items = list(zip(paths, labels, strict=True))
    return ClassificationData(
        _Mapped(items, None, lambda x: {"image": x[0], "label": x[1]}),
        names,
        templates,
        f"folder:{d} ({len(paths)} images, {len(classes)} classes)",
        ("files", tuple(paths)),
        np.asarray(labels),
    )


# --- Karpathy JSON (COCO, Flickr30k) ----------------------------------------------------------


def karpathy(json_path: str, images_root: str, split: str = "test") -> RetrievalData:
    """The images of `split` in Karpathy's dataset_coco.json / dataset_flickr30k.json, with all captions.

    An image is read from images_root/filepath/filename (COCO's entries have a
    `filepath`, e.g. val2014; Flickr30k's have none). The raw sentences are the
    captions, as in the CLIP papers' retrieval numbers.
    """
    json_path, images_root = os.path.expanduser(json_path), os.path.expanduser(images_root)
    if not os.path.exists(json_path):
        raise DatasetError(
            f"karpathy:{json_path} does not exist: download Karpathy's splits (README, 'Evaluate') "
            "and put dataset_coco.json / dataset_flickr30k.json there"
        )
    with open(json_path) as f:
        entries = [e for e in json.load(f)["images"] if e.get("split") == split]
    if not entries:
        raise DatasetError(f"karpathy:{json_path} has no images in split {split!r}")
    paths = [os.path.join(images_root, e.get("filepath", ""), e["filename"]) for e in entries]
    missing = [p for p in (paths[0], paths[-1]) if not os.path.exists(p)]
    if missing:
        raise DatasetError(f"karpathy:{json_path}: image {missing[0]} is missing (images root {images_root})")
    caps = [[s["raw"].strip() for s in e["sentences"] if s["raw"].strip()] for e in entries]
    return RetrievalData(
        _Mapped(paths, None, lambda p: {"image": p}),
        caps,
        f"karpathy:{json_path} {split} ({len(paths)} images, {sum(map(len, caps))} captions)",
        ("files", tuple(paths)),
    )


# --- our records ----------------------------------------------------------------------------------


def _scan_records(files: Sequence[str], field: Callable[[records.Record], Any]) -> tuple[Any, list]:
    """(reader, field(record) for every record): one pass that keeps only what `field` takes."""
    reader = records.RecordReader(list(files))
    return reader, [field(records.decode_record(reader.raw(i))) for i in range(len(reader))]


def _record_image(reader: Any, i: int) -> bytes:
    return records.decode_record(reader.raw(i)).jpeg


def records_classification(
    files: Sequence[str], label_field: str, classnames: Sequence[str] | None = None
) -> ClassificationData:
    """Records labelled with `label_field` (others skipped); classes: the sorted labels, or `classnames`.

    The scan keeps the labels only; images are read again when embedded.
    """
    reader, values = _scan_records(files, lambda r: (r.labels or {}).get(label_field))
    labelled = list(enumerate(values))
    labelled = [(i, v) for i, v in labelled if v is not None]
    if not labelled:
        raise DatasetError(f"no record in {list(files)} is labelled with {label_field!r}")
    names = list(classnames) if classnames else sorted({v for _, v in labelled})
    index = {c: j for j, c in enumerate(names)}
    unknown = sorted({v for _, v in labelled} - set(index))
    if unknown:
        raise DatasetError(f"labels {unknown[:5]} of {label_field!r} are not among the class names")
    rows = [(i, index[v]) for i, v in labelled]
    return ClassificationData(
        _Mapped(rows, None, lambda x: {"image": _record_image(reader, x[0]), "label": x[1]}),
        names,
        None,
        f"records {label_field} ({len(rows)} images, {len(names)} classes)",
        ("records", tuple(files), tuple(i for i, _ in rows)),
        np.asarray([label for _, label in rows]),
    )


def records_retrieval(files: Sequence[str], caption_field: str) -> RetrievalData:
    """Records with one caption each (`caption_field`, cleaned as for training; records without one are
    only targets)."""
    reader, texts = _scan_records(files, lambda r: captions_lib.clean_caption(getattr(r, caption_field)))
    caps = [[t] if t else [] for t in texts]
    return RetrievalData(
        _Mapped(range(len(reader)), None, lambda i: {"image": _record_image(reader, i)}),
        caps,
        f"records {caption_field} ({len(caps)} images, {sum(map(len, caps))} captions)",
        ("records", tuple(files), tuple(range(len(reader)))),
    )
