"""A reader lane's own iterators (data/lane_streams.py): files taken in turn, and the window shuffle.

Both replace grain's threaded InterleaveIterDataset and its per-element
WindowShuffleIterDataset on the streamed path (for speed); these tests pin
what they must keep: every sample once, in a fixed order, and a state that
resumes to the same continuation from any position.
"""

from __future__ import annotations

import itertools
import json

import grain
import pytest

from veclip_jax.data.lane_streams import RoundRobinFilesIterDataset, WindowShuffleIterDataset

# Five "files" of 3, 0, 4, 1 and 2 samples (file f's sample s is 10 * f + s), read in a loop.
LENGTHS = (3, 0, 4, 1, 2)


class _File:
    """A file of `LENGTHS[f]` samples (a picklable map function)."""

    def __call__(self, position: int) -> grain.IterDataset:
        f = position % len(LENGTHS)
        return grain.MapDataset.range(10 * f, 10 * f + LENGTHS[f]).to_iter_dataset()


def _files() -> grain.MapDataset:
    return grain.MapDataset.range(10**6).map(_File())


def _round_robin() -> RoundRobinFilesIterDataset:
    return RoundRobinFilesIterDataset(_files(), cycle_length=2)


def test_files_are_taken_in_turn_and_a_finished_file_hands_its_slot_to_the_next():
    got = list(itertools.islice(iter(_round_robin()), 10))
    # Files open in order: slot 0 takes file 0; slot 1 file 1, finds it empty and takes file 2; slot 0,
    # after file 0, takes file 3, then file 4; slot 1, after file 2, takes file 0 again (the next loop).
    assert got == [0, 20, 1, 21, 2, 22, 30, 23, 40, 0]


def _resumes_from_every_position(ds: grain.IterDataset, n: int) -> None:
    reference = list(itertools.islice(iter(ds), n))
    for k in range(n):
        it = iter(ds)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        resumed = iter(ds)
        resumed.set_state(state)
        assert head + list(itertools.islice(resumed, n - k)) == reference, f"resumed at {k}"


def test_round_robin_resumes_exactly_from_every_position():
    _resumes_from_every_position(_round_robin(), 24)


def _shuffled(window: int, seed: int) -> WindowShuffleIterDataset:
    return WindowShuffleIterDataset(grain.MapDataset.range(10**6).to_iter_dataset(), window, seed)


@pytest.mark.parametrize("window", [1, 5, 8])
def test_each_window_is_a_permutation_of_the_parents_next_window(window):
    got = list(itertools.islice(iter(_shuffled(window, seed=3)), 4 * window))
    for w in range(4):
        assert sorted(got[w * window : (w + 1) * window]) == list(range(w * window, (w + 1) * window))
    if window > 1:
        assert got != sorted(got), "not shuffled"
        windows = [tuple(x - w * window for x in got[w * window : (w + 1) * window]) for w in range(4)]
        assert len(set(windows)) > 1, "every window got the same permutation"


def test_the_shuffle_is_a_function_of_its_seed():
    a, b, c = (list(itertools.islice(iter(_shuffled(16, s)), 64)) for s in (1, 1, 2))
    assert a == b
    assert a != c


def test_window_shuffle_resumes_exactly_from_every_position():
    _resumes_from_every_position(_shuffled(5, seed=7), 17)


def test_window_shuffle_over_the_round_robin_resumes_exactly_and_ends_with_its_parent():
    _resumes_from_every_position(WindowShuffleIterDataset(_round_robin(), 4, seed=1), 22)
    finite = grain.MapDataset.range(7).to_iter_dataset()
    assert sorted(WindowShuffleIterDataset(finite, 3, seed=0)) == list(range(7))
