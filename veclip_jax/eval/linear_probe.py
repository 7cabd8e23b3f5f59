"""Linear probe on frozen image features: CLIP's protocol with scikit-learn's L-BFGS logistic regression.

Radford et al. (2021), appendix A.3: an L2-regularised (multinomial) logistic
regression on the image features, solved by L-BFGS (max 1,000 iterations);
the regularisation strength is chosen on a validation split held out from
the training split, by a sweep over C = 1/lambda from 1e-6 to 1e6 followed by
a parametric binary search around the best value; then the classifier is
refitted on the whole training split with that C and scored on the test split.
The features are the L2-normalised image embeddings. Metric names are
CLIP_benchmark's: lp_acc1, lp_acc5, lp_mean_per_class_recall.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from veclip_jax.eval.zeroshot import classification_metrics, top_k

log = logging.getLogger(__name__)

C_SWEEP = tuple(10.0**e for e in range(-6, 7, 2))  # the coarse sweep (log10 C = -6, -4, ..., 6)


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=max_iter, solver="lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # strong C on separable data: fine for scoring
        return clf.fit(x, y)


def _scores(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
    """[n, num_classes] decision scores, columns in label order (classes absent from training: -inf)."""
    out = np.full((len(x), num_classes), -np.inf)
    s = clf.decision_function(x)
    if s.ndim == 1:  # two classes: sklearn returns the positive class's margin
        s = np.stack([-s, s], axis=1)
    out[:, clf.classes_] = s
    return out


def split_validation(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows) of the training split: stratified when every class has 2+ examples."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    stratify = y if np.bincount(y).min(initial=2) >= 2 and len(np.unique(y)) > 1 else None
    try:
        return tuple(train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify))
    except ValueError:  # too few examples per class for a stratified split of this size
        return tuple(train_test_split(rows, test_size=fraction, random_state=seed))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    *,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    search_steps: int = 4,
    seed: int = 0,
) -> tuple[dict[str, float], float]:
    """(CLIP_benchmark's lp_* metrics on the test split, the chosen C); see the module doc."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"the linear probe's training split has {len(train_y)} images of one class: a "
                         "classifier needs at least two")  # fmt: skip
    fit_rows, val_rows = split_validation(train_y, val_fraction, seed)
    if len(np.unique(train_y[fit_rows])) < 2:  # the data has classes enough; the hold-out took them
        raise ValueError(
            f"holding out {val_fraction:.0%} of the linear probe's {len(train_y)} training images to "
            f"choose C left one class to fit ({np.bincount(train_y).max()} images in its largest class): "
            "give the probe more training images per class"
        )
    cache: dict[float, float] = {}

    def val_acc(log_c: float) -> float:
        log_c = round(log_c, 6)
        if log_c not in cache:
            clf = _fit(train_x[fit_rows], train_y[fit_rows], 10.0**log_c, max_iter)
            cache[log_c] = float(np.mean(clf.predict(train_x[val_rows]) == train_y[val_rows]))
        return cache[log_c]

    grid = [np.log10(c) for c in C_SWEEP]
    best = max(grid, key=lambda lc: (val_acc(lc), -abs(lc)))  # ties: the value nearest C = 1
    step = (grid[1] - grid[0]) / 2
    for _ in range(search_steps):  # binary search around the best value, halving the step
        best = max((best - step, best, best + step), key=lambda lc: (val_acc(lc), -abs(lc)))
        step /= 2
    c = 10.0**best
    log.info("linear probe: C=%.3g (validation accuracy %.4f, %d fits)", c, cache[round(best, 6)], len(cache))
    clf = _fit(train_x, train_y, c, max_iter)
    metrics = classification_metrics(top_k(_scores(clf, test_x, num_classes), 5), test_y, num_classes)
    return {f"lp_{k}": v for k, v in metrics.items()}, c
