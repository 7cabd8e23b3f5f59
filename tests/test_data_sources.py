"""Training sources (issue 12): mixtures by weight, WebDataset tars and Parquet read directly, bad data."""

from __future__ import annotations

import io
import json
import math
import tarfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from veclip_jax.config import ConfigError, validate_config
from veclip_jax.data import demo, pipeline, records
from veclip_jax.data.skip_and_batch import TooManyBadRecordsError
from veclip_jax.data.skips import BAD_REASONS
from veclip_jax.data.sources import SAMPLE_BITS
from veclip_jax.data.train_iterator import InputStateError, mix_ratios
from veclip_jax.defaults import get_config

PER_FILE = 12  # samples per tar / rows per Parquet file
FILES = 4


def _tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(demo_cache, tmp_path_factory):
    """The same 48 demo pairs as ArrayRecord shards, img2dataset tars and Parquet files; and more shards."""
    data = demo.ensure_demo_data(demo_cache)
    reader = records.RecordReader(data.train_files)
    recs = [reader[i] for i in range(3 * FILES * PER_FILE)]
    root = tmp_path_factory.mktemp("corpus")
    pairs = recs[: FILES * PER_FILE]
    for f in range(FILES):
        _tar(
            root / f"{f:05d}.tar",
            [
                (r.key, {"jpg": r.jpeg, "txt": (r.alt_text or r.vecap_text).encode(), "json": b"{}"})
                for r in pairs[f * PER_FILE : (f + 1) * PER_FILE]
            ],
        )
        part = pairs[f * PER_FILE : (f + 1) * PER_FILE]
        table = pa.table(
            {"jpg": [r.jpeg for r in part], "caption": [r.alt_text or r.vecap_text for r in part]}
        )
        pq.write_table(table, root / f"part-{f}.parquet", row_group_size=5)
    records.write_shards(iter(pairs), str(root / "a"), 2)
    records.write_shards(iter(recs[FILES * PER_FILE : 2 * FILES * PER_FILE]), str(root / "b"), 2)
    records.write_shards(iter(recs[2 * FILES * PER_FILE :]), str(root / "c"), 1)
    return {
        "root": root,
        "tokenizer": data.tokenizer,
        "tar": str(root / "{00000..00003}.tar"),
        "parquet": str(root / "*.parquet"),
        "a": str(root / "a-*.array_record"),
        "b": str(root / "b-*.array_record"),
        "c": str(root / "c-*.array_record"),
    }


def _config(corpus, train_files: str = "", sources: dict | None = None, **data):
    c = get_config()
    c.batch_size = 8
    c.data.tokenizer = corpus["tokenizer"]
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.shuffle_buffer = 6
    c.data.train_files = train_files
    if sources:
        c.data.sources = sources
    c.data.update(data)
    validate_config(c)
    return c


def _take(config, n: int, state=None, *, process_index: int = 0, process_count: int = 1, snapshot=None):
    """n batches, the state after `snapshot` of them (default: all), and the counters at the end."""
    it = pipeline.make_train_iterator(
        config, process_index=process_index, process_count=process_count, include_ids=True
    )
    try:
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))  # what a checkpoint stores
        batches, saved = [], None
        for i in range(n):
            if i == snapshot:
                saved = it.get_state()
            batches.append(next(it))
        return batches, saved if snapshot is not None else it.get_state(), it.counters()
    finally:
        it.close()


def _ids(batches) -> list[tuple[int, int, int]]:
    return [
        (int(s), int(e), int(i))
        for b in batches
        for s, e, i in zip(b["source"], b["epoch"], b["index"], strict=True)
    ]


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --- reading tars and Parquet directly -----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
@pytest.mark.parametrize("process_count", [1, 2])
def test_streamed_formats_read_every_example_of_an_epoch_once_over_processes(corpus, fmt, process_count):
    # The format comes from the extension: train_files alone trains from tars or Parquet files.
    c = _config(corpus, corpus[fmt])
    c.batch_size = 8 * process_count
    epoch0 = []
    for p in range(process_count):
        batches, _, counts = _take(c, 2 * FILES * PER_FILE // (8 * process_count) + 1, process_index=p,
                                   process_count=process_count)  # fmt: skip
        seen = _ids(batches)
        assert len(seen) == len(set(seen)), "an example was read twice"
        epoch0 += [i for _, e, i in seen if e == 0]
        assert sum(counts[r] for r in BAD_REASONS) == 0
    assert sorted(epoch0) == sorted((f << SAMPLE_BITS) | s for f in range(FILES) for s in range(PER_FILE))


@pytest.mark.parametrize("fmt,workers", [("tar", 0), ("parquet", 0), ("tar", 2)])
def test_streamed_formats_resume_exactly_from_the_iterator_state(corpus, fmt, workers):
    c = _config(corpus, corpus[fmt], num_workers=workers)
    reference, state, _ = _take(c, 9, snapshot=4)
    resumed, _, _ = _take(c, 5, state)  # crosses an epoch: files reopened, windows refilled
    _same(resumed, reference[4:])


