"""Real images end to end: scikit-learn's 8x8 handwritten digits, written as captioned training
records and as an ImageFolder tree, a tiny CLIP trained on them on the CPU, then zero-shot and a
linear probe on held-out digits through the evaluation registry (the README's digits numbers)."""

from __future__ import annotations

import io
import os
import time

import jax
import numpy as np
import pytest
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the digit {}.", "the number {}.", "a handwritten {}.")
IMAGE_SIZE = 16  # the 8x8 digits scaled up twice; 4 px patches
STEPS = 60


def _digit_image(pixels: np.ndarray) -> Image.Image:
    grey = (pixels * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255, white strokes on black
    rgb = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    return rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)


def write_digits(root: str) -> tuple[list[str], str]:
    """(training shards, tokenizer) of captioned records of the training digits, and the ImageFolder
    tree root/{train,test}/<digit>/ with classnames.txt and templates.txt; a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from veclip_jax.data import records
    from veclip_jax.data.tokenizer import train_tokenizer

    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=0.25, random_state=0,
                                   stratify=digits.target)  # fmt: skip
    rng = np.random.default_rng(0)
    recs, texts = [], []
    for split, rows in (("train", train), ("test", test)):
        for i in rows:
            label = int(digits.target[i])
            image = _digit_image(digits.images[i])
            path = os.path.join(root, "digits", split, str(label))
            os.makedirs(path, exist_ok=True)
            image.save(os.path.join(path, f"{i}.png"))
            if split == "train":
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=95)
                alt, vecap = (t.format(WORDS[label]) for t in rng.choice(TEMPLATES, size=2, replace=False))
                recs.append(records.Record(key=str(i), jpeg=buf.getvalue(), alt_text=alt, vecap_text=vecap))
                texts += [alt, vecap]
    with open(os.path.join(root, "digits", "classnames.txt"), "w") as f:
        f.write("\n".join(WORDS) + "\n")
    with open(os.path.join(root, "digits", "templates.txt"), "w") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    shards = records.write_shards(recs, os.path.join(root, "records", "digits"), 2)
    tokenizer = train_tokenizer(texts, os.path.join(root, "spiece.model"), vocab_size=64)
    return shards, tokenizer


def digits_config(shards: list[str], tokenizer: str, folder: str, steps: int = STEPS):
    """configs/tiny.py's towers on 16 px digits: batch 64, `steps` steps, evaluated once at the end."""
    from veclip_jax import defaults

    c = defaults.get_config("tiny")
    c.model.vision.update(image_size=IMAGE_SIZE, patch_size=4)
    c.update(batch_size=64, total_steps=steps, log_every=100, eval_every=steps, checkpoint_every=0)
    c.optim.update(learning_rate=2e-3, warmup_steps=20)
    c.data.update(train_files=",".join(shards), tokenizer=tokenizer, num_threads=2, crop_scale=(0.8, 1.0))
    c.evals = dict(digits=dict(type="zeroshot_classification", dataset=f"folder:{folder}"))  # its test/ split
    return c


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    from veclip_jax.train import loop

    root = str(tmp_path_factory.mktemp("digits"))
    shards, tokenizer = write_digits(root)
    folder = os.path.join(root, "digits")
    t0 = time.perf_counter()
    result = loop.train(digits_config(shards, tokenizer, folder), os.path.join(root, "run"),
                        devices=jax.devices()[:1])  # fmt: skip
    print(f"digits: {STEPS} steps in {time.perf_counter() - t0:.0f} s, zero-shot in training {result.eval}")
    return os.path.join(root, "run"), folder, result


def test_digits_zero_shot_far_above_chance_and_linear_probe_above_it(trained_digits):
    from veclip_jax.eval.run import evaluate

    workdir, folder, result = trained_digits
    out = evaluate(workdir, [f"folder:{folder}", f"linear_probe:folder:{folder}"], progress=False)
    zs = out.results["folder_digits"]
    lp = out.results["linear_probe_folder_digits"]
    print(f"digits zero-shot {zs}\ndigits linear probe {lp}\n{out.table}")
    assert zs["acc1"] == pytest.approx(result.eval["digits/acc1"])  # the in-training evaluation, again
    assert zs["acc1"] > 0.5  # chance: 0.1
    assert lp["lp_acc1"] > zs["acc1"] + 0.05  # measured: 80.7 % zero-shot, 92.9 % linear probe
    assert lp["lp_mean_per_class_recall"] > 0.8
