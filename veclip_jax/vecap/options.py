"""What a caption run is asked to do: the models, prompts and decoding (`CaptionOptions`, which
shape every caption and so every shard's fingerprint) and how the work is spread (`Resources`,
which do not)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from veclip_jax.errors import UserError
from veclip_jax.vecap import prompts

# Part of every shard's fingerprint: bump when a change to the pipeline changes the captions a shard holds.
PIPELINE_VERSION = 1


class VecapError(UserError, ValueError):
    """A caption run that cannot run as asked (inputs, options, an output made otherwise): exit 2."""


@dataclasses.dataclass(frozen=True)
class CaptionOptions:
    """Models, prompts and decoding: everything a caption depends on (a shard's fingerprint)."""

    captioner: str
    fuser: str
    checker: str | None = None  # None: the fuser screens; "" with check=False: no LLM check
    check: bool = True
    caption_prompt: str = prompts.CAPTION_PROMPT
    check_prompt: str = prompts.CHECK_PROMPT
    fusion_prompt: str = prompts.FUSION_PROMPT
    max_new_tokens: int = 48  # the visual caption's; the fusion gets twice as many
    max_words: int = 77  # longer captions are dropped as too_long (a 77-token text tower)
    backend: str = "auto"

    def validate(self) -> CaptionOptions:
        """Raises VecapError on a bad option; returns self with absolute model paths."""
        try:
            prompts.check_placeholders("check_prompt", self.check_prompt, ("caption",))
            prompts.check_placeholders("fusion_prompt", self.fusion_prompt, ("alt_text", "caption"))
        except ValueError as e:
            raise VecapError(str(e)) from None
        if self.max_new_tokens < 1 or self.max_words < 1:
            raise VecapError("--max_new_tokens and --max_words must be >= 1")
        for flag in ("captioner", "fuser", "checker"):
            path = getattr(self, flag)
            if path and not os.path.isfile(os.path.join(path, "config.json")):
                raise VecapError(
                    f"--{flag}={path} is not a local HuggingFace model directory (no config.json)"
                )
        ab = {f: os.path.abspath(getattr(self, f)) for f in ("captioner", "fuser") if getattr(self, f)}
        checker = os.path.abspath(self.checker) if self.checker else None
        return dataclasses.replace(self, checker=checker, **ab)

    @property
    def checker_dir(self) -> str | None:
        """The model that screens captions: --checker, else the fuser; None without the check."""
        return (self.checker or self.fuser) if self.check else None

    @property
    def fusion_tokens(self) -> int:
        """The fusion's token budget: it writes the caption again, plus the AltText's facts."""
        return 2 * self.max_new_tokens

    def provenance(self) -> dict[str, Any]:
        """Model names, prompt hashes and settings (every provenance row and the fingerprint)."""
        return {
            "captioner": self.captioner,
            "checker": self.checker_dir,
            "fuser": self.fuser,
            "caption_prompt_hash": prompts.prompt_hash(self.caption_prompt),
            "check_prompt_hash": prompts.prompt_hash(self.check_prompt) if self.check else None,
            "fusion_prompt_hash": prompts.prompt_hash(self.fusion_prompt),
            "max_new_tokens": self.max_new_tokens,
            "fusion_max_new_tokens": self.fusion_tokens,
            "max_words": self.max_words,
            "do_sample": False,
        }


@dataclasses.dataclass(frozen=True)
class Resources:
    """How the work is spread: never part of the fingerprint (the batches are, see batch_size)."""

    batch_size: int = 8
    concurrency: int = 1  # actors per model stage
    num_gpus: float = 0.0  # per actor
    num_cpus: float | None = None  # per actor; default 0.5 without GPUs, 1 with
    ray_address: str | None = None

    @property
    def cpus(self) -> float:
        """CPUs per actor."""
        return self.num_cpus if self.num_cpus is not None else (1.0 if self.num_gpus > 0 else 0.5)
