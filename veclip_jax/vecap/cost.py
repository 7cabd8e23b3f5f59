"""The --dry_run plan of a caption run: shards, images, tokens, and the cost model.

Cost model. Generating is decode-bound: each generated token is one forward step of the model, so

    hours = images x generated tokens per image / (generated tokens per second per accelerator) / 3600

per model stage (the captioner, the fusion LLM; the check reads one token), divided by the number
of accelerators. Tokens per image: the visual caption's (at most --max_new_tokens), the fusion's (at
most twice that, only for images whose AltText has content), one for the check. Prompt tokens
(prefill: the image's tokens and the few-shot fusion prompt) are shown too; they run in parallel
within a forward pass and cost far less per token, but they set the memory per batch.

Without --measure the plan gives the upper bounds (every token budget used, every AltText fused).
`--measure=N` runs the real models here, in this process, on the first N images of the first
pending shards, with the same batch size and device (--num_gpus), and reports measured tokens per
image and tokens/s per stage, wall and CPU time; the estimate then uses those.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tarfile
import time
from typing import Any

from veclip_jax.vecap import prompts
from veclip_jax.vecap.options import CaptionOptions, Resources
from veclip_jax.vecap.pipeline import fingerprint
from veclip_jax.vecap.shards import Inputs, Shard, plan_shards, read_batches


def count_images(shard: Shard) -> int:
    """The samples of a shard that have an image member or cell (before decoding checks)."""
    if shard.rows:
        return len(shard.rows)
    total = 0
    for path in shard.files:
        try:
            if shard.kind == "parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(path).metadata.num_rows
                continue
            keys = set()
            with tarfile.open(path, "r:*") as tar:  # seekable: headers only, members skipped
                for member in tar:
                    base = os.path.basename(member.name)
                    stem, _, ext = base.partition(".")
                    if ext.lower() in ("jpg", "jpeg", "png", "webp"):
                        keys.add(os.path.join(os.path.dirname(member.name), stem))
            total += len(keys)
        except (OSError, tarfile.TarError, ValueError):
            continue  # missing or damaged: the run counts it
    return total


@dataclasses.dataclass
class CostPlan:
    """What --dry_run prints."""

    out: str
    shards: int
    pending: int
    images: int  # in the pending shards
    prompt_tokens: dict[str, int]  # per image, per stage
    generated_tokens: dict[str, float]  # per image, per stage (upper bounds, or measured)
    measured: dict[str, Any] | None = None

    def format(self) -> str:
        """The plan as printed."""
        lines = [
            f"{self.pending} of {self.shards} shards to caption ({self.shards - self.pending} done), "
            f"{self.images:,} images -> {self.out}-*-of-{self.shards:05d}.json",
            "  tokens per image      prompt   generated" + ("" if self.measured else " (at most)"),
        ]
        for stage in ("caption", "check", "fusion"):
            lines.append(
                f"    {stage:<18} {self.prompt_tokens.get(stage, 0):>8,} "
                f"{self.generated_tokens.get(stage, 0):>11,.1f}"
            )
        gen = sum(self.generated_tokens.values())
        lines.append(f"  generated tokens in all: {self.images * gen:,.0f} ({gen:.1f} per image)")
        if self.measured:
            m = self.measured
            lines.append(f"  measured on {m['images']} images ({m['device']}, batch {m['batch_size']}):")
            for stage in ("caption", "text"):
                s = m[stage]
                per_cpu = s["tokens"] / max(s["cpu_s"], 1e-9)
                lines.append(
                    f"    {stage:<8} {s['tokens_per_s']:8.1f} generated tokens/s ({per_cpu:.1f} per CPU-s), "
                    f"{s['images_per_s']:7.2f} images/s (wall {s['wall_s']:.2f} s, CPU {s['cpu_s']:.2f} s)"
                )
            seconds = self.images / max(m["images_per_s"], 1e-9)
            lines.append(
                f"  estimate: {seconds / 3600:,.3f} hours ({seconds:,.0f} s) for {self.images:,} images on "
                f"one such device ({m['images_per_s']:.2f} images/s through both stages); / the devices"
            )
        else:
            lines.append(
                "  cost model: hours = images x generated tokens per image / (tokens/s per "
                "accelerator) / 3600 per stage; --measure=N measures tokens/s here"
            )
        return "\n".join(lines)


def _prompt_tokens(options: CaptionOptions) -> dict[str, int]:
    """Prompt tokens per image from the tokenizers (no weights loaded); the image's tokens included."""
    import transformers
    from PIL import Image

    transformers.utils.logging.set_verbosity_error()
    processor = transformers.AutoProcessor.from_pretrained(options.captioner, local_files_only=True)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": options.caption_prompt}]}
    ]
    text = (
        processor.apply_chat_template(messages, add_generation_prompt=True)
        if getattr(processor, "chat_template", None)
        else f"<image>\n{options.caption_prompt}"
    )
    caption = processor(images=[Image.new("RGB", (336, 336))], text=[text], return_tensors="np")
    tok = transformers.AutoTokenizer.from_pretrained(options.fuser, local_files_only=True)
    visual = " ".join(["word"] * options.max_new_tokens)
    alt = " ".join(["word"] * 12)  # a typical web AltText
    out = {"caption": int(caption["input_ids"].shape[1])}
    fusion = prompts.fill(options.fusion_prompt, alt_text=alt, caption=visual)
    out["fusion"] = len(tok.encode(fusion))
    if options.check:
        out["check"] = len(tok.encode(prompts.fill(options.check_prompt, caption=visual)))
    return out


