"""Image <-> text retrieval recall@k, with one or several captions per image.

The COCO / Flickr30k protocol (and axlearn's CLIPRetrievalMetricCalculator):
image->text counts a hit when *any* of the image's captions is among the k
texts most similar to it; text->image when its one image is among the k
images most similar to the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _rank_of_best(sim: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the 0-based rank of its best-scoring target column (ties count against it)."""
    best = np.max(np.where(targets, sim, -np.inf), axis=1)
    return np.sum(sim > best[:, None], axis=1)


def retrieval_recall(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """{"i2t_R@k": ..., "t2i_R@k": ...} as fractions in [0, 1].

    Args:
      image_embeds: [n_images, d], text_embeds: [n_texts, d], L2-normalised.
      text_to_image: [n_texts] int, the image each text describes.
    """
    img = np.asarray(image_embeds, np.float64)
    txt = np.asarray(text_embeds, np.float64)
    owner = np.asarray(text_to_image)
    if owner.shape != (len(txt),) or owner.min(initial=0) < 0 or owner.max(initial=0) >= len(img):
        raise ValueError("text_to_image must give an image index for every text")
    sim = img @ txt.T  # [n_images, n_texts]
    i2t_rank = _rank_of_best(sim, owner[None, :] == np.arange(len(img))[:, None])
    has_text = np.bincount(owner, minlength=len(img)) > 0
    t2i_rank = _rank_of_best(sim.T, np.arange(len(img))[None, :] == owner[:, None])
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(i2t_rank[has_text] < k))
        out[f"t2i_R@{k}"] = float(np.mean(t2i_rank < k))
    return out
