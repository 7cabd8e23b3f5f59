"""Image <-> text retrieval recall@k, with several captions per image (the COCO / Flickr30k protocol).

As in the CLIP papers and CLIP_benchmark: an image query (text retrieval)
is a hit when *any* of its captions is among the k texts most similar to it;
a text query (image retrieval) when its one image is among the k most similar
images. Names are CLIP_benchmark's: `text_retrieval_recall@k` is image->text
(the papers' I2T), `image_retrieval_recall@k` is text->image (T2I). The
similarity matrix is formed a block of rows at a time (5k x 25k for COCO).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def retrieval_recall(
    image_embeds: np.ndarray,
    text_embeds: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """{"image_retrieval_recall@k", "text_retrieval_recall@k"} as fractions in [0, 1].

    Args:
      image_embeds: [n_images, d], text_embeds: [n_texts, d], L2-normalised.
      text_to_image: [n_texts] int, the image each text describes. Images
        without a text are retrieval targets only (not image queries).
    """
    img = np.asarray(image_embeds, np.float32)
    txt = np.asarray(text_embeds, np.float32)
    owner = np.asarray(text_to_image)
    if owner.shape != (len(txt),) or owner.min(initial=0) < 0 or owner.max(initial=0) >= len(img):
        raise ValueError("text_to_image must give an image index for every text")
    # text -> image: the score of the text's own image, against all images
    t2i = np.empty(len(txt), np.int64)
    for s in range(0, len(txt), chunk):
        sim = txt[s : s + chunk] @ img.T
        own = sim[np.arange(len(sim)), owner[s : s + chunk]]
        t2i[s : s + chunk] = np.sum(sim > own[:, None], axis=1)
    # image -> text: the best score among the image's own captions, against all texts
    queries = np.flatnonzero(np.bincount(owner, minlength=len(img)) > 0)
    i2t = np.empty(len(queries), np.int64)
    for s in range(0, len(queries), chunk):
        rows = queries[s : s + chunk]
        sim = img[rows] @ txt.T
        best = np.max(np.where(owner[None, :] == rows[:, None], sim, -np.inf), axis=1)
        i2t[s : s + chunk] = np.sum(sim > best[:, None], axis=1)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(t2i < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(i2t < k))
    return out
