"""The grain training pipeline: contract, determinism, exact resume, process slices, bad records."""

from __future__ import annotations

import collections
import json
import math
import os

import grain
import numpy as np
import pytest

from veclip_jax.config import validate_config
from veclip_jax.data import captions, demo, image_ops, pipeline, records, seeds
from veclip_jax.data.records import Record
from veclip_jax.data.skip_and_batch import TooManyBadRecordsError
from veclip_jax.data.skips import BAD_REASONS
from veclip_jax.data.tokenizer import Tokenizer
from veclip_jax.defaults import get_config

NUM_TRAIN = 191  # odd: process slices of an epoch are uneven, and epochs straddle batches


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> demo.DemoData:
    return demo.ensure_demo_data(
        str(tmp_path_factory.mktemp("cache")), num_train=NUM_TRAIN, num_eval=8, num_shards=3
    )


def _config(data_files: list[str], tokenizer: str, **data):
    c = get_config()  # the tiny model: 32 px images, 32 tokens, vocabulary 1024
    c.batch_size = 16
    c.data.train_files = ",".join(data_files)
    c.data.tokenizer = tokenizer
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.update(data)
    return c


@pytest.fixture()
def config(demo_data):
    return _config(demo_data.train_files, demo_data.tokenizer)


def _take(config, n: int, *, state=None, process_index=0, process_count=1, include_ids=True):
    it = pipeline.make_train_iterator(
        config, process_index=process_index, process_count=process_count, include_ids=include_ids
    )
    try:
        if state is not None:
            it.set_state(state)
        batches = [next(it) for _ in range(n)]
        return batches, it.get_state(), it.bad_counts()
    finally:
        it.close()


def _examples(batches) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """(epoch, record index) -> that example's arrays."""
    out = {}
    for b in batches:
        for j in range(len(b["index"])):
            key = (int(b["epoch"][j]), int(b["index"][j]))
            assert key not in out, f"example {key} seen twice"
            out[key] = {k: b[k][j] for k in ("image", "tokens")}
    return out


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- the contract -------------------------------------------------------------------------------


def test_batches_follow_the_training_contract(config):
    (batch,), _, counts = _take(config, 1, include_ids=False, process_count=2)
    b, S, L = 8, config.model.vision.image_size, config.model.text.context_length
    assert set(batch) == {"image", "tokens"}
    assert batch["image"].shape == (b, S, S, 3) and batch["image"].dtype == np.uint8  # the model normalises
    assert batch["tokens"].shape == (b, L) and batch["tokens"].dtype == np.int32
    assert batch["image"].max() > 200 and batch["image"].min() < 50  # pixels, not normalised
    for row in batch["tokens"]:
        eos = list(row).index(config.model.text.eos_id)
        assert (row[:eos] > 2).all() and (row[eos + 1 :] == config.model.text.pad_id).all()
    assert counts == dict.fromkeys(BAD_REASONS, 0)


