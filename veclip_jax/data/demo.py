"""Embedded demo data: coloured shapes with web-like AltTexts and full VeCap descriptions.

Generated in a few seconds into the same ArrayRecord format as real data, so
`python launch/train.py` runs end to end with nothing downloaded, and the two
captions behave like VeCLIP's: the AltText is short, partial, noisy and
sometimes unrelated or missing; the VeCap caption describes everything
visible. A CLIP trained on AltText alone (vecap_prob=0) should therefore
learn less than one on the mix (0.5), as in the paper.

The generator's rules (also in veclip_jax/data/README.md):

* Image: `image_size` square (64 px by default), a solid background from
  BACKGROUNDS with brightness jitter and light pixel noise, JPEG quality 90.
* Objects: 1 to 3 per training image (probabilities 0.5 / 0.3 / 0.2), exactly
  1 per evaluation image. Each has a colour (COLORS, RGB jitter ±12), a shape
  (SHAPES), a size (SIZES: ~16 / 24 / 34 % of the image side) and a position
  (POSITIONS: a 3x3 grid cell, centre jittered, kept inside the image).
  Objects of one image occupy distinct cells and distinct (colour, shape)
  pairs; larger ones are drawn first. Drawn at 2x and box-filtered (antialiased).
* VeCap: every object with size, colour, shape and position, largest first,
  and the background, in one of a few sentence templates. Missing for 3 % of
  training records that have an AltText (exercising the fallback; no demo
  record lacks both captions).
* AltText, one of (probability):
    partial 0.40   one object only, with some of its attributes, web-styled
                   ("Red Circle PNG", "triangle clipart", "blue icon")
    keywords 0.15  a shuffled soup of some true words and filler
                   ("geometric shapes blue abstract design")
    wrong 0.10     like partial, with the colour or the shape wrong
    unrelated 0.25 a file name or boilerplate ("IMG_4821.jpg", "click to enlarge")
    missing 0.10   no AltText (None)
  5 % of AltTexts also get web noise the loader must clean: an HTML entity,
  a tab or newline, doubled spaces.
* Evaluation split: a different random stream, one object per image, both
  captions, and labels {color, shape, size, position, background} for
  zero-shot checks (ATTRIBUTES holds the vocabularies, TEMPLATES prompts).
* Everything is a function of (seed, split, record index): deterministic.
* Tokenizer: sentencepiece (T5 ids: pad 0, eos 1, unk 2, no bos) trained on
  both captions of the training split, at most `vocab_size` (1000) pieces.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from veclip_jax.data import records, seeds, tokenizer

GENERATOR_VERSION = 1  # bump when the rules change: the cache directory name includes it

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Half-extent of an object as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.12, "large": 0.17}
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (110, 80, 55),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# Zero-shot prompts over the eval labels (format with the label names).
TEMPLATES = (
    "a {color} {shape}.",
    "an image of a {color} {shape}.",
    "a {color} {shape} on a {background} background.",
)

_POSITION_PHRASE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_VECAP_TEMPLATES = (
    "A {bg} background with {objs}.",
    "An image of {objs}, on a {bg} background.",
    "{Objs}, shown against a plain {bg} background.",
    "A picture showing {objs} on a {bg} background.",
)
_WEB_SUFFIX = ("png", "clipart", "vector", "icon", "free download", "stock image", "hd wallpaper", "logo")
_WEB_PREFIX = ("", "", "", "cute", "simple", "flat", "3d", "best")
_FILLER = ("geometric", "abstract", "design", "background", "pattern", "shapes", "graphic", "art", "modern")
_UNRELATED = (
    "IMG_{n}.jpg", "DSC0{n}.JPG", "image ({k})", "photo", "click here to enlarge", "product image {k}",
    "banner", "untitled-{k}", "thumbnail", "Home page", "Sale {k}0% off", "screenshot_{n}", "placeholder",
    "Copyright {n} all rights reserved", "logo-final-v{k}", "our team",
    "{adj} {noun} {noun2}", "{adj} {noun} for {noun2}", "{noun} {noun2} ideas", "how to choose a {noun}",
    "{k} best {noun} of {year}", "{adj} {noun} - {noun2} shop", "{noun}_{noun2}_{n}",
)  # fmt: skip
# Web vocabulary of unrelated AltTexts (as in real alt-texts: products, places, boilerplate).
_WEB_ADJ = (
    "new", "modern", "vintage", "luxury", "cheap", "handmade", "wooden", "organic", "summer", "winter",
    "classic", "portable", "wireless", "digital", "premium", "custom", "rustic", "elegant", "outdoor",
    "indoor", "professional", "healthy", "easy", "quick", "beautiful", "amazing", "official", "original",
)  # fmt: skip
_WEB_NOUN = (
    "kitchen", "garden", "bedroom", "wedding", "recipe", "dress", "shoes", "laptop", "phone", "camera",
    "holiday", "beach", "mountain", "city", "hotel", "restaurant", "coffee", "chocolate", "furniture",
    "sofa", "table", "lamp", "jacket", "watch", "bicycle", "guitar", "concert", "festival", "birthday",
    "cake", "flowers", "puppy", "kitten", "house", "apartment", "office", "conference", "workshop",
    "tutorial", "review", "download", "software", "insurance", "mortgage", "travel", "vacation",
    "jewelry", "necklace", "backpack", "sneakers", "headphones", "speaker", "keyboard", "printer",
    "magazine", "newsletter", "podcast", "webinar", "fitness", "yoga", "marathon", "football",
    "basketball", "tennis", "airport", "station", "museum", "library", "university", "school",
)  # fmt: skip
_SPLIT_TRAIN, _SPLIT_EVAL = 0, 1


@dataclasses.dataclass(frozen=True)
class DemoObject:
    """One drawn shape; every field is a label from ATTRIBUTES."""

    color: str
    shape: str
    size: str
    position: str


@dataclasses.dataclass(frozen=True)
class DemoData:
    """Where the demo data lives and what its labels can be."""

    root: str
    train_files: list[str]
    eval_file: str
    tokenizer: str
    attributes: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]
    num_train: int
    num_eval: int
    image_size: int


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r  # about the circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)], fill=fill
        )
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    elif shape == "cross":
        a = 0.32 * r
        draw.rectangle((cx - r, cy - a, cx + r, cy + a), fill=fill)
        draw.rectangle((cx - a, cy - r, cx + a, cy + r), fill=fill)
    else:
        raise ValueError(shape)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render(
    objects: Sequence[DemoObject], background: str, image_size: int, rng: np.random.Generator
) -> bytes:
    """Draws the objects on the background; returns JPEG bytes."""
    s2 = 2 * image_size  # drawn at 2x, then box-filtered: cheap antialiasing
    bg = BACKGROUNDS[background]
    shift = int(rng.integers(-10, 11))
    img = Image.new("RGB", (s2, s2), tuple(int(np.clip(c + shift, 0, 255)) for c in bg))
    draw = ImageDraw.Draw(img)
    for obj in sorted(objects, key=lambda o: -SIZES[o.size]):
        r = SIZES[obj.size] * s2 * rng.uniform(0.9, 1.1)
        cell = POSITIONS.index(obj.position)
        row, col = divmod(cell, 3)
        cx = ((col + 0.5) / 3 + rng.uniform(-1, 1) / 12) * s2
        cy = ((row + 0.5) / 3 + rng.uniform(-1, 1) / 12) * s2
        cx, cy = float(np.clip(cx, r, s2 - r)), float(np.clip(cy, r, s2 - r))
        _draw_shape(draw, obj.shape, cx, cy, r, _jitter(COLORS[obj.color], rng, 12))
    arr = np.asarray(img.reduce(2), np.int16)
    arr = np.clip(arr + rng.normal(0, 4, arr.shape).astype(np.int16), 0, 255).astype(np.uint8)
    out = Image.fromarray(arr)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sample_scene(rng: np.random.Generator, num_objects: int) -> tuple[list[DemoObject], str]:
    """Objects in distinct cells with distinct (colour, shape), and a background."""
    cells = rng.permutation(len(POSITIONS))[:num_objects]
    pairs = rng.permutation(len(COLORS) * len(SHAPES))[:num_objects]
    color_names = list(COLORS)
    objects = [
        DemoObject(
            color=color_names[int(p) // len(SHAPES)],
            shape=SHAPES[int(p) % len(SHAPES)],
            size=list(SIZES)[int(rng.integers(len(SIZES)))],
            position=POSITIONS[int(c)],
        )
        for c, p in zip(cells, pairs, strict=True)
    ]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return objects, background


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def vecap_caption(objects: Sequence[DemoObject], background: str, rng: np.random.Generator) -> str:
    """The full visual description: every object, largest first, and the background."""
    ordered = sorted(objects, key=lambda o: -SIZES[o.size])
    parts = [_article(f"{o.size} {o.color} {o.shape}") + " " + _POSITION_PHRASE[o.position] for o in ordered]
    objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = _VECAP_TEMPLATES[int(rng.integers(len(_VECAP_TEMPLATES)))]
    return template.format(bg=background, objs=objs, Objs=objs[0].upper() + objs[1:])


def _web_case(text: str, rng: np.random.Generator) -> str:
    u = rng.random()
    return text.title() if u < 0.25 else text.upper() if u < 0.32 else text


def _web_styled(words: str, rng: np.random.Generator) -> str:
    prefix = _WEB_PREFIX[int(rng.integers(len(_WEB_PREFIX)))]
    suffix = _WEB_SUFFIX[int(rng.integers(len(_WEB_SUFFIX)))] if rng.random() < 0.6 else ""
    return _web_case(" ".join(w for w in (prefix, words, suffix) if w), rng)


def _partial(obj: DemoObject, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < 0.5:
        words = f"{obj.color} {obj.shape}"
    elif u < 0.75:
        words = obj.shape
    else:
        words = f"{obj.color} {('shape', 'icon', 'sign', 'button')[int(rng.integers(4))]}"
    return _web_styled(words, rng)


def alt_text(objects: Sequence[DemoObject], background: str, rng: np.random.Generator) -> str | None:
    """A web-like AltText: partial, noisy, sometimes wrong, unrelated or missing."""
    u = rng.random()
    obj = objects[int(rng.integers(len(objects)))]
    if u < 0.40:
        text = _partial(obj, rng)
    elif u < 0.55:
        true_words = [obj.color, obj.shape, background] + [o.shape for o in objects]
        k = int(rng.integers(1, 3))
        words = list(rng.choice(true_words, size=k, replace=False)) + list(
            rng.choice(_FILLER, size=int(rng.integers(2, 5)), replace=False)
        )
        text = " ".join(str(w) for w in rng.permutation(words))
    elif u < 0.65:
        if rng.random() < 0.5:
            color = [c for c in COLORS if c != obj.color][int(rng.integers(len(COLORS) - 1))]
            obj = dataclasses.replace(obj, color=color)
        else:
            shape = [s for s in SHAPES if s != obj.shape][int(rng.integers(len(SHAPES) - 1))]
            obj = dataclasses.replace(obj, shape=shape)
        text = _partial(obj, rng)
    elif u < 0.90:
        template = _UNRELATED[int(rng.integers(len(_UNRELATED)))]
        text = template.format(
            n=int(rng.integers(1000, 10000)),
            k=int(rng.integers(1, 10)),
            year=int(rng.integers(2005, 2025)),
            adj=_WEB_ADJ[int(rng.integers(len(_WEB_ADJ)))],
            noun=_WEB_NOUN[int(rng.integers(len(_WEB_NOUN)))],
            noun2=_WEB_NOUN[int(rng.integers(len(_WEB_NOUN)))],
        )
    else:
        return None
    if rng.random() < 0.05:  # markup and whitespace that clean_caption must undo
        noise = ("{} &amp; more", "\t{}\n", "{}  ", " {}&nbsp;")[int(rng.integers(4))]
        text = noise.format(text)
    return text


def make_record(split: int, index: int, image_size: int, seed: int) -> records.Record:
    """Record `index` of a split; a pure function of its arguments."""
    rng = seeds.example_rng(seed, seeds.STREAM_DEMO, split, index)
    if split == _SPLIT_EVAL:
        n_obj = 1
    else:
        n_obj = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    objects, background = sample_scene(rng, n_obj)
    jpeg = render(objects, background, image_size, rng)
    vecap = vecap_caption(objects, background, rng)
    alt = alt_text(objects, background, rng)
    labels = None
    if split == _SPLIT_TRAIN:
        # Never both missing: the demo data should train without skipped records.
        if rng.random() < 0.03 and alt is not None:
            vecap = None
    else:
        o = objects[0]
        labels = {
            "color": o.color,
            "shape": o.shape,
            "size": o.size,
            "position": o.position,
            "background": background,
        }
    name = "train" if split == _SPLIT_TRAIN else "eval"
    return records.Record(
        key=f"demo-{name}-{index:06d}",
        jpeg=jpeg,
        alt_text=alt,
        vecap_text=vecap,
        source="demo",
        labels=labels,
    )


def _records(split: int, count: int, image_size: int, seed: int) -> Iterator[records.Record]:
    for i in range(count):
        yield make_record(split, i, image_size, seed)


def generate(
    out_dir: str,
    *,
    num_train: int = 4096,
    num_eval: int = 512,
    image_size: int = 64,
    num_shards: int = 4,
    seed: int = 0,
    vocab_size: int = 1000,
) -> DemoData:
    """Writes the demo shards and tokenizer into `out_dir` (which must not exist yet)."""
    os.makedirs(out_dir)
    train_files = records.write_shards(
        _records(_SPLIT_TRAIN, num_train, image_size, seed), os.path.join(out_dir, "train"), num_shards
    )
    (eval_file,) = records.write_shards(
        _records(_SPLIT_EVAL, num_eval, image_size, seed), os.path.join(out_dir, "eval"), 1
    )
    spm_path = tokenizer.train_tokenizer(
        tokenizer.shard_captions(train_files),
        os.path.join(out_dir, "spiece.model"),
        vocab_size=vocab_size,
        character_coverage=1.0,
        num_threads=1,  # multi-threaded EM sums in a varying order: not reproducible
    )
    data = DemoData(
        root=out_dir,
        train_files=train_files,
        eval_file=eval_file,
        tokenizer=spm_path,
        attributes=dict(ATTRIBUTES),
        templates=TEMPLATES,
        num_train=num_train,
        num_eval=num_eval,
        image_size=image_size,
    )
    return data


_MANIFEST = "manifest.json"


def _manifest(data: DemoData) -> dict:
    rel = lambda p: os.path.relpath(p, data.root)
    return {
        "generator_version": GENERATOR_VERSION,
        "train_files": [rel(p) for p in data.train_files],
        "eval_file": rel(data.eval_file),
        "tokenizer": rel(data.tokenizer),
        "num_train": data.num_train,
        "num_eval": data.num_eval,
        "image_size": data.image_size,
    }


def _load(root: str) -> DemoData:
    with open(os.path.join(root, _MANIFEST)) as f:
        m = json.load(f)
    return DemoData(
        root=root,
        train_files=[os.path.join(root, p) for p in m["train_files"]],
        eval_file=os.path.join(root, m["eval_file"]),
        tokenizer=os.path.join(root, m["tokenizer"]),
        attributes=dict(ATTRIBUTES),
        templates=TEMPLATES,
        num_train=m["num_train"],
        num_eval=m["num_eval"],
        image_size=m["image_size"],
    )


def ensure_demo_data(
    cache_dir: str,
    *,
    num_train: int = 4096,
    num_eval: int = 512,
    image_size: int = 64,
    num_shards: int = 4,
    seed: int = 0,
    vocab_size: int = 1000,
) -> DemoData:
    """The demo data under `cache_dir`, generated on first use (a few seconds) and reused after.

    The directory name encodes the generator version and every argument, so
    different settings never collide. Generation happens in a temporary
    directory renamed into place, so concurrent callers (several hosts or test
    workers sharing a cache) never see a half-written set.
    """
    cache_dir = os.path.expanduser(cache_dir)
    settings = f"{image_size}px-{num_train}-{num_eval}-{num_shards}sh-{vocab_size}v-seed{seed}"
    name = f"demo-v{GENERATOR_VERSION}-{settings}"
    root = os.path.join(cache_dir, name)
    if os.path.exists(os.path.join(root, _MANIFEST)):
        return _load(root)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir)
    try:
        data = generate(
            os.path.join(tmp, "d"),
            num_train=num_train,
            num_eval=num_eval,
            image_size=image_size,
            num_shards=num_shards,
            seed=seed,
            vocab_size=vocab_size,
        )
        with open(os.path.join(data.root, _MANIFEST), "w") as f:
            json.dump(_manifest(data), f, indent=1)
        try:
            os.rename(data.root, root)
        except OSError:
            if not os.path.exists(os.path.join(root, _MANIFEST)):
                raise  # not a lost race: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(root)
