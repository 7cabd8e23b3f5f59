"""Zero-shot classification: class embeddings from prompt templates, top-k accuracy.

CLIP's recipe (Radford et al. 2021, and open_clip's `build_zero_shot_classifier`):
each class name is written into every template, the prompts are embedded and
L2-normalised, their mean is the class embedding (normalised again), and an
image is assigned the class of highest cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

TextEncoder = Callable[[Sequence[str]], np.ndarray]  # texts -> [n, d] L2-normalised


def prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class in every template, class-major: [c0t0, c0t1, ..., c1t0, ...]."""
    return [t.format(c) for c in classnames for t in templates]


def class_embeddings(
    encode_text: TextEncoder, classnames: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """[num_classes, d]: each class's prompt embeddings averaged, then L2-normalised."""
    if not classnames or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    emb = np.asarray(encode_text(prompts(classnames, templates)), np.float64)
    emb = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def topk_accuracy(
    image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray, k: int = 1
) -> float:
    """Fraction of images whose true class (index into class_embeds) is among the k most similar."""
    logits = np.asarray(image_embeds, np.float64) @ np.asarray(class_embeds, np.float64).T
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))
