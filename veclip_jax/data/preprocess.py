"""Per-example preprocessing: one Item -> an Example of the batch keys asked for, or Skipped.

Runs in the pipeline's reader threads and worker processes (pickled to
them), so it holds plain values only and imports no jax. For each example:
read the record (ArrayRecord) or parse the streamed sample (readers/),
choose the caption (VeCLIP mixing with the source's vecap_prob), decode +
RandomResizedCrop (uint8 pixels: the model normalises them inside its jitted
step, models/clip.py), tokenise, and make the keys beyond those
(MoCo v2 views, an EDA caption, a BERT-masked caption). Each draws from its
own stream of seeds.example_rng(source seed, stream, epoch, index), so an
example looks the same whatever the process count, worker count or restart.

A sample that cannot be used becomes Skipped(reason) (data/skips.py), checked
in that table's order: the record or sample, its caption, its image.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

from veclip_jax.data import augment, captions, image_ops, records, seeds, text_augment
from veclip_jax.data import sources as sources_mod
from veclip_jax.data.readers.parquet import row_fields
from veclip_jax.data.readers.webdataset import sample_fields
from veclip_jax.data.sources import Item, Skipped, SourceSpec
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer

if TYPE_CHECKING:  # not imported at run time: worker processes unpickle this module
    import ml_collections

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What the per-example image work needs from the config (plain values: it is pickled to workers)."""

    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    decoder: str
    resize: str = "torch"  # data.resize_backend


@dataclasses.dataclass(frozen=True)
class ExtraSpec:
    """What Preprocess makes beside "tokens" (plain values: pickled to workers).

    image: the RandomResizedCrop "image" (False when the batch keys lack it).
    views: the MoCo v2 "views". eda_alpha: "tokens_eda" when set. mlm and
    mlm_keys: the masking, and which of "tokens_mlm" / "mlm_labels" the batch
    carries.
    """

    image: bool = True
    views: augment.ViewSpec | None = None
    eda_alpha: float | None = None
    mlm: text_augment.MaskSpec | None = None
    mlm_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Example:
    """One usable example: its arrays, and where it came from (for the batcher's counts)."""

    source: int
    position: int
    arrays: dict[str, np.ndarray]


class Preprocess(grain.transforms.Map):
    """One Item -> Example({"image": uint8 [S, S, 3], "tokens": int32 [L]}, and extras), or Skipped.

    The extras (ExtraSpec): "views" uint8 [V, S, S, 3], "tokens_eda",
    "tokens_mlm", "mlm_labels" int32 [L]; "image" left out when not wanted.
    """

    def __init__(
        self,
        specs: list[SourceSpec],
        image: ImageSpec,
        tokenizer: Tokenizer | HFTokenizer,
        include_ids: bool = False,
        extras: ExtraSpec | None = None,
    ):
        self.specs = specs
        self.image = image
        self.tokenizer = tokenizer
        self.include_ids = include_ids
        self.extras = extras or ExtraSpec()
        # Random access to the ArrayRecord sources' shards (picklable: each worker opens its own).
        self.readers = {s.index: records.RecordReader(list(s.files)) for s in specs if not s.streamed}

    def _fields(self, spec: SourceSpec, item: Item) -> tuple[Any, str | None, str | None] | str:
        if spec.format == sources_mod.ARRAY_RECORD:
            reader = self.readers[spec.index]
            try:
                rec = records.decode_record(reader.raw(item.index))
            except records.RecordFormatError as e:
                # A damaged chunk, or bytes that are not a record: skipped, and the shard named.
                path, local = reader.locate(item.index)
                log.warning("%s: skipping record %d of shard %s: %s", spec.label, local, path, e)
                return "bad_record"
            alt = None if spec.alt_text_field == "none" else getattr(rec, spec.alt_text_field)
            vecap = None if spec.vecap_text_field == "none" else getattr(rec, spec.vecap_text_field)
            return rec.jpeg, alt, vecap
        fields = dict(
            image_field=spec.image_field,
            alt_text_field=spec.alt_text_field,
            vecap_text_field=spec.vecap_text_field,
        )
        if spec.format == sources_mod.WEBDATASET:
            sample = sample_fields(item.payload, **fields)
            return sample if isinstance(sample, str) else sample[:3]
        return row_fields(item.payload, **fields)

    def map(self, item: Item | Skipped) -> Example | Skipped:
        if isinstance(item, Skipped):
            return item
        spec = self.specs[item.source]
        fields = self._fields(spec, item)
        if isinstance(fields, str):
            return Skipped(fields, item.source, item.position)
        data, alt, vecap = fields
        choice = captions.choose_caption(
            alt, vecap, vecap_prob=spec.vecap_prob, seed=spec.seed, epoch=item.epoch, index=item.index
        )
        if not choice.text:
            return Skipped("empty_caption", item.source, item.position)
        if not isinstance(data, bytes | bytearray | memoryview):  # None: no image member or cell
            return Skipped("missing_image", item.source, item.position)
        im, ex = self.image, self.extras
        data = bytes(data)
        out: dict[str, np.ndarray] = {}
        try:
            if ex.image:
                rng = seeds.example_rng(spec.seed, seeds.STREAM_CROP, item.epoch, item.index)
                out["image"] = image_ops.decode_random_crop(
                    data,
                    rng,
                    size=im.image_size,
                    scale=im.crop_scale,
                    ratio=im.crop_ratio,
                    decoder=im.decoder,
                    resize=im.resize,
                )  # uint8: normalised on the device (batch.py)
            if ex.views is not None:
                rngs = [
                    seeds.example_rng(spec.seed, seeds.STREAM_VIEW, item.epoch, item.index, v)
                    for v in range(ex.views.views)
                ]
                views = augment.decode_views(data, rngs, ex.views)
        except image_ops.ImageDecodeError:
            return Skipped("undecodable_image", item.source, item.position)
        out["tokens"] = tokens = self.tokenizer.encode_padded(choice.text)
        if ex.views is not None:
            out["views"] = views
        if ex.eda_alpha is not None:
            rng = seeds.example_rng(spec.seed, seeds.STREAM_EDA, item.epoch, item.index)
            out["tokens_eda"] = self.tokenizer.encode_padded(
                text_augment.eda(choice.text, rng, alpha=ex.eda_alpha)
            )
        if ex.mlm is not None:
            rng = seeds.example_rng(spec.seed, seeds.STREAM_MLM, item.epoch, item.index)
            masked, labels = text_augment.mask_tokens(tokens, rng, ex.mlm)
            for key, value in (("tokens_mlm", masked), ("mlm_labels", labels)):
                if key in ex.mlm_keys:
                    out[key] = value
        if self.include_ids:
            out["index"] = np.int64(item.index)
            out["epoch"] = np.int64(item.epoch)
            out["source"] = np.int64(item.source)
        return Example(item.source, item.position, out)


