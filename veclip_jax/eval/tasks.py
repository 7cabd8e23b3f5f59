"""The three task types of the registry (veclip_jax/eval/registry.py), each a class with `run(params)`.

A task is built from its entry once (its data's index, class names and
templates are read then, so a missing dataset fails before training starts)
and run with any parameters: the training loop's sharded state or a loaded
model's. Every run embeds the images through `embed_images` (streamed, each
process its slice) and the texts through the same jitted encoders.

  zeroshot_classification -> acc1, acc5, mean_per_class_recall
  retrieval               -> image_retrieval_recall@k (text->image), text_retrieval_recall@k (image->text)
  linear_probe            -> lp_acc1, lp_acc5, lp_mean_per_class_recall (and the chosen C, `lp_C`)

Scoring (`Task.scoring`): zero-shot classification and retrieval follow the
encoders' mode, token-wise late interaction for a FILIP model and pooled
embeddings otherwise (veclip_jax/eval/tokenwise.py); the metric names are the
same either way. The linear probe always fits the pooled image embeddings.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from veclip_jax.data import records
from veclip_jax.data.tokenizer import HFTokenizer, Tokenizer
from veclip_jax.eval import datasets, registry
from veclip_jax.eval.classnames import CLIP_TEMPLATES, load_classnames, load_templates
from veclip_jax.eval.embed import BatchEncoder, Preprocess, Progress, embed_images
from veclip_jax.eval.linear_probe import linear_probe
from veclip_jax.eval.retrieval import retrieval_recall, tokenwise_retrieval_recall
from veclip_jax.eval.tokenwise import TokenScorer, class_token_sets
from veclip_jax.eval.zeroshot import (
    class_embeddings,
    classification_metrics,
    prompts,
    top_k,
    zeroshot_metrics,
)
from veclip_jax.run.inference import POOLED, TOKENWISE, Encoders

log = logging.getLogger(__name__)

# The task name CLIP_benchmark writes in its result files, per type.
BENCHMARK_TASK = {
    "zeroshot_classification": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
}


@dataclasses.dataclass
class EvalContext:
    """What tasks need besides parameters: the model's encoders, tokenizer, preprocessing; where data is."""

    encoders: Encoders
    tokenizer: Tokenizer | HFTokenizer
    preprocess: Preprocess
    data_dir: str = ""  # root of relative dataset paths and TFDS's data_dir (an entry's data_dir wins)
    demo_files: Sequence[str] = ()  # the demo's held-out split, when the model's run trained on demo data
    progress: bool = False  # tqdm bars (process 0)
    # Image embeddings of the current evaluation, by images_key: tasks on the same images (the demo's
    # attributes and its retrieval) embed them once. The Evaluator clears it before and after a run.
    cache: dict = dataclasses.field(default_factory=dict)


