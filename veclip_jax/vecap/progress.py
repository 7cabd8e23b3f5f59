"""Progress of a caption run: images (and generated tokens) per stage, counted by a Ray actor that
the stages tell as they go, and the driver's console line (images/s per stage, ETA).

The ETA is from shards: the images per finished shard times the shards left, at the rate images
leave the last stage so far (the first shard must finish before there is one).
"""

from __future__ import annotations

import collections
import time


class Progress:
    """Ray actor (no CPU) counting images and tokens per stage, for the driver's progress lines."""

    def __init__(self):
        self.images: collections.Counter[str] = collections.Counter()
        self.tokens: collections.Counter[str] = collections.Counter()

    def add(self, stage: str, images: int, tokens: int = 0) -> None:
        """Counts images (and generated tokens) done by a stage."""
        self.images[stage] += images
        self.tokens[stage] += tokens

    def counts(self) -> dict[str, dict[str, int]]:
        """{"images": {stage: n}, "tokens": {stage: n}}."""
        return {"images": dict(self.images), "tokens": dict(self.tokens)}


def progress_line(counts: dict, t0: float, shards_done: int, shards_total: int, written: int) -> str:
    """The console line: images and images/s per stage since `t0`, shards written, the ETA."""
    dt = max(time.time() - t0, 1e-6)
    parts = []
    for stage in ("read", "caption", "fuse"):
        n = counts["images"].get(stage, 0)
        parts.append(f"{stage} {n:,} ({n / dt:.1f}/s)")
    line = " | ".join(parts) + f" | written {written:,} images, {shards_done}/{shards_total} shards"
    done = counts["images"].get("fuse", 0)
    read = counts["images"].get("read", 0)
    if shards_done and done:
        per_shard = written / shards_done
        left = max(per_shard * shards_total - done, 0)
        line += f" | ETA {_duration(left / (done / dt))}"
    elif read and done:
        line += " | ETA after the first shard"
    return line


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
