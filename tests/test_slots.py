"""The candidate_scorer's slot layout (dmrx.runtime.graphs.slot_layout): pure numpy, no graphs."""

import math

import numpy as np
import pytest

from dmrx.runtime.graphs import MAX_SLOT, SLOT_COST, slot_layout


def _cost(counts, g: int) -> float:
    slots = sum(math.ceil(c / g) for c in counts if c)
    return slots * g + SLOT_COST * slots


@pytest.mark.parametrize("seed", range(6))
def test_every_candidate_sits_alone_in_a_slot_of_its_user(seed):
    rng = np.random.default_rng(seed)
    U = int(rng.integers(1, 40))
    user_row = rng.integers(0, U, int(rng.integers(1, 600)))
    s = slot_layout(user_row)
    assert s.user_row.dtype == np.int64 and s.position.dtype == np.int64
    assert len(np.unique(s.position)) == len(user_row) and s.position.max() < s.places
    assert (s.user_row[s.position // s.g] == user_row).all()
    # a user's candidates keep their order, and only its last slot has free places
    for u in np.unique(user_row):
        pos = s.position[user_row == u]
        assert (np.diff(pos) > 0).all()
        assert len(s.user_row[s.user_row == u]) == math.ceil(len(pos) / s.g)
    counts = np.bincount(user_row)
    assert _cost(counts, s.g) == pytest.approx(min(_cost(counts, g) for g in range(1, MAX_SLOT + 1)))


@pytest.mark.parametrize(
    "counts, g",
    [([1] * 50, 1), ([20] * 30, 20), ([200], 25), ([1024], 32), ([16] * 8 + [15], 16)],
)
def test_slot_size_follows_the_candidates_per_user(counts, g):
    user_row = np.repeat(np.arange(len(counts)), counts)
    assert slot_layout(user_row).g == g


def test_spread_pads_with_index_zero_and_collect_undoes_it():
    user_row = np.array([2, 0, 2, 2, 1, 0, 2])
    s = slot_layout(user_row, max_g=3)
    col = np.arange(1, 8, dtype=np.int64) * 10
    laid = s.spread(col)
    assert len(laid) == s.places and (laid[np.setdiff1d(np.arange(s.places), s.position)] == 0).all()
    assert (s.collect(laid) == col).all()


def test_empty_and_single_layouts():
    s = slot_layout(np.zeros(0, np.int64))
    assert s.g == 1 and s.places == 0
    single = slot_layout(np.array([3, 1, 3]))
    col = np.array([7.0, 8.0, 9.0], np.float32)
    assert single.g == 1 and single.spread(col) is col and single.collect(col) is col


def test_slots_never_mix_the_users_own_features():
    user_row = np.repeat([0, 1], [12, 8])
    age = np.where(np.arange(20) % 3 == 0, 5, 7)  # user 0's rows disagree; user 1's too
    age[12:] = 9  # now user 1's agree
    s = slot_layout(user_row, [age])
    assert s.g > 1
    slot_of = s.position // s.g
    assert (s.user_row[slot_of] == user_row).all() and (s.per_slot(age)[slot_of] == age).all()
    assert len(set(zip(s.user_row.tolist(), s.per_slot(age).tolist(), strict=True))) == 3  # user 0 split in two
    same = slot_layout(user_row, [np.full(20, 4)])
    assert (same.user_row == slot_layout(user_row).user_row).all()  # constant features: no split
