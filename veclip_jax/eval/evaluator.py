"""Evaluation during training: zero-shot per labelled attribute, and retrieval.

The eval split is a set of our records (veclip_jax/data/records.py) that carry
`labels` (attribute -> class name, e.g. the demo's colour, shape, size,
position and background) and a caption. Images are preprocessed once, as for
any CLIP evaluation (shorter side resized, centre crop, CLIP normalisation).
Each call encodes them with the current parameters and reports

  zeroshot/<attribute>_top1   for every attribute with templates in config.eval.templates
  retrieval/i2t_R@k, t2i_R@k  with config.eval.caption_field as each image's caption
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from veclip_jax.data import captions as captions_lib
from veclip_jax.data import image_ops, records
from veclip_jax.data.tokenizer import Tokenizer
from veclip_jax.eval.encoders import Encoders
from veclip_jax.eval.retrieval import retrieval_recall
from veclip_jax.eval.zeroshot import class_embeddings, topk_accuracy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LabelledSet:
    """An eval split in memory: images, per-attribute labels, one caption per image."""

    images: np.ndarray  # uint8 [n, S, S, 3]
    labels: dict[str, list[str | None]]  # attribute -> label of each image (None: unlabelled)
    captions: list[str]  # cleaned; "" where the record has none
    skipped: int  # records whose image did not decode, or that were not records


def load_labelled_set(files: Sequence[str], image_size: int, caption_field: str) -> LabelledSet:
    """Reads eval records, preprocessing images for evaluation; bad records are skipped and counted."""
    images, caps, label_rows, skipped = [], [], [], 0
    reader = records.RecordReader(list(files))
    for i in range(len(reader)):
        try:
            rec = records.decode_record(reader.raw(i))
            images.append(image_ops.decode_eval_image(rec.jpeg, image_size))
        except (records.RecordFormatError, image_ops.ImageDecodeError) as e:
            skipped += 1
            log.warning("eval record %d skipped: %s", i, e)
            continue
        caps.append(captions_lib.clean_caption(getattr(rec, caption_field)))
        label_rows.append(dict(rec.labels or {}))
    attributes = sorted({a for row in label_rows for a in row})
    labels = {a: [row.get(a) for row in label_rows] for a in attributes}
    if not images:
        raise ValueError(f"no usable eval records in {list(files)}")
    return LabelledSet(np.stack(images), labels, caps, skipped)


class Evaluator:
    """`evaluator(params) -> {metric: value}` on a LabelledSet (see module doc)."""

    def __init__(
        self,
        encoders: Encoders,
        data: LabelledSet,
        tokenizer: Tokenizer,
        templates: Mapping[str, Sequence[str]],
        recall_at: Sequence[int] = (1, 5),
    ):
        self.encoders, self.data, self.tokenizer = encoders, data, tokenizer
        self.recall_at = tuple(int(k) for k in recall_at)
        # attribute -> (class names, templates, image rows, label index per row)
        self.tasks: dict[str, tuple[list[str], tuple[str, ...], np.ndarray, np.ndarray]] = {}
        for attribute, tmpl in templates.items():
            values = data.labels.get(attribute)
            if not values:
                log.warning("eval: no image is labelled with %r; its templates are unused", attribute)
                continue
            rows = np.asarray([i for i, v in enumerate(values) if v is not None])
            classnames = sorted({values[i] for i in rows})
            index = {c: j for j, c in enumerate(classnames)}
            self.tasks[attribute] = (
                classnames,
                tuple(tmpl),
                rows,
                np.asarray([index[values[i]] for i in rows]),
            )
        self.caption_rows = np.asarray([i for i, c in enumerate(data.captions) if c])
        self.caption_tokens = tokenizer.encode_batch([data.captions[i] for i in self.caption_rows])

    def __call__(self, params: Any) -> dict[str, float]:
        image_embeds = self.encoders.images(params, self.data.images)

        def encode_text(texts: Sequence[str]) -> np.ndarray:
            return self.encoders.texts(params, self.tokenizer.encode_batch(texts))

        out: dict[str, float] = {}
        for attribute, (classnames, tmpl, rows, labels) in self.tasks.items():
            cls = class_embeddings(encode_text, classnames, tmpl)
            out[f"zeroshot/{attribute}_top1"] = topk_accuracy(image_embeds[rows], cls, labels, k=1)
        if len(self.caption_rows):
            text_embeds = self.encoders.texts(params, self.caption_tokens)
            recall = retrieval_recall(
                image_embeds[self.caption_rows],
                text_embeds,
                np.arange(len(self.caption_rows)),
                self.recall_at,
            )
            out.update({f"retrieval/{k}": v for k, v in recall.items()})
        return out
