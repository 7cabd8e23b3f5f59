"""The crop's decode scale (the cheapest libjpeg scale that keeps the output's resolution), its
resize (torch's SIMD kernel on a whole-pixel box, or PIL's on the sub-pixel box) and the input
benchmark's JSON line of CPU costs per record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from veclip_jax.bench import input as bench_input
from veclip_jax.data import image_ops, seeds


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _exact(data: bytes, box: image_ops.Box, size: int) -> np.ndarray:
    """The reference RandomResizedCrop: a full-size decode, then PIL's bicubic resize of the box."""
    full = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    return np.asarray(full.resize((size, size), Image.Resampling.BICUBIC, box=box))


@pytest.mark.parametrize("height, width", [(375, 500), (768, 1024), (288, 288), (17, 9), (1, 1)])
@pytest.mark.parametrize("resize, full_from", [("pil", 7), ("torch", 5)])
def test_decode_size_is_the_least_covering_eighth_as_libjpeg_rounds_it_and_never_seven_eighths(
    height, width, resize, full_from
):
    # PIL's resize: 7/8 decodes at full size; torch's: 5/8-7/8 too (module docstring).
    slow = image_ops._SLOW_SCALES_TORCH if resize == "torch" else image_ops._SLOW_SCALES
    for min_h in range(1, height + 1, max(1, height // 37)):
        min_w = max(1, min_h * width // height)
        got = image_ops._jpeg_decode_size(min_h, min_w, height, width, slow)
        dims = {m: (-(-height * m // 8), -(-width * m // 8)) for m in range(1, 9)}
        m = next(m for m in range(1, 9) if dims[m][0] >= min_h and dims[m][1] >= min_w)
        assert got == (None if m >= full_from else dims[m]), (min_h, min_w)


def test_simplejpeg_decodes_at_the_size_asked_for():
    # The decode size above is what libjpeg gives for min_height / min_width of exactly that size.
    data = bench_input._photo_jpeg(seeds.example_rng(0, 0), h=375, w=500)
    for m in range(1, 8):
        h, w = -(-375 * m // 8), -(-500 * m // 8)
        assert simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=h, min_width=w).shape == (h, w, 3)


def test_a_crop_that_would_decode_at_seven_eighths_is_the_exact_full_size_crop():
    # 288x288, whole-image crop to 224: 6/8 (216 px) is too small, 7/8 (252) covers; 7/8 costs more
    # than a full decode + resize, so the full-size path runs, pixel for pixel the reference.
    data = bench_input._photo_jpeg(seeds.example_rng(0, 1), h=288, w=288)
    box = (0.0, 0.0, 288.0, 288.0)
    assert image_ops._jpeg_decode_size(*image_ops._min_decode_size(box, 224, 288, 288), 288, 288) is None
    kw = dict(size=224, scale=(1, 1), ratio=(1, 1))
    out = image_ops.decode_random_crop(data, np.random.default_rng(0), resize="pil", **kw)
    np.testing.assert_array_equal(out, _exact(data, box, 224))
    # torch: the same (whole-pixel) box and filter, to the rounding of its fixed-point weights
    out = image_ops.decode_random_crop(data, np.random.default_rng(0), resize="torch", **kw)
    assert np.abs(out.astype(int) - _exact(data, box, 224)).max() <= 2


@pytest.mark.parametrize(
    "height, width, resize, min_psnr, num_scaled",
    [
        (375, 500, "pil", 34.0, 6),
        (768, 1024, "pil", 48.0, 6),
        (375, 500, "torch", 38.0, 0),  # 5/8 or 6/8: torch's path decodes these at full size
        (768, 1024, "torch", 38.0, 6),  # 3/8
    ],
)
def test_reduced_scale_crops_stay_close_to_the_exact_crop(height, width, resize, min_psnr, num_scaled):
    # bench.input's photos (sensor noise: the hardest case for a reduced-scale decode), crops as in
    # training: measured 35.8 dB worst / 38.2 median at 500x375 (5/8 or 6/8), 50.8 / 51.3 at 1024x768.
    # torch moves the box by up to half a decoded pixel (whole pixels) but decodes 500x375 at full size:
    # 39.7 / 46.4 and 40.2 / 45.5 over 16 photos (a shift, not blur: the same whole-pixel box gives PIL's
    # filter, test below).
    kw = dict(size=224, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), resize=resize)
    scaled = 0
    for i in range(6):
        data = bench_input._photo_jpeg(seeds.example_rng(0, i), h=height, w=width)
        rng = np.random.default_rng(i)
        box = image_ops.random_resized_crop_box(rng, height, width, scale=kw["scale"], ratio=kw["ratio"])
        min_h, min_w = image_ops._min_decode_size(box, 224, height, width)
        slow = image_ops._SLOW_SCALES_TORCH if resize == "torch" else image_ops._SLOW_SCALES
        scaled += image_ops._jpeg_decode_size(min_h, min_w, height, width, slow) is not None
        out = image_ops.decode_random_crop(data, np.random.default_rng(i), **kw)
        assert _psnr(out, _exact(data, box, 224)) >= min_psnr
    assert scaled == num_scaled  # the reduced-scale path, or the full-size decode


@pytest.mark.parametrize("height, width", [(375, 500), (768, 1024)])
def test_torch_resize_is_pils_filter_on_the_whole_pixel_box_and_near_pils_sub_pixel_crop(height, width):
    # The same decode (full size at 500x375, 3/8 at 1024x768), then PIL's antialiased bicubic of the
    # whole-pixel box's pixels: torch's kernel is PIL's filter to the rounding (measured >= 66 dB, max
    # difference 1-2). Against the PIL path (sub-pixel box, decoded at 5/8 at 500x375): the half-pixel
    # shift and the decode scale, measured worst / median of 16 below. An unfiltered (antialias=False)
    # or bilinear resize, or a box off by a pixel, falls far below either bound.
    kw = dict(size=224, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))
    for i in range(4):
        data = bench_input._photo_jpeg(seeds.example_rng(0, i), h=height, w=width)
        box = image_ops.random_resized_crop_box(
            np.random.default_rng(i), height, width, scale=kw["scale"], ratio=kw["ratio"]
        )
        min_dims = image_ops._min_decode_size(box, 224, height, width)
        scaled = image_ops._jpeg_decode_size(*min_dims, height, width, image_ops._SLOW_SCALES_TORCH)
        dims = {} if scaled is None else dict(min_height=scaled[0], min_width=scaled[1])
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", **dims)
        sy, sx = arr.shape[0] / height, arr.shape[1] / width
        left, top, right, bottom = image_ops.whole_pixel_box(
            (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), arr.shape[1], arr.shape[0]
        )
        region = Image.fromarray(np.ascontiguousarray(arr[top:bottom, left:right]))
        ref = np.asarray(region.resize((224, 224), Image.Resampling.BICUBIC))
        out = image_ops.decode_random_crop(data, np.random.default_rng(i), resize="torch", **kw)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - ref).max() <= 2 and _psnr(out, ref) >= 60
        pil = image_ops.decode_random_crop(data, np.random.default_rng(i), resize="pil", **kw)
        # measured 32.4 / 38.4 (500x375: both shift and PIL's 5/8 decode) and 40.3 / 46.1 (1024x768)
        assert _psnr(out, pil) >= (31.0 if height == 375 else 38.0)
        # the same seed, the same pixels (one intra-op thread: no order-dependent sums)
        np.testing.assert_array_equal(
            out, image_ops.decode_random_crop(data, np.random.default_rng(i), resize="torch", **kw)
        )
    assert image_ops._torch.get_num_threads() == 1  # the data path starts no thread pool


def test_whole_pixel_box_moves_each_edge_at_most_half_a_pixel():
    # The torch path's crop distribution: each edge within half a decoded pixel of the drawn box (so a
    # crop covering >= size decoded pixels changes its extent by at most 1/size, its area and aspect
    # by ~2/size), inside the image, at least one pixel each way (tiny images, upscaled).
    rng = np.random.default_rng(0)
    for height, width in [(235, 313), (288, 384), (17, 9), (1, 1), (1, 40)]:
        for _ in range(200):
            box = image_ops.random_resized_crop_box(
                rng, height, width, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)
            )
            got = image_ops.whole_pixel_box(box, width, height)
            assert all(isinstance(v, int) for v in got)
            assert 0 <= got[0] < got[2] <= width and 0 <= got[1] < got[3] <= height, (box, got)
            for edge, v in zip(box, got, strict=True):
                assert abs(v - edge) <= 0.5 or got[2] - got[0] == 1 or got[3] - got[1] == 1, (box, got)
    assert image_ops.whole_pixel_box((0.5, 1.49, 2.5, 3.51), 10, 10) == (1, 1, 3, 4)  # half up


def test_without_torch_the_torch_path_is_the_pil_path(monkeypatch):
    data = bench_input._photo_jpeg(seeds.example_rng(0, 0), h=120, w=160)
    kw = dict(size=64, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    pil = image_ops.decode_random_crop(data, np.random.default_rng(1), resize="pil", **kw)
    monkeypatch.setattr(image_ops, "_torch", False)  # as _torch_or_none leaves it when the import fails
    np.testing.assert_array_equal(image_ops.decode_random_crop(data, np.random.default_rng(1), **kw), pil)
    with pytest.raises(ValueError, match="resize"):
        image_ops.decode_random_crop(data, np.random.default_rng(1), resize="cv2", **kw)


def test_the_config_picks_the_resize_and_refuses_an_unknown_one():
    from veclip_jax.config import ConfigError, validate_config
    from veclip_jax.data import augment, preprocess
    from veclip_jax.defaults import get_config

    c = get_config()
    assert c.data.resize_backend == "torch" and preprocess.image_spec(c).resize == "torch"
    assert augment.ViewSpec(size=8).resize == "torch"  # and extra_spec passes data.resize_backend on
    c.data.resize_backend = "pil"
    assert preprocess.image_spec(c).resize == "pil"
    c.data.resize_backend = "cv2"
    with pytest.raises(ConfigError, match=r"data\.resize_backend"):
        validate_config(c)


def test_input_benchmark_prints_one_json_line_of_cpu_costs(demo_cache, capsys):
    bench_input.main(["--datasets=", "--json", "--seconds=0.2", "--num_photos=8", "--workers=0",
                      "--json_records=32", "--photo_size=96x64", "--crop_size=32",
                      f"--cache_dir={demo_cache}"])  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert got["photo_size"] == "96x64" and got["crop_size"] == 32 and got["workers"] == 0
    for key in ("cpu", "decode_only", "decode_crop", "eval", "eval_fast"):
        assert got[f"{key}_ms_per_record"] > 0
    assert got["cpu_over_decode_only"] == pytest.approx(
        got["cpu_ms_per_record"] / got["decode_only_ms_per_record"], rel=0.01
    )
    assert got["eval_fast_over_decode_only"] == pytest.approx(
        got["eval_fast_ms_per_record"] / got["decode_only_ms_per_record"], rel=0.01
    )
    assert got["records_per_s"] > 0 and got["eval_images_per_s_per_core"] > 0
    assert got["eval_fast_images_per_s_per_core"] > 0


def test_photo_size_is_parsed_and_checked():
    with pytest.raises(SystemExit):
        bench_input.main(["--datasets=", "--photo_size=1024"])


def test_one_worker_process_with_one_reader_maps_in_its_own_loop_to_the_same_batches(demo_cache):
    # data.num_workers=1, num_threads=1: the worker maps without a reader thread (pipeline.py); the
    # batches, their positions and a resume are those of the in-process reader thread.
    from veclip_jax.data import demo, pipeline
    from veclip_jax.defaults import get_config

    d = demo.ensure_demo_data(demo_cache)
    c = get_config()
    c.batch_size, c.data.train_files, c.data.tokenizer = 16, ",".join(d.train_files), d.tokenizer
    c.data.num_threads, c.data.prefetch = 1, 2

    def take(num_workers: int, n: int, state=None):
        c.data.num_workers = num_workers
        it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
        try:
            if state is not None:
                it.set_state(state)
            return [next(it) for _ in range(n)], it.get_state()
        finally:
            it.close()

    threaded, _ = take(0, 5)
    worker, _ = take(1, 5)
    _, state = take(1, 2)
    resumed, _ = take(1, 3, json.loads(json.dumps(state)))
    for got, want in zip(worker + resumed, threaded + threaded[2:], strict=True):
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_crops_leave_the_resize_as_contiguous_hwc_arrays():
    # torch's kernel writes channels-last (HWC) output only for a channels-last input with a proper
    # batch stride; a planar result is a strided view whose HWC copy costs 0.2-0.3 ms a crop wherever
    # the batch is next made contiguous (grain's worker transfer, device_put). Same pixels either way.
    data = bench_input._photo_jpeg(seeds.example_rng(0, 1), h=120, w=160)
    kw = dict(size=64, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3))
    out = image_ops.decode_random_crops(data, [np.random.default_rng(k) for k in range(3)], **kw)
    assert out.flags["C_CONTIGUOUS"] and out.shape == (3, 64, 64, 3)
    one = image_ops.decode_random_crop(data, np.random.default_rng(0), **kw)
    assert one.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(one, out[0])
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
    resized = image_ops._torch_resize(arr[10:100, 7:150], 48, 40)
    assert resized.flags["C_CONTIGUOUS"] and resized.shape == (48, 40, 3)
    ref = image_ops._torch.nn.functional.interpolate(
        image_ops._torch.from_numpy(np.ascontiguousarray(arr[10:100, 7:150]).transpose(2, 0, 1).copy())[None],
        size=(48, 40), mode="bicubic", antialias=True,
    )[0].permute(1, 2, 0).numpy()  # fmt: skip
    np.testing.assert_array_equal(resized, ref)  # planar input, the same kernel: the same pixels