def test_each_example_is_the_seeded_crop_and_caption_of_its_epoch_and_record(config, demo_data):
    config.data.vecap_prob = 0.5
    batches, _, _ = _take(config, 14)  # 224 examples: all of epoch 0 and some of epoch 1
    reader = records.RecordReader(demo_data.train_files)
    tok = Tokenizer(demo_data.tokenizer, config.model.text.context_length)
    examples = _examples(batches)
    assert {e for e, _ in examples} == {0, 1}
    for (epoch, index), ex in examples.items():
        rec = reader[index]
        choice = captions.choose_caption(
            rec.alt_text, rec.vecap_text, vecap_prob=0.5, seed=config.seed, epoch=epoch, index=index
        )
        np.testing.assert_array_equal(ex["tokens"], tok.encode_padded(choice.text))
        rng = seeds.example_rng(config.seed, seeds.STREAM_CROP, epoch, index)
        crop = image_ops.decode_random_crop(
            rec.jpeg, rng, size=32, scale=config.data.crop_scale, ratio=config.data.crop_ratio
        )
        np.testing.assert_array_equal(ex["image"], crop)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_pipeline_mixing_honours_vecap_prob_within_sampling_error(config, demo_data, p):
    config.data.vecap_prob = p
    batches, _, _ = _take(config, 24)  # 384 examples over two epochs
    reader = records.RecordReader(demo_data.train_files)
    tok = Tokenizer(demo_data.tokenizer, config.model.text.context_length)
    chose_vecap = []
    for (_, index), ex in _examples(batches).items():
        rec = reader[index]
        alt, vecap = (tok.encode_padded(captions.clean_caption(t)) for t in (rec.alt_text, rec.vecap_text))
        if rec.alt_text and rec.vecap_text and not np.array_equal(alt, vecap):
            is_vecap = np.array_equal(ex["tokens"], vecap)
            assert is_vecap or np.array_equal(ex["tokens"], alt)
            chose_vecap.append(is_vecap)
    n = len(chose_vecap)
    assert n > 250
    assert abs(np.mean(chose_vecap) - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_demo_data_is_generated_once_and_used_when_no_train_files_are_given(tmp_path):
    c = get_config()
    c.batch_size = 8
    c.data.cache_dir = str(tmp_path)
    c.data.num_threads = 1
    (batch,), _, _ = _take(c, 1, include_ids=False)
    assert batch["image"].shape == (8, 32, 32, 3)
    (root,) = [p for p in os.listdir(tmp_path) if p.startswith("demo-")]
    manifest = tmp_path / root / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    _take(c, 1)
    assert manifest.stat().st_mtime_ns == mtime  # reused, not regenerated


# --- determinism and resume ---------------------------------------------------------------------


def test_same_config_gives_same_batches(config):
    a, _, _ = _take(config, 3)
    b, _, _ = _take(config, 3)
    _assert_same_batches(a, b)
    config.seed = 1
    c, _, _ = _take(config, 1)
    assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_resume_gives_same_next_batches(config):
    reference, _, _ = _take(config, 15)
    _, state, _ = _take(config, 11)
    state = json.loads(json.dumps(state))  # what a checkpoint stores
    resumed, _, _ = _take(config, 4, state=state)
    # Batches 11..14 cross the epoch boundary: the reshuffle resumes too.
    _assert_same_batches(resumed, reference[11:])


def test_resume_with_two_worker_processes_gives_same_next_batches(config):
    config.data.num_workers = 2
    reference, _, _ = _take(config, 7)
    _, state, _ = _take(config, 3)
    resumed, _, _ = _take(config, 4, state=json.loads(json.dumps(state)))
    _assert_same_batches(resumed, reference[3:])


def test_worker_processes_produce_the_same_examples_as_threads(config):
    threads, _, _ = _take(config, 4)
    config.data.num_workers = 2
    workers, _, _ = _take(config, 4)
    # Each worker batches its own slice of the stream, so batches group
    # differently; the examples themselves (crop, caption) are identical.
    a, b = _examples(threads), _examples(workers)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key]["image"], b[key]["image"])
        np.testing.assert_array_equal(a[key]["tokens"], b[key]["tokens"])


def test_resume_through_an_orbax_checkpoint(config, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    reference, _, _ = _take(config, 6)
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1, include_ids=True)
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    it.close()
    fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1, include_ids=True)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    try:
        _assert_same_batches([next(fresh), next(fresh)], reference[4:])
    finally:
        fresh.close()


# --- process slices -----------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_slices_partition_an_epoch(config, process_count):
    config.batch_size = 8 * process_count
    per_process = math.ceil(NUM_TRAIN / process_count)
    n_batches = math.ceil(per_process / 8) + 1
    seen = []
    for p in range(process_count):
        batches, _, _ = _take(config, n_batches, process_index=p, process_count=process_count)
        epoch0 = [i for b in batches for e, i in zip(b["epoch"], b["index"], strict=True) if e == 0]
        # Process p reads positions p, p+P, ... of the epoch's order.
        order = pipeline.epoch_order(config.seed, NUM_TRAIN, 0)
        assert epoch0 == list(order[p::process_count])
        seen.append(set(epoch0))
        assert len(seen[-1]) == len(epoch0)
    for p in range(process_count):
        for q in range(p):
            assert not seen[p] & seen[q], "two processes read the same record in one epoch"
    assert set().union(*seen) == set(range(NUM_TRAIN)), "a record was missed in the epoch"