def dry_run(
    inputs: Inputs,
    out: str,
    options: CaptionOptions,
    resources: Resources,
    *,
    num_shards: int = 0,
    measure: int = 0,
) -> CostPlan:
    """The plan of `make_vecap` with these arguments, and the estimate (measured with `measure` > 0)."""
    from veclip_jax.vecap.pipeline import _done_stats

    out = os.path.abspath(os.path.expanduser(out))
    options = options.validate()
    shards = plan_shards(inputs, num_shards)
    pending = [
        s for s in shards if _done_stats(out, s, fingerprint(s, options, resources.batch_size)) is None
    ]
    plan = CostPlan(
        out=out,
        shards=len(shards),
        pending=len(pending),
        images=sum(count_images(s) for s in pending),
        prompt_tokens=_prompt_tokens(options),
        generated_tokens={
            "caption": options.max_new_tokens,
            "check": 1.0 if options.check else 0.0,
            "fusion": options.fusion_tokens,
        },
    )
    if measure > 0 and pending:
        plan.measured = _measure(pending, options, resources, measure)
        m = plan.measured
        plan.generated_tokens = {
            "caption": m["caption"]["tokens_per_image"],
            "check": 1.0 if options.check else 0.0,
            "fusion": m["text"]["tokens_per_image"],
        }
    return plan


def _measure(shards: list[Shard], options: CaptionOptions, resources: Resources, n: int) -> dict[str, Any]:
    """Runs both model stages here on the first `n` images of `shards`; times and token counts."""
    from veclip_jax.vecap.stages import CaptionStage, TextStage

    batches, images = [], 0
    rows = (
        r for s in shards for r in read_batches({"shard": pickle.dumps(s)}, batch_size=resources.batch_size)
    )
    for row in rows:
        if images >= n:
            break
        keep = min(len(row["keys"]), n - images)
        row = row | {k: row[k][:keep] for k in ("keys", "urls", "alts", "images")}
        if keep:
            batches.append(row)
            images += keep
    caption, text = CaptionStage(options, resources), TextStage(options, resources)
    if batches:
        caption(dict(batches[0]))  # warm-up: first-call costs are not per image
    result: dict[str, Any] = {
        "images": images,
        "batch_size": resources.batch_size,
        "device": getattr(caption.model, "device", "vllm"),
    }
    rows = []
    for name, stage, inputs in (("caption", caption, batches), ("text", text, None)):
        inputs = inputs if inputs is not None else rows
        c0, w0 = time.process_time(), time.perf_counter()
        outs = [stage(dict(r)) for r in inputs]
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        key = "visual_tokens" if name == "caption" else "vecap_tokens"
        tokens = sum(sum(o[key]) for o in outs)
        result[name] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens": tokens,
            "tokens_per_image": tokens / max(images, 1),
            "tokens_per_s": tokens / max(wall, 1e-9),
            "images_per_s": images / max(wall, 1e-9),
        }
        rows = outs
    both = result["caption"]["wall_s"] + result["text"]["wall_s"]
    result["images_per_s"] = images / max(both, 1e-9)
    result["device"] = str(result["device"])
    return result
