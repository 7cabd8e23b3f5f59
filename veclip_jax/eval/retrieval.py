"""Image <-> text retrieval recall@k, with several captions per image (the COCO / Flickr30k protocol).

As in the CLIP papers and CLIP_benchmark: an image query (text retrieval)
is a hit when *any* of its captions is among the k texts most similar to it;
a text query (image retrieval) when its one image is among the k most similar
images. Names are CLIP_benchmark's: `text_retrieval_recall@k` is image->text
(the papers' I2T), `image_retrieval_recall@k` is text->image (T2I). The
similarity matrix is formed a block of rows at a time (5k x 25k for COCO).
A FILIP run's similarities are token-wise (`tokenwise_retrieval_recall`,
veclip_jax/eval/tokenwise.py); the ranking is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from veclip_jax.eval.tokenwise import TokenScorer

Scores = Callable[[np.ndarray], np.ndarray]  # query indices [q] -> similarities [q, keys]


def _check_owner(owner: np.ndarray, n_images: int, n_texts: int) -> np.ndarray:
    owner = np.asarray(owner)
    if owner.shape != (n_texts,) or owner.min(initial=0) < 0 or owner.max(initial=0) >= n_images:
        raise ValueError("text_to_image must give an image index for every text")
    return owner


def text_ranks(t2i: Scores, owner: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """[n_texts]: how many images score above each text's own image (0 = found first).

    `t2i(texts)` gives those texts' similarities to every image, `chunk` texts at a time.
    """
    ranks = np.empty(len(owner), np.int64)
    for s in range(0, len(owner), chunk):
        idx = np.arange(s, min(s + chunk, len(owner)))
        sim = t2i(idx)
        own = sim[np.arange(len(sim)), owner[idx]]
        ranks[idx] = np.sum(sim > own[:, None], axis=1)
    return ranks


def image_ranks(i2t: Scores, owner: np.ndarray, n_images: int, chunk: int = 1024) -> np.ndarray:
    """[image queries]: how many texts score above each image's best caption. Image queries are the
    images that own a text; `i2t(images)` gives their similarities to every text."""
    queries = np.flatnonzero(np.bincount(owner, minlength=n_images) > 0)
    ranks = np.empty(len(queries), np.int64)
    for s in range(0, len(queries), chunk):
        rows = queries[s : s + chunk]
        sim = i2t(rows)
        best = np.max(np.where(owner[None, :] == rows[:, None], sim, -np.inf), axis=1)
        ranks[s : s + chunk] = np.sum(sim > best[:, None], axis=1)
    return ranks


def recall_at(t2i_ranks: np.ndarray, i2t_ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean(t2i_ranks < k))
        out[f"text_retrieval_recall@{k}"] = float(np.mean(i2t_ranks < k))
    return out


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
    owner = _check_owner(text_to_image, len(img), len(txt))
    t2i = text_ranks(lambda idx: txt[idx] @ img.T, owner, chunk)
    i2t = image_ranks(lambda idx: img[idx] @ txt.T, owner, len(img), chunk)
    return recall_at(t2i, i2t, ks)


def tokenwise_retrieval_recall(
    scorer: TokenScorer,
    image_tokens: np.ndarray,
    text_tokens: np.ndarray,
    text_valid: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """`retrieval_recall` with FILIP's late-interaction similarities (veclip_jax/eval/tokenwise.py).

    image_tokens [n_images, N, D] and text_tokens [n_texts, L, D] are unit
    norm per token; text_valid [n_texts, L] marks each text's tokens. Text ->
    image ranks images by text -> image late interaction (a masked mean over
    the text's tokens), image -> text ranks texts by image -> text late
    interaction (the max over each text's valid tokens). The ranked side is put
    on the mesh once (sharded), the queries go `chunk` at a time.
    """
    img = np.asarray(image_tokens, np.float32)
    txt, valid = np.asarray(text_tokens, np.float32), np.asarray(text_valid, bool)
    owner = _check_owner(text_to_image, len(img), len(txt))
    every = np.ones(img.shape[:2], bool)
    keys = scorer.keys(img, every, query_tokens=txt.shape[1])
    t2i = text_ranks(lambda idx: scorer.scores(txt[idx], valid[idx], keys), owner, chunk)
    keys = scorer.keys(txt, valid, query_tokens=img.shape[1])  # the images' copy is freed
    i2t = image_ranks(lambda idx: scorer.scores(img[idx], every[idx], keys), owner, len(img), chunk)
    return recall_at(t2i, i2t, ks)