def test_streamed_resume_with_another_worker_count_is_refused_naming_the_field(corpus):
    c = _config(corpus, corpus["tar"])
    _, state, _ = _take(c, 1)
    c.data.num_workers = 2
    with pytest.raises(InputStateError, match=r"config.data.num_workers=2.*data.num_workers=0"):
        _take(c, 1, state)
    # A position saved by the earlier reader (grain's threaded interleave: no "streamed_reader") is refused.
    c.data.num_workers = 0
    del state["streamed_reader"]
    with pytest.raises(InputStateError, match=r"earlier veclip-jax reader"):
        _take(c, 1, state)


def test_resuming_after_the_data_changed_format_names_the_change_not_damage(corpus):
    # ArrayRecord -> tar and back: the saved position is the other format's (issue 22, #8).
    for saved_from, resumed_with, then in (("a", "tar", "ArrayRecord-only"), ("tar", "a", "streamed")):
        _, state, _ = _take(_config(corpus, corpus[saved_from]), 1)
        with pytest.raises(InputStateError, match=rf"saved for {then}.*changed format"):
            _take(_config(corpus, corpus[resumed_with]), 1, state)


# --- mixtures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("other", ["b", "tar"])
def test_mixture_realises_its_weights_and_reports_them(corpus, other):
    c = _config(
        corpus, sources={"a": dict(files=corpus["a"], weight=0.7), "x": dict(files=corpus[other], weight=0.3)}
    )
    c.batch_size = 64
    batches, _, counts = _take(c, 40)  # 2,560 examples
    n = counts["examples/a"] + counts["examples/x"]
    assert n == 2560
    share = counts["examples/a"] / n
    assert abs(share - 0.7) <= 3 * math.sqrt(0.7 * 0.3 / n)  # the interleave is exact; sampling error allowed
    assert mix_ratios(counts) == pytest.approx({"mix/a": share, "mix/x": 1 - share})
    assert {s for s, _, _ in _ids(batches)} == {0, 1}


def test_adding_a_corpus_does_not_change_another_corpus_draws(corpus):
    one = _config(corpus, sources={"a": dict(files=corpus["a"], vecap_prob=0.5)})
    two = _config(
        corpus, sources={"a": dict(files=corpus["a"], vecap_prob=0.5), "c": dict(files=corpus["c"])}
    )
    alone, _, _ = _take(one, 6)
    mixed, _, _ = _take(two, 12)

    def of_a(batches):
        return [
            (ids, b["image"][j], b["tokens"][j])
            for b in batches
            for j, ids in enumerate(_ids([b]))
            if ids[0] == 0
        ]

    a1, a2 = of_a(alone), of_a(mixed)
    n = min(len(a1), len(a2))
    assert n >= 40
    for (i1, im1, t1), (i2, im2, t2) in zip(a1[:n], a2[:n], strict=True):
        assert i1 == i2  # the same records in the same order, epoch after epoch
        np.testing.assert_array_equal(im1, im2)  # the same crop
        np.testing.assert_array_equal(t1, t2)  # the same caption draw


@pytest.mark.parametrize("workers", [0, 2])
def test_mixtures_resume_exactly(corpus, workers):
    c = _config(corpus, sources={"a": dict(files=corpus["a"], weight=2.0), "t": dict(files=corpus["tar"])},
                num_workers=workers)  # fmt: skip
    reference, state, _ = _take(c, 8, snapshot=3)
    resumed, _, counts = _take(c, 5, state)
    _same(resumed, reference[3:])
    assert counts["examples/a"] + counts["examples/t"] == 8 * 8  # the counts continue across the resume


def test_one_source_config_is_the_train_files_run(corpus):
    a, _, _ = _take(_config(corpus, corpus["a"]), 3)
    b, _, _ = _take(_config(corpus, sources={"only": dict(files=corpus["a"])}), 3)
    assert [i[1:] for i in _ids(a)] != [i[1:] for i in _ids(b)]  # a named source has its own seed
    c = _config(corpus, corpus["a"])
    c.data.sources = {}
    _same(a, _take(c, 3)[0])


