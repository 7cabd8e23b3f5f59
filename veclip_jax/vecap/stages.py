"""The model stages of a caption run, as Ray actors: each loads its model once and then takes
mini-batches (one Ray Data row each, made by shards.read_batches).

CaptionStage   the vision-language model writes each image's visual caption
TextStage      rule checks on the visual caption, the LLM check, then the fusion with the AltText
               (or the visual caption alone when the AltText is empty, a URL or noise), and the
               rule checks again on the VeCap caption

A dropped caption gets its reason (DROP_REASONS); the image keeps its AltText in training.
"""

from __future__ import annotations

import json
from typing import Any

from veclip_jax.data import captions
from veclip_jax.vecap import checks, prompts
from veclip_jax.vecap.options import CaptionOptions, Resources

# Why a caption is dropped (no VeCap caption for the image), in the order they are checked.
DROP_REASONS = (
    "visual_empty",
    "visual_repetitive",
    "visual_too_long",
    "unsafe",
    "vecap_empty",
    "vecap_repetitive",
    "vecap_too_long",
)


def _plain(row: Any) -> dict[str, Any]:
    """A Ray Data row as a dict of Python values (list columns may come as numpy arrays)."""
    return {
        k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, bytes | str) else v)
        for k, v in dict(row).items()
    }


class CaptionStage:
    """Ray actor: the vision-language model writes each image's visual caption."""

    def __init__(self, options: CaptionOptions, resources: Resources, progress: Any = None):
        from veclip_jax.vecap.generate import Captioner, generation_settings

        self.model = Captioner(
            options.captioner,
            options.caption_prompt,
            max_new_tokens=options.max_new_tokens,
            num_gpus=resources.num_gpus,
            num_cpus=resources.cpus,
            backend=options.backend,
        )
        self.progress = progress
        # The backend and library versions, for the provenance rows.
        self.engine = json.dumps(generation_settings(self.model.backend), sort_keys=True)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        from veclip_jax.vecap.generate import decode_image

        row = _plain(row)
        images = [decode_image(b) for b in row.pop("images")]
        good = [i for i, im in enumerate(images) if im is not None]
        out = self.model([images[i] for i in good])
        visual: list[str | None] = [None] * len(images)
        tokens = [0] * len(images)
        for i, text, n in zip(good, out.texts, out.tokens, strict=True):
            visual[i], tokens[i] = text, n
        if self.progress is not None:
            self.progress.add.remote("caption", len(images), sum(tokens))
        return row | {"visual_raw": visual, "visual_tokens": tokens, "engine": self.engine}


class TextStage:
    """Ray actor: rule checks, the LLM check, then the fusion with the AltText (one model load each)."""

    def __init__(self, options: CaptionOptions, resources: Resources, progress: Any = None):
        from veclip_jax.vecap.generate import TextModel

        kw = dict(num_gpus=resources.num_gpus, num_cpus=resources.cpus, backend=options.backend)
        self.options = options
        self.fuser = TextModel(options.fuser, max_new_tokens=options.fusion_tokens, **kw)
        checker = options.checker_dir
        if checker is None:
            self.checker = None
        elif checker == options.fuser:
            self.checker = self.fuser  # one model, loaded once, does both
        else:
            self.checker = TextModel(checker, max_new_tokens=1, what="--checker", **kw)
        self.progress = progress

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        row = _plain(row)
        o = self.options
        n = len(row["keys"])
        visual = [checks.clean_output(v) if v is not None else None for v in row["visual_raw"]]
        drop: list[str | None] = [None] * n
        for i, v in enumerate(visual):
            if v is None:
                drop[i] = "undecodable_image"
            elif problem := checks.output_problem(v, max_words=o.max_words):
                drop[i] = f"visual_{problem}"
        safe: list[bool | None] = [None] * n
        if self.checker is not None:
            todo = [i for i in range(n) if drop[i] is None]
            answers = self.checker.answers_yes(
                [prompts.fill(o.check_prompt, caption=visual[i]) for i in todo]
            )
            for i, ok in zip(todo, answers, strict=True):
                safe[i] = ok
                if not ok:
                    drop[i] = "unsafe"
        alt_class = [checks.classify_alt_text(a) for a in row["alts"]]
        vecap: list[str | None] = [None] * n
        tokens = [0] * n
        fuse = [i for i in range(n) if drop[i] is None and alt_class[i] == "text"]
        for i in range(n):
            if drop[i] is None and alt_class[i] != "text":
                vecap[i] = visual[i]  # nothing in the AltText to keep: the visual caption is the VeCap
        out = self.fuser.complete(
            [
                prompts.fill(
                    o.fusion_prompt, alt_text=captions.clean_caption(row["alts"][i]), caption=visual[i]
                )
                for i in fuse
            ]
        )
        for i, text, t in zip(fuse, out.texts, out.tokens, strict=True):
            text, tokens[i] = checks.clean_output(text), t
            if problem := checks.output_problem(text, max_words=o.max_words):
                drop[i] = f"vecap_{problem}"
            else:
                vecap[i] = text
        if self.progress is not None:
            self.progress.add.remote("fuse", n, sum(tokens))
        return {k: v for k, v in row.items() if k != "visual_raw"} | {
            "visual": visual,
            "safe": safe,
            "alt_class": alt_class,
            "vecap": vecap,
            "drop": drop,
            "vecap_tokens": tokens,
        }