def test_a_record_looks_the_same_whatever_the_process_count(config):
    one, _, _ = _take(config, 6)
    config.batch_size = 16
    two = []
    for p in range(2):
        batches, _, _ = _take(config, 6, process_index=p, process_count=2)
        two += batches
    a, b = _examples(one), _examples(two)
    common = a.keys() & b.keys()
    assert len(common) > 40
    for key in common:
        np.testing.assert_array_equal(a[key]["image"], b[key]["image"])
        np.testing.assert_array_equal(a[key]["tokens"], b[key]["tokens"])


def test_each_epoch_is_a_fresh_permutation():
    orders = [pipeline.epoch_order(0, 100, e) for e in range(3)] + [pipeline.epoch_order(1, 100, 0)]
    for o in orders:
        assert sorted(o) == list(range(100))
    for i in range(len(orders)):
        for j in range(i):
            assert not np.array_equal(orders[i], orders[j])


# --- bad input ----------------------------------------------------------------------------------

_BAD = {"bad_record": 3, "undecodable_image": 4, "empty_caption": 5}


@pytest.fixture(scope="module")
def bad_data(demo_data, tmp_path_factory) -> tuple[list[str], dict[int, str]]:
    """40 good demo records and _BAD bad ones, interleaved; returns shards and {index: reason}."""
    good = [records.RecordReader(demo_data.train_files)[i] for i in range(40)]
    jpeg = good[0].jpeg
    bad_records = (
        [b"\x93garbage"] * _BAD["bad_record"]
        + [
            records.encode_record(Record(key=f"u{i}", jpeg=data, alt_text="red circle"))
            for i, data in enumerate([b"", b"not an image", jpeg[: len(jpeg) // 3], b"\xff\xd8\xff" * 9])
        ]
        + [
            records.encode_record(Record(key=f"e{i}", jpeg=jpeg, alt_text=alt, vecap_text=vecap))
            for i, (alt, vecap) in enumerate(
                [(None, None), ("", " "), ("\t\n", None), ("\u200b", "\x00\x07"), ("&nbsp;", "")]
            )
        ]
    )
    reasons = ["bad_record"] * 3 + ["undecodable_image"] * 4 + ["empty_caption"] * 5
    raw = [records.encode_record(r) for r in good]
    # Spread the bad ones out; then write raw bytes (garbage cannot go through Record).
    slots = np.random.default_rng(0).permutation(len(raw) + len(bad_records))
    table: list[bytes] = [b""] * len(slots)
    bad_at: dict[int, str] = {}
    for k, s in enumerate(slots):
        if k < len(raw):
            table[s] = raw[k]
        else:
            table[s] = bad_records[k - len(raw)]
            bad_at[int(s)] = reasons[k - len(raw)]
    path = str(tmp_path_factory.mktemp("bad") / "mixed.array_record")
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(path, records.ARRAY_RECORD_OPTIONS)
    for t in table:
        w.write(t)
    w.close()
    return [path], bad_at


def _expected_counts(seed: int, bad_at: dict[int, str], n: int, batch: int, workers: int, batches: int):
    """Skips counted after `batches` batches, simulating the stream, worker slices and round robin."""
    stream = np.concatenate([pipeline.epoch_order(seed, n, e) for e in range(4)])
    counts = collections.Counter()
    for w in range(max(workers, 1)):
        own = stream[w :: max(workers, 1)]
        n_own_batches = len(range(w, batches, max(workers, 1)))
        good = 0
        for idx in own:
            if good == n_own_batches * batch:
                break
            if int(idx) in bad_at:
                counts[bad_at[int(idx)]] += 1
            else:
                good += 1
    return {r: counts[r] for r in BAD_REASONS}


def test_each_bad_record_kind_is_skipped_and_counted(bad_data, demo_data):
    files, bad_at = bad_data
    c = _config(files, demo_data.tokenizer, max_bad_fraction=1.0)
    c.batch_size = 8
    batches, _, counts = _take(c, 5)  # the 40 good records: exactly epoch 0
    assert {int(i) for b in batches for i in b["index"]} == set(range(52)) - set(bad_at)
    assert counts == _expected_counts(c.seed, bad_at, 52, 8, 0, 5)
    batches, _, counts = _take(c, 10)  # two epochs: every bad record met at least once
    assert all(counts[r] >= n for r, n in _BAD.items())
    assert counts == _expected_counts(c.seed, bad_at, 52, 8, 0, 10)


def test_bad_counts_reach_the_main_process_from_worker_processes(bad_data, demo_data):
    files, bad_at = bad_data
    c = _config(files, demo_data.tokenizer, max_bad_fraction=1.0, num_workers=2)
    c.batch_size = 8
    _, _, counts = _take(c, 6)
    assert counts == _expected_counts(c.seed, bad_at, 52, 8, 2, 6)
    assert sum(counts.values()) > 0  # not vacuous: the workers did meet bad records


def test_bad_counts_are_kept_in_the_iterator_state(bad_data, demo_data):
    files, bad_at = bad_data
    c = _config(files, demo_data.tokenizer, max_bad_fraction=1.0)
    c.batch_size = 8
    _, state, part = _take(c, 4)
    _, _, resumed = _take(c, 5, state=json.loads(json.dumps(state)))
    assert part == _expected_counts(c.seed, bad_at, 52, 8, 0, 4)
    assert resumed == _expected_counts(c.seed, bad_at, 52, 8, 0, 9)  # the 4 batches' counts carried over
    assert 0 < sum(part.values()) < sum(resumed.values())  # not vacuous: more met after the resume


def test_too_many_bad_records_in_a_window_raise_a_clear_error(bad_data, demo_data):
    files, _ = bad_data
    # 12 of 52 records are bad (23 %): over a window of 20 records, more than 5 %.
    c = _config(files, demo_data.tokenizer, max_bad_fraction=0.05, bad_window=20)
    c.batch_size = 8
    with pytest.raises(TooManyBadRecordsError, match=r"max_bad_fraction=0\.05 .*bad_window=20 records"):
        _take(c, 10)


def test_a_stream_of_only_bad_records_fails_in_the_worker_instead_of_hanging(demo_data, tmp_path):
    shards = records.write_shards(
        (Record(key=f"{i}", jpeg=b"broken", alt_text="a caption") for i in range(30)), str(tmp_path / "b"), 1
    )
    c = _config(shards, demo_data.tokenizer, max_bad_fraction=0.5, bad_window=10, num_workers=1)
    with pytest.raises(TooManyBadRecordsError, match=r"undecodable_image=10\b.*bad_window=10"):
        _take(c, 1)
    c.data.max_bad_fraction = 1.0  # check disabled: still no hang, after one epoch of nothing
    c.data.num_workers = 0
    with pytest.raises(TooManyBadRecordsError, match="undecodable_image=31"):
        _take(c, 1)


# --- configuration errors, at start -------------------------------------------------------------


def test_missing_shard_fails_at_start_with_its_name(demo_data, tmp_path):
    missing = str(tmp_path / "train-00009-of-00010.array_record")
    c = _config([*demo_data.train_files, missing], demo_data.tokenizer)
    with pytest.raises(FileNotFoundError, match="train-00009-of-00010.array_record"):
        pipeline.make_train_iterator(c, process_index=0, process_count=1)


def test_unreadable_shard_fails_at_start_with_its_name(demo_data, tmp_path):
    corrupt = tmp_path / "corrupt.array_record"
    corrupt.write_bytes(os.urandom(4096))
    c = _config([*demo_data.train_files, str(corrupt)], demo_data.tokenizer)
    with pytest.raises(ValueError, match="corrupt.array_record"):
        pipeline.make_train_iterator(c, process_index=0, process_count=1)


def test_tokenizer_larger_than_the_text_vocabulary_is_rejected(config):
    config.model.text.vocab_size = 64
    with pytest.raises(ValueError, match="model.text.vocab_size is 64"):
        pipeline.make_train_iterator(config, process_index=0, process_count=1)


def test_batch_size_must_split_evenly_over_processes(config):
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        pipeline.make_train_iterator(config, process_index=0, process_count=3)


@pytest.mark.parametrize(
    "field, value", [("vecap_prob", 1.5), ("crop_scale", (0.9, 0.5)), ("crop_ratio", (0, 1))]
)
def test_invalid_data_settings_fail_at_start(config, field, value):
    setattr(config.data, field, value)
    with pytest.raises(ValueError, match=f"data.{field}"):
        validate_config(config)  # checked once, by the config (the trainer's first step), not by the pipeline
