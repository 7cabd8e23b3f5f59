"""Zero-shot classification: class embeddings from prompt templates; top-k and per-class metrics.

CLIP's recipe (Radford et al. 2021, and open_clip's `build_zero_shot_classifier`):
each class name is written into every template, the prompts are embedded and
L2-normalised, their mean is the class embedding (normalised again), and an
image is assigned the class of highest cosine similarity. The metrics are
CLIP_benchmark's: acc1, acc5 and mean_per_class_recall (balanced accuracy).
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


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, min(k, c)] column indices of the k highest scores per row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def classification_metrics(top: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall from each example's top classes ([n, >=1], best first).

    mean_per_class_recall is the top-1 recall averaged over the classes that
    occur in `labels` (sklearn's balanced_accuracy_score, as CLIP_benchmark).
    """
    labels = np.asarray(labels)
    hit1 = top[:, 0] == labels
    hit5 = np.any(top[:, :5] == labels[:, None], axis=1)
    out = {"acc1": float(np.mean(hit1)), "acc5": float(np.mean(hit5))}
    counts = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels, weights=hit1, minlength=num_classes)
    present = counts > 0
    out["mean_per_class_recall"] = float(np.mean(correct[present] / counts[present]))
    return out


def zeroshot_metrics(
    image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray, chunk: int = 4096
) -> dict[str, float]:
    """CLIP_benchmark's zero-shot metrics; the [n, classes] scores are formed `chunk` rows at a time."""
    cls = np.asarray(class_embeds, np.float32)
    img = np.asarray(image_embeds, np.float32)
    top = np.concatenate(
        [top_k(img[i : i + chunk] @ cls.T, 5) for i in range(0, len(img), chunk)]
        or [np.zeros((0, min(5, len(cls))), np.int64)]
    )
    return classification_metrics(top, labels, len(cls))