class Task:
    """One registry entry, ready to run: `run(params) -> {metric: value}`."""

    def __init__(self, name: str, entry: Mapping[str, Any], ctx: EvalContext):
        registry.check_entry(name, entry)
        self.name, self.ctx = name, ctx
        self.entry = registry.with_defaults(entry)
        self.key = registry.task_key(name)
        self.kind = self.entry["type"]
        self.images_per_sec = float("nan")  # of the last run's embedding

    @property
    def scoring(self) -> str:
        """How this task scores: tokenwise.POOLED or TOKENWISE (the encoders' mode; a probe: pooled)."""
        return self.ctx.encoders.scoring

    @property
    def root(self) -> str:
        return os.path.expanduser(self.entry["data_dir"] or self.ctx.data_dir)

    def path(self, p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) or not self.root else os.path.join(self.root, p)

    def _record_files(self) -> list[str]:
        kind, _, rest = self.entry["dataset"].partition(":")
        if kind == "demo":
            if not self.ctx.demo_files:
                raise datasets.DatasetError(f"{self.name}: dataset 'demo' needs a model trained on demo data")
            return list(self.ctx.demo_files)
        return records.shard_paths([self.path(p) for p in rest.split(",")])

    def classification(self, split: str) -> datasets.ClassificationData:
        """The entry's labelled images of `split`, with the entry's class names applied."""
        e = self.entry
        kind, _, rest = e["dataset"].partition(":")
        wanted = load_classnames(e["classnames"], self.root) if e.get("classnames") else None
        if kind in ("records", "demo"):
            return datasets.records_classification(self._record_files(), e["label_field"], wanted)
        if kind == "tfds":
            data = datasets.tfds_classification(rest, split, self.root)
        else:
            data = datasets.image_folder(self.path(rest), split)
        if wanted is not None:
            if len(wanted) != len(data.classnames):
                raise datasets.DatasetError(
                    f"{self.name}: {len(wanted)} class names ({e['classnames']}) for the "
                    f"{len(data.classnames)} classes of {data.description}"
                )
            data.classnames = wanted
        return data

    def embed(
        self,
        params: Any,
        data: datasets.ClassificationData | datasets.RetrievalData,
        what: str,
        *,
        tokens: bool = False,
        encode: BatchEncoder | None = None,
        out_shape: tuple[int, ...] | None = None,
        out_dtype: Any = np.float32,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, labels) of the data's images (the first max_examples), shared between tasks.

        `tokens`: each image's patch tokens [N, D_tok] instead (token-wise
        scoring), shared likewise. `encode` (with `out_shape`, `out_dtype`):
        any other per-image output of the images (see `embed_images`), not shared.
        """
        n = self.entry["max_examples"]
        source = datasets.head(data.source, n)
        labels = getattr(data, "labels", None)
        key = (data.images_key, len(source), tokens) if data.images_key is not None else None
        if encode is not None:
            key = None
        elif tokens:
            encode, out_shape = self.ctx.encoders.image_token_batch, self.ctx.encoders.token_shape
        if key in self.ctx.cache and (labels is not None or isinstance(data, datasets.RetrievalData)):
            self.images_per_sec = float("nan")
            return self.ctx.cache[key], (labels[: len(source)] if labels is not None else None)
        emb, labels, rate = embed_images(
            self.ctx.encoders, params, source, self.ctx.preprocess,
            desc=f"{self.key} {what}", progress=self.ctx.progress,
            encode=encode, out_shape=out_shape, out_dtype=out_dtype,
        )  # fmt: skip
        self.images_per_sec = rate
        if key is not None:
            self.ctx.cache[key] = emb
        return emb, labels

    def encode_texts(self, params: Any, texts: Sequence[str], what: str) -> np.ndarray:
        bar = Progress(len(texts), f"{self.key} {what}", "text", self.ctx.progress)
        try:
            return self.ctx.encoders.texts(params, self.ctx.tokenizer.encode_batch(texts), bar.update)
        finally:
            bar.close()

    def encode_text_tokens(
        self, params: Any, texts: Sequence[str], what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """The texts' tokens [n, L', D_tok] and validity [n, L'] (token-wise scoring)."""
        bar = Progress(len(texts), f"{self.key} {what}", "text", self.ctx.progress)
        try:
            return self.ctx.encoders.text_tokens(params, self.ctx.tokenizer.encode_batch(texts), bar.update)
        finally:
            bar.close()

    def run(self, params: Any) -> dict[str, float]:
        raise NotImplementedError


class ZeroShotClassification(Task):
    """CLIP's zero-shot classifier: class embeddings from every template, images by cosine similarity.

    Token-wise (FILIP): class token sets from every template, images by
    image -> text late interaction, scored on the devices as they are encoded
    (veclip_jax/eval/tokenwise.py).
    """

    def __init__(self, name: str, entry: Mapping[str, Any], ctx: EvalContext):
        super().__init__(name, entry, ctx)
        self.data = self.classification(self.entry["split"])
        spec = self.entry["templates"] or self.data.templates or CLIP_TEMPLATES
        self.templates = load_templates(spec, self.root)
        self.dataset = self.data.description

    def run(self, params: Any) -> dict[str, float]:
        if self.scoring == TOKENWISE:
            return self.run_tokenwise(params)
        classes = class_embeddings(
            lambda t: self.encode_texts(params, t, "prompts"), self.data.classnames, self.templates
        )
        emb, labels = self.embed(params, self.data, "images")
        return zeroshot_metrics(emb, classes, labels)

    def class_token_sets(self, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """([classes, L, D_tok], [classes, L]): every template's prompt tokens averaged per class."""
        names, templates = self.data.classnames, self.templates
        rows = self.ctx.tokenizer.encode_batch(prompts(names, templates))
        bar = Progress(len(rows), f"{self.key} prompts", "text", self.ctx.progress)
        try:
            batches = self.ctx.encoders.text_token_batches(params, rows, bar.update)
            return class_token_sets(batches, len(names), len(templates))
        finally:
            bar.close()

    def run_tokenwise(self, params: Any) -> dict[str, float]:
        encoders, n_classes = self.ctx.encoders, len(self.data.classnames)
        classes = encoders.put_classes(*self.class_token_sets(params))
        k = min(5, n_classes)

        def top5(p: Any, images: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            logits, out = encoders.zeroshot_batch(p, images, tags, classes)
            return top_k(logits, k), out

        top, labels = self.embed(params, self.data, "images", encode=top5, out_shape=(k,), out_dtype=np.int64)
        return classification_metrics(top, labels, n_classes)


class Retrieval(Task):
    """Image <-> text recall@k over every image and all its captions (token-wise for FILIP)."""

    def __init__(self, name: str, entry: Mapping[str, Any], ctx: EvalContext):
        super().__init__(name, entry, ctx)
        e = self.entry
        kind, _, rest = e["dataset"].partition(":")
        if kind == "karpathy":
            self.data = datasets.karpathy(self.path(rest), self.path(e["images"]), e["split"] or "test")
        else:
            self.data = datasets.records_retrieval(self._record_files(), e["caption_field"])
        self.dataset = self.data.description

    def run(self, params: Any) -> dict[str, float]:
        n = len(datasets.head(self.data.source, self.entry["max_examples"]))
        caps = self.data.captions[:n]
        texts = [c for cs in caps for c in cs]
        owner = np.repeat(np.arange(n), [len(cs) for cs in caps])
        ks = tuple(self.entry["recall_at"])
        if self.scoring == TOKENWISE:
            text_tok, valid = self.encode_text_tokens(params, texts, "captions")
            image_tok, _ = self.embed(params, self.data, "images", tokens=True)
            scorer = TokenScorer(self.ctx.encoders.mesh)
            return tokenwise_retrieval_recall(scorer, image_tok, text_tok, valid, owner, ks)
        text_emb = self.encode_texts(params, texts, "captions")
        image_emb, _ = self.embed(params, self.data, "images")
        return retrieval_recall(image_emb, text_emb, owner, ks)


class LinearProbe(Task):
    """Logistic regression on frozen image features (veclip_jax/eval/linear_probe.py): the pooled,
    L2-normalised embeddings, whatever the model's objective (a FILIP model's too)."""

    @property
    def scoring(self) -> str:
        return POOLED

    def __init__(self, name: str, entry: Mapping[str, Any], ctx: EvalContext):
        super().__init__(name, entry, ctx)
        e = self.entry
        self.train = self.classification(e["train_split"])
        self.test = self.classification(e["split"] or "test")
        if len(self.train.classnames) != len(self.test.classnames):
            raise datasets.DatasetError(
                f"{name}: the train split has {len(self.train.classnames)} classes, "
                f"the test split {len(self.test.classnames)}"
            )
        self.dataset = f"{self.test.description}; fitted on {self.train.description}"

    def run(self, params: Any) -> dict[str, float]:
        train_x, train_y = self.embed(params, self.train, "train images")
        rate = self.images_per_sec
        test_x, test_y = self.embed(params, self.test, "test images")
        if self.images_per_sec != self.images_per_sec:  # the test images were another task's (cached)
            self.images_per_sec = rate
        e = self.entry
        metrics, c = linear_probe(
            train_x, train_y, test_x, test_y, len(self.test.classnames),
            val_fraction=e["val_fraction"], max_iter=e["max_iter"],
        )  # fmt: skip
        return metrics | {"lp_C": float(c)}


# The class of each type name of registry.TASK_TYPES (the one list of type names: the config check
# reads it there, without importing JAX; tests/test_eval_by_hand.py checks that the two agree).
TASK_CLASSES: dict[str, type[Task]] = {
    "zeroshot_classification": ZeroShotClassification,
    "retrieval": Retrieval,
    "linear_probe": LinearProbe,
}


def build_task(name: str, entry: Mapping[str, Any], ctx: EvalContext) -> Task:
    """The task of a registry entry (its data's index read now)."""
    registry.check_entry(name, entry)
    return TASK_CLASSES[entry["type"]](name, entry, ctx)