# --- the specs, from the config (in the main process) ----------------------------------------------


def image_spec(config: ml_collections.ConfigDict) -> ImageSpec:
    """The standard crop of config.data at model.vision.image_size."""
    d = config.data
    return ImageSpec(
        image_size=int(config.model.vision.image_size),
        crop_scale=tuple(float(x) for x in d.crop_scale),
        crop_ratio=tuple(float(x) for x in d.crop_ratio),
        decoder=d.decoder,
        resize=d.resize_backend,
    )


def _mask_spec(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer | HFTokenizer
) -> text_augment.MaskSpec:
    """The masking of "tokens_mlm", with model.text.mask_id (-1: tokenizer.vocab_size) checked."""
    text = config.model.text
    mask_id = int(text.mask_id) if text.mask_id >= 0 else tokenizer.vocab_size
    if not 0 <= mask_id < text.vocab_size:
        what = f"{text.mask_id}" if text.mask_id >= 0 else f"-1, i.e. {mask_id}, the id past the tokenizer's"
        raise ValueError(
            f"model.text.mask_id={what} is not below model.text.vocab_size={text.vocab_size}: the masked "
            "captions (tokens_mlm) would index past the text embedding table. Raise model.text.vocab_size "
            "or set model.text.mask_id to an id the tokenizer does not use"
        )
    hf_special = [int(i) for i in getattr(tokenizer, "special_ids", ())]  # CLIP BPE's start and end
    unk = getattr(tokenizer, "unk_id", None)
    if isinstance(tokenizer, HFTokenizer):
        hf_special = [int(i) for i in tokenizer.hf.all_special_ids]
        unk = tokenizer.hf.unk_token_id
    special = text_augment.special_ids(tokenizer.pad_id, tokenizer.eos_id, hf_special)
    not_random = tuple(sorted({*special, mask_id, *([int(unk)] if unk is not None else [])}))
    return text_augment.MaskSpec(
        prob=float(config.data.augment.mlm_prob),
        mask_id=mask_id,
        vocab_size=tokenizer.vocab_size,
        special=special,
        not_random=not_random,
    )


def extra_spec(
    config: ml_collections.ConfigDict, keys: tuple[str, ...], tokenizer: Tokenizer | HFTokenizer
) -> ExtraSpec:
    """What to make of each example for the batch keys `keys` (veclip_jax/batch.py), from config.data.

    config.data.augment is read only for the keys asked for.
    """
    d = config.data
    a = d.get("augment")
    views = None
    if "views" in keys:
        views = augment.ViewSpec(
            size=int(config.model.vision.image_size),
            views=int(a.views),
            crop_scale=tuple(float(x) for x in a.view_crop_scale),
            crop_ratio=tuple(float(x) for x in d.crop_ratio),
            color_jitter=tuple(float(x) for x in a.color_jitter),
            color_jitter_prob=float(a.color_jitter_prob),
            grayscale_prob=float(a.grayscale_prob),
            blur_prob=float(a.blur_prob),
            blur_sigma=tuple(float(x) for x in a.blur_sigma),
            flip_prob=float(a.flip_prob),
            decoder=d.decoder,
            resize=d.resize_backend,
        )
    eda_alpha = None
    if "tokens_eda" in keys:
        text_augment.load_wordnet()  # fails now, naming the package, rather than in a worker
        eda_alpha = float(a.eda_alpha)
    mlm_keys = tuple(k for k in ("tokens_mlm", "mlm_labels") if k in keys)
    return ExtraSpec(
        image="image" in keys,
        views=views,
        eda_alpha=eda_alpha,
        mlm=_mask_spec(config, tokenizer) if mlm_keys else None,
        mlm_keys=mlm_keys,
    )
