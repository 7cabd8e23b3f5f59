"""Cost per example of the MoCo v2 views (veclip_jax/data/augment.py) against the plain crop.

    python -m veclip_jax.bench.augment                # a 500x375 JPEG to 224 px, one thread
    python -m veclip_jax.bench.augment --size=32 --width=64 --height=64 --decoder=pil

One photo-like test image (smooth gradients and noise, JPEG quality 90) is decoded and cropped to
uint8 pixels (as the pipeline ships them: the model normalises them in its jitted step) --examples
times in this thread, each time with the example's own generator as in the
pipeline: once as the image input (the plain RandomResizedCrop) and once as the views the two-view
objectives read. veclip_jax/data/README.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from veclip_jax.data import image_ops, seeds
from veclip_jax.data.augment import ViewSpec, decode_views


def main(argv: Sequence[str] | None = None) -> None:
    """Prints the cost per example of the views, and of the plain crop, in one thread."""
    p = argparse.ArgumentParser(prog="python -m veclip_jax.bench.augment", description=main.__doc__)
    p.add_argument("--size", type=int, default=224, help="output side S")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--decoder", default="simplejpeg", choices=image_ops.DECODERS)
    args = p.parse_args(argv)
    # A photo-like test image: smooth gradients and noise, JPEG quality 90.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : args.height, 0 : args.width]
    base = np.stack([xx / args.width, yy / args.height, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], -1)
    pixels = np.clip(base * 255 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    spec = ViewSpec(size=args.size, decoder=args.decoder)

    def crop(i: int) -> None:
        rng = seeds.example_rng(0, seeds.STREAM_CROP, 0, i)
        image_ops.decode_random_crop(
            data, rng, size=args.size, scale=(0.9, 1.0), ratio=spec.crop_ratio, decoder=args.decoder
        )

    def views(i: int) -> None:
        decode_views(
            data, [seeds.example_rng(0, seeds.STREAM_VIEW, 0, i, v) for v in range(spec.views)], spec
        )

    for name, fn in (("crop (the image input)", crop), (f"{spec.views} views", views)):
        fn(0)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(args.examples):
            fn(i)
        ms = (time.perf_counter() - t0) / args.examples * 1e3
        cpu_ms = (time.process_time() - c0) / args.examples * 1e3  # what a loaded machine inflates less
        print(
            f"{name}: {ms:.2f} ms per example, {cpu_ms:.2f} ms CPU "
            f"({args.width}x{args.height} JPEG -> {args.size} px, {args.decoder})"
        )


if __name__ == "__main__":
    main()