# --- bad data, every format ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_corpus(corpus):
    """A tar source and a Parquet source, each with one sample of every kind of damage."""
    root = corpus["root"]
    good = records.RecordReader(corpus["a"])
    jpeg = good[0].jpeg
    ok = [(f"g{i}", {"jpg": good[i].jpeg, "txt": b"a red circle"}) for i in range(1, 9)]
    _tar(root / "bad-0.tar", ok[:4] + [
        ("noimage", {"txt": b"a caption"}),  # missing_image
        ("badjpg", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a caption"}),  # undecodable_image
        ("latin1", {"jpg": jpeg, "txt": b"caf\xe9"}),  # bad_caption
        ("empty", {"jpg": jpeg, "txt": b"  \t"}),  # empty_caption
        ("badjson", {"jpg": jpeg, "json": b"{not json"}),  # bad_record: no .txt, and the .json is not JSON
    ])  # fmt: skip
    _tar(root / "bad-1.tar", ok[4:])
    whole = (root / "bad-1.tar").read_bytes()
    (root / "bad-2.tar").write_bytes(
        whole[: len(whole) // 2 + 100]
    )  # truncated: 2 samples, then unreadable_file
    (root / "bad-3.tar").write_bytes(b"")  # zero bytes: unreadable_file
    _tar(root / "bad-4.tar", [])  # no members (img2dataset: a shard of failed downloads): empty_file
    table = pa.table({
        "jpg": [jpeg, None, jpeg, b"garbage", jpeg],
        "caption": ["a blue square", "no image", None, "bad image", "another one"],
    })  # fmt: skip
    pq.write_table(table, root / "bad-0.parquet")
    (root / "bad-1.parquet").write_bytes(b"")  # zero bytes: unreadable_file
    pq.write_table(table.slice(0, 0), root / "bad-2.parquet")  # no rows: empty_file
    return {"t": str(root / "bad-*.tar"), "p": str(root / "bad-*.parquet")}


def test_bad_data_of_every_format_is_skipped_and_counted_per_reason_and_source(corpus, bad_corpus):
    c = _config(corpus, sources={"t": dict(files=bad_corpus["t"]), "p": dict(files=bad_corpus["p"])},
                max_bad_fraction=1.0)  # fmt: skip
    c.batch_size = 4
    # Per epoch: t gives 8 + 2 good, p gives 2 good; 17 skips. Read four epochs' worth of good examples.
    batches, _, counts = _take(c, 12)
    t_per_epoch = {"missing_image": 1, "undecodable_image": 1, "bad_caption": 1, "empty_caption": 1,
                   "bad_record": 1, "unreadable_file": 2, "empty_file": 1}  # fmt: skip
    p_per_epoch = {"missing_image": 1, "empty_caption": 1, "undecodable_image": 1, "unreadable_file": 1,
                   "empty_file": 1}  # fmt: skip
    epochs = {e for _, e, _ in _ids(batches)}
    assert len(epochs) >= 2
    for name, per_epoch in (("t", t_per_epoch), ("p", p_per_epoch)):
        for reason in BAD_REASONS:
            n = counts[f"{reason}/{name}"]
            assert (n > 0) == (reason in per_epoch), (name, reason, n)
    assert counts["examples/t"] + counts["examples/p"] == 48
    # max_bad_fraction holds over all sources together.
    c.data.max_bad_fraction = 0.2
    c.data.bad_window = 20
    with pytest.raises(TooManyBadRecordsError, match="bad_window=20"):
        _take(c, 12)


def test_a_source_of_only_empty_files_fails_as_too_bad_instead_of_stalling(corpus, tmp_path):
    for f in range(3):
        _tar(tmp_path / f"empty-{f}.tar", [])
    c = _config(corpus, str(tmp_path / "empty-*.tar"), bad_window=20)
    outcome = []

    def take():
        try:
            _take(c, 1)
        except TooManyBadRecordsError as e:
            outcome.append(e)

    reader = threading.Thread(target=take, daemon=True)
    reader.start()
    reader.join(timeout=120)
    assert not reader.is_alive(), "the reader stalls on a source whose files hold no samples"
    assert outcome and "empty_file" in str(outcome[0])


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sources,message",
    [
        (
            {"a": dict(files="x.tar", wieght=1.0)},
            r"data.sources.a.wieght is not a source field.*did you mean",
        ),
        ({"a": dict(files="x.tar", weight=0.0)}, r"data.sources.a.weight=0.0: must be > 0"),
        ({"a": dict(files="x.tar", vecap_prob=2.0)}, r"data.sources.a.vecap_prob=2.0"),
        ({"a": dict(weight=1.0)}, r"data.sources.a.files is empty"),
        ({"a-b": dict(files="x.tar")}, r"a source name must be an identifier"),
    ],
)
def test_source_fields_are_checked_naming_the_field(corpus, sources, message):
    c = get_config()
    c.data.tokenizer = corpus["tokenizer"]
    c.data.sources = sources
    with pytest.raises(ConfigError, match=message):
        validate_config(c)


def test_a_source_with_files_of_two_formats_or_a_missing_file_is_refused_by_name(corpus):
    c = _config(corpus, f"{corpus['tar']},{corpus['a']}")
    with pytest.raises(ValueError, match="data.train_files: one source holds one format"):
        _take(c, 1)
    c = _config(corpus, sources={"dfn": dict(files=str(corpus["root"] / "nothere.tar"))})
    with pytest.raises(FileNotFoundError, match="data.sources.dfn: file not found: .*nothere.tar"):
        _take(c, 1)
