"""The evaluation registry: what an entry of `config.evals` may say, and the named standard tasks.

big_vision's `config.evals` idea: a dict of named entries, each with a task
`type`, its dataset and options. Training runs every entry at its own `every`
(and at the end); `launch/eval.py --tasks=...` runs the same entries, or the
standard ones below by name. This module is plain Python (no JAX): the config
check imports it. Entries are checked by the one typed checker (veclip_jax/schema.py).

An entry (every field but `type` and `dataset` optional):

  type        "zeroshot_classification" | "retrieval" | "linear_probe"
  dataset     where the data is:
                "tfds:NAME"     a TFDS builder read with tfds.data_source (no TensorFlow)
                "folder:DIR"    an ImageFolder tree (a folder per class)
                "karpathy:JSON" Karpathy's COCO / Flickr30k split file (retrieval), images under `images`
                "records:FILES" our ArrayRecord shards with `labels` (classification) or captions (retrieval)
                "demo"          the demo data's held-out split (runs on demo data only)
  split       the evaluated split: a TFDS split ("validation", "test[:1000]"), a subfolder of an
              ImageFolder tree ("" = the tree itself), a Karpathy split ("test")
  data_dir    root of relative paths and TFDS's data_dir ("" = launch/eval.py's --data_dir)
  every       evaluate every N training steps (0 = config.eval_every)
  max_examples  evaluate the first N examples only (0 = all): a quicker check during training
  zeroshot_classification:
    classnames  "" (the dataset's own: classnames.txt of a folder, TFDS label names, record labels),
                a name of veclip_jax/eval/data/classnames/, or a file (one class a line)
    templates   "" (the dataset's templates.txt, else CLIP's 80), a name of
                veclip_jax/eval/data/templates/, a file, or a tuple of strings with "{}"
    label_field records only: the `labels` attribute classified
  retrieval:
    images      the images' root for karpathy: (each image at images/filepath/filename)
    caption_field  records only: "vecap_text" or "alt_text"
    recall_at   the k of recall@k, e.g. (1, 5, 10)
  linear_probe:
    train_split the split the classifier is fitted on ("train")
    val_fraction  the part of train_split held out to choose the regularisation
    max_iter    L-BFGS iterations per fit
    label_field records only, as above
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from veclip_jax import schema
from veclip_jax.errors import ConfigError

TASK_TYPES = ("zeroshot_classification", "retrieval", "linear_probe")
DATASET_KINDS = ("tfds", "folder", "karpathy", "records", "demo")

# Per type: every field an entry may hold, with its default (the type checks go by the default's type).
_COMMON: dict[str, Any] = dict(
    type="", dataset="", split="", data_dir="", every=0, max_examples=0
)
FIELDS: dict[str, dict[str, Any]] = {
    "zeroshot_classification": _COMMON | dict(classnames="", templates="", label_field=""),
    "retrieval": _COMMON | dict(images="", caption_field="vecap_text", recall_at=(1, 5, 10)),
    "linear_probe": _COMMON
    | dict(train_split="train", val_fraction=0.2, max_iter=1000, label_field=""),
}

# Per field (of the entry with its type's defaults): the range rules (schema.check_ranges).
_RANGES: list[schema.Check] = [
    ("every", lambda x: x >= 0, "must be >= 0"),
    ("max_examples", lambda x: x >= 0, "must be >= 0"),
    ("max_iter", lambda x: x >= 1, "must be >= 1"),
    ("caption_field", lambda x: x in ("vecap_text", "alt_text"), "'vecap_text' or 'alt_text'"),
    ("recall_at", lambda v: len(v) > 0 and all(isinstance(k, int) and k >= 1 for k in v), "ks >= 1"),
    ("val_fraction", lambda x: 0 < x < 1, "must lie in (0, 1)"),
]

# The standard tasks launch/eval.py knows by name. Relative paths are under --data_dir;
# TFDS datasets are read from --data_dir (TFDS's layout: DATA_DIR/NAME/VERSION/...).
_PAPER = "clip_80"
_CLASSIFICATION: dict[str, tuple[str, str, str, str, str]] = {
    # name: (title, TFDS builder, split, class names, templates)
    "imagenet": ("ImageNet", "imagenet2012", "validation", "imagenet1k", _PAPER),
    "imagenet_v2": ("ImageNet-V2", "imagenet_v2", "test", "imagenet1k", _PAPER),
    "imagenet_sketch": ("ImageNet-Sketch", "imagenet_sketch", "test", "imagenet1k", _PAPER),
    "cifar10": ("CIFAR-10", "cifar10", "test", "cifar10", "cifar10"),
    "cifar100": ("CIFAR-100", "cifar100", "test", "cifar100", "cifar100"),
    "food101": ("Food-101", "food101", "validation", "", "food101"),
    "pets": ("Pets", "oxford_iiit_pet", "test", "pets", "pets"),
    "flowers": ("Flowers-102", "oxford_flowers102", "test", "flowers", "flowers"),
    "dtd": ("DTD", "dtd", "test", "", "dtd"),
    "caltech101": ("Caltech-101", "caltech101", "test", "caltech101", "caltech101"),
    "cars": ("Cars", "cars196", "test", "", "cars"),
    "stl10": ("STL-10", "stl10", "test", "", "stl10"),
    "svhn": ("SVHN", "svhn_cropped", "test", "svhn", "svhn"),
    "mnist": ("MNIST", "mnist", "test", "mnist", "mnist"),
    "pcam": ("PCam", "patch_camelyon", "test", "pcam", "pcam"),
    "sun397": ("SUN397", "sun397", "test", "", "sun397"),
}
_RETRIEVAL: dict[str, tuple[str, str, str]] = {
    # name: (title, Karpathy JSON, images root), both under --data_dir
    "coco": ("COCO", "coco/dataset_coco.json", "coco"),  # 5k test images, 25k captions
    "flickr30k": ("Flickr", "flickr30k/dataset_flickr30k.json", "flickr30k/flickr30k-images"),  # 1k, 5k
}
TITLES: dict[str, str] = {k: v[0] for k, v in (_RETRIEVAL | _CLASSIFICATION).items()}  # the paper's order


def standard_task(name: str) -> dict[str, Any]:
    """The entry of a task named on launch/eval.py's command line.

    `imagenet`, `coco`, ... (the tables above), `folder:DIR` (zero-shot on an
    ImageFolder tree), `tfds:NAME[:SPLIT]` (zero-shot with TFDS's label names),
    and `linear_probe:X` for any classification X of these (fitted on its
    `train` split, or DIR/train for a folder whose test images are in DIR/test).
    """
    if name.startswith("linear_probe:"):
        entry = standard_task(name[len("linear_probe:") :])
        if entry["type"] != "zeroshot_classification":
            raise ValueError(f"task {name!r}: a linear probe needs a classification dataset")
        entry = {k: v for k, v in entry.items() if k in FIELDS["linear_probe"]}
        if entry["dataset"].startswith("folder:") and not entry.get("split"):
            entry["split"] = "test"
        return entry | dict(type="linear_probe", train_split="train")
    if name.startswith("folder:"):
        return dict(type="zeroshot_classification", dataset=name)
    if name.startswith("tfds:"):
        builder, _, split = name[len("tfds:") :].partition(":")
        return dict(type="zeroshot_classification", dataset=f"tfds:{builder}", split=split or "test")
    if name in _CLASSIFICATION:
        _, builder, split, classnames, templates = _CLASSIFICATION[name]
        return dict(
            type="zeroshot_classification",
            dataset=f"tfds:{builder}",
            split=split,
            classnames=classnames,
            templates=templates,
        )
    if name in _RETRIEVAL:
        _, json_file, images = _RETRIEVAL[name]
        return dict(type="retrieval", dataset=f"karpathy:{json_file}", split="test", images=images)
    known = ", ".join([*_CLASSIFICATION, *_RETRIEVAL])
    raise ValueError(
        f"unknown task {name!r}: one of {known}, folder:DIR, tfds:NAME[:SPLIT], linear_probe:TASK, "
        "or an entry of the model's config.evals"
    )


def task_key(name: str) -> str:
    """A task name as a metric prefix and file name: `folder:/data/pets` -> `folder_pets`."""
    kind, sep, rest = name.partition(":")
    if sep and kind == "linear_probe":
        return f"linear_probe_{task_key(rest)}"
    if sep and kind == "folder":
        name = f"folder_{os.path.basename(os.path.normpath(rest))}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def dataset_kind(spec: str) -> str:
    """The part of a `dataset` spec before the colon (`demo` has none)."""
    return spec.partition(":")[0]


def with_defaults(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry completed with its type's defaults (check_entry first)."""
    return dict(FIELDS[entry["type"]]) | dict(entry)


def check_entry(name: str, entry: Mapping[str, Any]) -> None:
    """Raises ValueError (ConfigError) naming `NAME.FIELD` for an entry that cannot run (see the module doc).

    Fields are checked by the one typed checker (veclip_jax/schema.py) against
    FIELDS[type], then the ranges (_RANGES) and the dataset rules below.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{name}: an evaluation's name holds letters, digits, '_', '.', '-' only")
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{name}: an evaluation is a dict with a `type` and a `dataset`")
    kind = entry.get("type")
    if kind not in TASK_TYPES:
        raise ConfigError(f"{name}.type={kind!r}: one of {', '.join(TASK_TYPES)}")
    fields = FIELDS[kind]
    templates = entry.get("templates")
    if isinstance(templates, tuple | list):  # the one field of two types: a name (str) or the templates
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ConfigError(f"{name}.templates: a tuple of strings each holding '{{}}'")
        entry = {k: v for k, v in entry.items() if k != "templates"}
    unknown = f"is not a field of a {kind} evaluation ({', '.join(fields)})"
    schema.check_section(entry, fields, name, unknown=unknown)
    e = with_defaults(entry)
    spec = e["dataset"]
    if dataset_kind(spec) not in DATASET_KINDS or (spec != "demo" and ":" not in spec):
        raise ConfigError(
            f"{name}.dataset={e['dataset']!r}: tfds:NAME, folder:DIR, karpathy:JSON, records:FILES or demo"
        )
    kind_of_data = dataset_kind(e["dataset"])
    if kind == "retrieval" and kind_of_data not in ("karpathy", "records", "demo"):
        raise ConfigError(f"{name}.dataset={e['dataset']!r}: retrieval reads karpathy:, records: or demo")
    if kind != "retrieval" and kind_of_data == "karpathy":
        raise ConfigError(f"{name}.dataset={e['dataset']!r}: karpathy: data is for retrieval")
    if kind == "linear_probe" and kind_of_data not in ("tfds", "folder"):
        raise ConfigError(
            f"{name}.dataset={e['dataset']!r}: a linear probe reads tfds: or folder: (2 splits)"
        )
    if kind_of_data in ("records", "demo") and kind != "retrieval" and not e["label_field"]:
        raise ConfigError(f"{name}.label_field: records are classified by one of their `labels` attributes")
    schema.check_ranges(e, [c for c in _RANGES if c[0] in e], name)
