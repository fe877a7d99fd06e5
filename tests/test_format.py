"""The dmrx data format: exact round trips, history assembly against a naive reference, bad inputs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmrx.data.format import Writer, write_dataset
from dmrx.data.reader import DataFile, HistoryReader, _merged_slices
from dmrx.data.vocab import Vocab
from dmrx.errors import DmrxError

FIELDS = ["item", "cate"]


# ---- helpers -----------------------------------------------------------------------------------------------
def make_data(rng: np.random.Generator, n_seq: int, n_ex: int, max_seq_len: int = 12, big: bool = False):
    """Random sequences and examples; `big` mixes in ids beyond int32 (the reader's int64 path)."""
    lengths = rng.integers(0, max_seq_len + 1, n_seq)
    nnz = int(lengths.sum())
    high = 1 << 40 if big else 1000
    behaviors = {"item": rng.integers(0, high, nnz), "cate": rng.integers(0, 50, nnz)}
    seq = rng.integers(0, n_seq, n_ex)
    end = np.floor(rng.random(n_ex) * (lengths[seq] + 1)).astype(np.int64)
    examples = dict(
        seq=seq,
        end=end,
        user=rng.integers(0, 100, n_ex),
        label=rng.integers(0, 2, n_ex).astype(np.int8),
        prob=rng.random(n_ex).astype(np.float32),
        profile={"age": rng.integers(1, 8, n_ex)},
        target={"item": rng.integers(0, high, n_ex), "cate": rng.integers(0, 50, n_ex)},
        context={"row": np.arange(n_ex)},  # identifies rows in shuffled batches
        dense={"price": rng.normal(size=n_ex).astype(np.float32)},
    )
    return behaviors, lengths, examples


def reference_history(behaviors, lengths, seq, end, max_len):
    """Per field [n, max_len]: right-aligned, most recent last, zeros on the left: one row at a time."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = {f: np.zeros((len(seq), max_len), np.int64) for f in behaviors}
    for i, (s, e) in enumerate(zip(seq.tolist(), end.tolist(), strict=True)):
        visible = min(e, max_len)
        for f, values in behaviors.items():
            row = list(values[offsets[s] + e - visible : offsets[s] + e])
            out[f][i] = [0] * (max_len - visible) + row
    return out


def check_batch(batch, ref, examples, max_len, encode=None):
    rows = batch["context/row"] if encode is None else batch["context/row"] // 2  # see encoder below
    assert batch["hist_len"].tolist() == np.minimum(examples["end"][rows], max_len).tolist()
    for f, hist in ref.items():
        got = batch[f"hist/{f}"]
        assert got.dtype == np.int64 and got.shape == (len(rows), max_len)
        visible = np.arange(max_len) >= max_len - batch["hist_len"][:, None]
        want = hist[rows] if encode is None else np.where(visible, encode(hist[rows]), 0)
        np.testing.assert_array_equal(got, want)
    for g in ("profile", "target"):
        for f, v in examples[g].items():
            want = v[rows] if encode is None else encode(v[rows])
            np.testing.assert_array_equal(batch[f"{g}/{f}"], want)
    np.testing.assert_array_equal(batch["dense/price"], examples["dense"]["price"][rows])
    np.testing.assert_array_equal(batch["label"], examples["label"][rows].astype(np.float32))
    return rows


@pytest.fixture
def small_file(tmp_path):
    rng = np.random.default_rng(0)
    behaviors, lengths, examples = make_data(rng, 20, 50)
    path = tmp_path / "small.h5"
    write_dataset(path, behaviors, lengths, examples, attrs={"source": "test"})
    return path, behaviors, lengths, examples


# ---- round trip --------------------------------------------------------------------------------------------
def test_round_trip_exact_with_chunked_writes(tmp_path):
    rng = np.random.default_rng(1)
    behaviors, lengths, examples = make_data(rng, 30, 80, big=True)
    path = tmp_path / "rt.h5"
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with Writer(path, FIELDS, attrs={"source": "unit", "seed": 3}) as w:
        for a, b in ((0, 10), (10, 10), (10, 30)):  # includes an empty chunk
            part = {f: v[offsets[a] : offsets[b]] for f, v in behaviors.items()}
            first = w.add_sequences(lengths[a:b], **part)
            assert first == a
        for a, b in ((0, 33), (33, 33), (33, 80)):
            part = {
                k: ({f: x[a:b] for f, x in v.items()} if isinstance(v, dict) else v[a:b]) for k, v in examples.items()
            }
            w.add_examples(**part)
    with DataFile(path) as d:
        assert d.n_rows == 80 and d.n_sequences == 30 and d.n_behaviors == int(lengths.sum())
        assert d.attrs["source"] == "unit" and d.attrs["seed"] == 3 and d.attrs["schema_version"] == 1
        f = d.fields
        assert f.behaviors == ("cate", "item") and f.profile == ("age",) and f.target == ("cate", "item")
        assert f.context == ("row",) and f.dense == ("price",) and f.has_label and f.has_prob
        np.testing.assert_array_equal(d.offsets, offsets)
        for name, v in behaviors.items():
            np.testing.assert_array_equal(d._read(f"behaviors/{name}"), v)
        cols = d.read_columns(0, 80)
        for k in ("seq", "end", "user"):
            np.testing.assert_array_equal(cols[k], examples[k])
            assert cols[k].dtype == np.int64
        for g in ("profile", "target", "context", "dense"):
            for name, v in examples[g].items():
                np.testing.assert_array_equal(cols[f"{g}/{name}"], v)
        np.testing.assert_array_equal(cols["label"], examples["label"])
        np.testing.assert_array_equal(cols["prob"], examples["prob"])  # float32 both ways: exact
        # a middle slice and a column subset
        part = d.read_columns(17, 41, ["user", "dense/price"])
        assert list(part) == ["user", "dense/price"]
        np.testing.assert_array_equal(part["user"], examples["user"][17:41])


def test_writer_takes_plain_lists_and_optional_groups(tmp_path):
    path = tmp_path / "lists.h5"
    with Writer(path, ["item"]) as w:
        w.add_sequences([], item=[])  # an empty chunk given as Python lists
        w.add_sequences([2, 0, 1], item=[5, 6, 7])
        w.add_examples(seq=[0, 2, 1], end=[2, 1, 0], user=[1, 2, 3])
    with DataFile(path) as d:
        assert d.fields.profile == d.fields.target == d.fields.dense == ()
        assert not d.fields.has_label and not d.fields.has_prob
        (batch,) = list(d.batches(batch_size=8, max_len=3))
        assert batch["hist/item"].tolist() == [[0, 5, 6], [0, 0, 7], [0, 0, 0]]
        assert batch["hist_len"].tolist() == [2, 1, 0]


# ---- history assembly against the naive reference ----------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data_seed=st.integers(0, 2**32 - 1),
    n_seq=st.integers(1, 12),
    n_ex=st.integers(0, 70),
    max_len=st.integers(1, 9),
    batch_size=st.integers(1, 9),
    chunk_rows=st.integers(1, 40),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    start_batch=st.integers(0, 4),
    world=st.integers(1, 3),
    big=st.booleans(),
    merge_gap=st.sampled_from([0, 4, 1 << 16]),
)
def test_batches_match_naive_reference(
    data_seed, n_seq, n_ex, max_len, batch_size, chunk_rows, shuffle, seed, start_batch, world, big, merge_gap
):
    rng = np.random.default_rng(data_seed)
    behaviors, lengths, examples = make_data(rng, n_seq, n_ex, big=big)
    ref = reference_history(behaviors, lengths, examples["seq"], examples["end"], max_len)
    tmp = Path(tempfile.mkdtemp())
    try:
        write_dataset(tmp / "d.h5", behaviors, lengths, examples)
        # merge_gap: how far apart two needed behaviour ranges may be and still be read as one slice
        with mock.patch("dmrx.data.reader._MERGE_GAP", merge_gap), DataFile(tmp / "d.h5") as d:
            kw = dict(batch_size=batch_size, max_len=max_len, shuffle=shuffle, seed=seed, chunk_rows=chunk_rows)
            everything = list(d.batches(**kw))
            assert len(everything) == d.n_batches(batch_size, chunk_rows)
            seen = [check_batch(b, ref, examples, max_len) for b in everything]
            rows = np.concatenate(seen) if seen else np.zeros(0, np.int64)
            assert sorted(rows.tolist()) == list(range(n_ex))  # every row exactly once
            if not shuffle:
                assert rows.tolist() == list(range(n_ex))  # file order
            assert all(1 <= len(r) <= batch_size for r in seen)
            # resuming and sharding pick exactly the batches of the full pass, same rows in the same order
            union = []
            for rank in range(world):
                got = list(d.batches(**kw, start_batch=start_batch, shard=(rank, world)))
                want = [r for i, r in enumerate(seen) if i >= start_batch and i % world == rank]
                assert len(got) == len(want)
                for b, r in zip(got, want, strict=True):
                    np.testing.assert_array_equal(check_batch(b, ref, examples, max_len), r)
                union += [b["context/row"] for b in got]
            want_rows = sorted(np.concatenate(seen[start_batch:]).tolist()) if seen[start_batch:] else []
            assert sorted(np.concatenate(union).tolist() if union else []) == want_rows
            if shuffle:  # the same seed and epoch repeat exactly
                again = [b["context/row"] for b in d.batches(**kw)]
                assert all(np.array_equal(a, r) for a, r in zip(again, seen, strict=True))
            # distinct histories: each (seq, end) of a batch once, and user_row recovers every example's
            for full, b in zip(everything, d.batches(**kw, distinct_histories=True), strict=True):
                rows = b["context/row"]
                pairs = set(zip(examples["seq"][rows].tolist(), examples["end"][rows].tolist(), strict=True))
                assert len(b["hist_len"]) == len(pairs) and b["user_row"].shape == rows.shape
                for k in ("hist_len", *[k for k in full if k.startswith("hist/")]):
                    np.testing.assert_array_equal(b[k][b["user_row"]], full[k])
    finally:
        shutil.rmtree(tmp)


def test_epochs_and_seeds_reshuffle(small_file):
    with DataFile(small_file[0]) as d:

        def order(**kw):
            return np.concatenate([b["context/row"] for b in d.batches(batch_size=5, shuffle=True, **kw)])

        assert not np.array_equal(order(epoch=0), order(epoch=1))
        assert not np.array_equal(order(seed=0), order(seed=1))
        assert np.array_equal(order(seed=2, epoch=3), order(seed=2, epoch=3))


@pytest.mark.parametrize("shuffle", [False, True])
def test_encoder_hook_applied_once_and_consistently(small_file, shuffle):
    path, behaviors, lengths, examples = small_file
    calls = []

    def encoder(key, raw):
        calls.append(key)
        return raw * 2 + 1  # never 0, so padding stays distinguishable; context/row becomes 2*row+1

    ref = reference_history(behaviors, lengths, examples["seq"], examples["end"], 6)
    with DataFile(path) as d:
        total = 0
        for b in d.batches(batch_size=7, max_len=6, shuffle=shuffle, encoder=encoder, chunk_rows=14):
            rows = check_batch(b, ref, examples, 6, encode=lambda x: x * 2 + 1)
            np.testing.assert_array_equal(b["user"], examples["user"][rows] * 2 + 1)
            total += len(rows)
    assert total == 50
    # integer columns and behaviour fields go through the hook; seq/end/label/prob/dense never do
    assert set(calls) == {"hist/item", "hist/cate", "user", "profile/age", "target/item", "target/cate", "context/row"}
    assert calls.count("user") == 4  # once per chunk (50 rows, chunks of 14), not per batch


def test_vocab_encoder_through_reader(small_file):
    path, behaviors, lengths, examples = small_file
    vocab = Vocab.build(values=behaviors["item"][: len(behaviors["item"]) // 2])  # half the ids are unknown
    ref = reference_history(behaviors, lengths, examples["seq"], examples["end"], 5)
    with DataFile(path) as d:
        for b in d.batches(
            batch_size=9,
            max_len=5,
            shuffle=True,
            encoder=lambda k, v: vocab.encode(v) if k in ("hist/item", "target/item") else v,
        ):
            rows = b["context/row"]
            visible = np.arange(5) >= 5 - b["hist_len"][:, None]
            want = np.where(visible, vocab.encode(ref["item"][rows]), 0)
            np.testing.assert_array_equal(b["hist/item"], want)
            np.testing.assert_array_equal(b["hist/cate"], ref["cate"][rows])


def test_keys_and_behavior_fields_select(small_file):
    path, behaviors, lengths, examples = small_file
    with DataFile(path) as d:
        b = next(d.batches(batch_size=50, max_len=4, keys=["user", "label"], behavior_fields=["cate"]))
        assert set(b) == {"user", "label", "hist/cate", "hist_len"}
        np.testing.assert_array_equal(b["user"], examples["user"])
        with pytest.raises(DmrxError, match="no such field or column: nope"):
            next(d.batches(behavior_fields=["nope"]))
        with pytest.raises(DmrxError, match="target/nope"):
            next(d.batches(keys=["target/nope"]))


def test_empty_files_read_as_zero_batches(tmp_path):
    with Writer(tmp_path / "nothing.h5", ["item"]):
        pass
    write_dataset(
        tmp_path / "no_examples.h5", {"item": [1, 2, 3]}, [3], dict(seq=[], end=[], user=[], target={"item": []})
    )
    for name in ("nothing.h5", "no_examples.h5"):
        with DataFile(tmp_path / name) as d:
            assert d.n_rows == 0
            assert d.n_batches(256) == 0
            assert list(d.batches(batch_size=4, shuffle=True)) == []
            assert d.read_columns(0, 0)["user"].shape == (0,)


def test_all_histories_empty_and_all_full(tmp_path):
    write_dataset(
        tmp_path / "e.h5",
        {"item": np.arange(1, 11)},
        [10],
        dict(seq=[0, 0, 0, 0], end=[0, 0, 10, 3], user=[1, 1, 1, 1]),
    )
    with DataFile(tmp_path / "e.h5") as d:
        b = next(d.batches(batch_size=2, max_len=4))
        assert b["hist/item"].tolist() == [[0, 0, 0, 0]] * 2 and b["hist_len"].tolist() == [0, 0]
        b = list(d.batches(batch_size=4, max_len=4))[0]
        assert b["hist/item"][2:].tolist() == [[7, 8, 9, 10], [0, 1, 2, 3]]


# ---- HistoryReader: histories by (seq, end) -----------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data_seed=st.integers(0, 2**32 - 1),
    n_seq=st.integers(1, 12),
    n_req=st.integers(0, 40),
    max_len=st.integers(1, 9),
    merge_gap=st.sampled_from([0, 1, 4, 1 << 16]),
    seen=st.sampled_from([None, "item", "cate"]),
    fields=st.sampled_from([["item", "cate"], ["cate"]]),
    encode=st.booleans(),
    big=st.booleans(),
)
def test_history_reader_matches_naive_reference(data_seed, n_seq, n_req, max_len, merge_gap, seen, fields, encode, big):
    """Windows as DataFile.batches builds them and each history's visible ids, for (seq, end) in any order
    (repeats, empty and whole sequences included), whatever slices the merge gap reads them in."""
    rng = np.random.default_rng(data_seed)
    behaviors, lengths, examples = make_data(rng, n_seq, 0, big=big)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seq = rng.integers(0, n_seq, n_req)
    end = np.floor(rng.random(n_req) * (lengths[seq] + 1)).astype(np.int64)
    end[: n_req // 4] = lengths[seq[: n_req // 4]]  # some whole sequences
    ref = reference_history(behaviors, lengths, seq, end, max_len)
    enc = (lambda key, raw: raw * 2 + 1) if encode else None  # never 0: padding stays distinguishable
    tmp = Path(tempfile.mkdtemp())
    try:
        write_dataset(tmp / "d.h5", behaviors, lengths, examples)
        with (
            mock.patch("dmrx.data.reader._MERGE_GAP", merge_gap),
            HistoryReader(tmp / "d.h5", fields, max_len, enc, seen) as reader,
        ):
            batch, got_seen = reader.read(seq, end)
    finally:
        shutil.rmtree(tmp)
    assert list(batch) == [f"hist/{f}" for f in fields] + ["hist_len"]
    assert batch["hist_len"].tolist() == np.minimum(end, max_len).tolist()
    real = np.arange(max_len) >= max_len - batch["hist_len"][:, None]
    for f in fields:
        assert batch[f"hist/{f}"].dtype == np.int64 and batch[f"hist/{f}"].shape == (n_req, max_len)
        want = np.where(real, ref[f] * 2 + 1, 0) if encode else ref[f]
        np.testing.assert_array_equal(batch[f"hist/{f}"], want)
    if seen is None:
        assert got_seen is None
    else:
        assert len(got_seen) == n_req
        for s, e, ids in zip(seq.tolist(), end.tolist(), got_seen, strict=True):
            want = behaviors[seen][offsets[s] : offsets[s] + e]
            assert ids.dtype == np.int64
            np.testing.assert_array_equal(ids, want * 2 + 1 if encode else want)


@pytest.mark.parametrize("gap, slices", [(0, [(0, 3), (5, 8)]), (1, [(0, 3), (5, 8)]), (2, [(0, 8)])])
def test_merged_slices_read_through_gaps_up_to_the_merge_gap(gap, slices):
    """Rows 3 and 4 lie between the ranges: a gap of 2 rows is read through once _MERGE_GAP reaches 2."""
    lo, hi = np.array([5, 0]), np.array([8, 3])
    with mock.patch("dmrx.data.reader._MERGE_GAP", gap):
        got, raw = _merged_slices(lo, hi)
    assert got == slices
    rows = np.concatenate([np.arange(a, b) for a, b in got])
    for i in range(len(lo)):  # each range is found where raw says, whole
        np.testing.assert_array_equal(rows[raw[i] : raw[i] + hi[i] - lo[i]], np.arange(lo[i], hi[i]))


def test_merged_slices_overlapping_nested_and_repeated_ranges():
    lo, hi = np.array([10, 2, 4, 2, 12, 30]), np.array([14, 9, 6, 9, 13, 31])
    with mock.patch("dmrx.data.reader._MERGE_GAP", 0):
        got, raw = _merged_slices(lo, hi)
    assert got == [(2, 9), (10, 14), (30, 31)]  # [4, 6) and [12, 13) nest in their neighbours
    assert raw.tolist() == [7, 0, 2, 0, 9, 11]


def test_history_reader_refuses_bad_requests(small_file):
    path = small_file[0]
    with pytest.raises(DmrxError, match="lacks behaviors/brand"):
        HistoryReader(path, ["item"], 4, seen_field="brand")
    with HistoryReader(path, ["item"], 4) as reader:
        n_seq, seq_len = reader.data.n_sequences, int(reader.data.offsets[1])
        with pytest.raises(DmrxError, match="sequence index out of range"):
            reader.read(np.array([n_seq]), np.array([0]))
        with pytest.raises(DmrxError, match="outside its sequence"):
            reader.read(np.array([0]), np.array([seq_len + 1]))
        batch, seen = reader.read(np.zeros(0, np.int64), np.zeros(0, np.int64))
        assert batch["hist/item"].shape == (0, 4) and seen is None


# ---- Vocab -------------------------------------------------------------------------------------------------
def test_vocab_encode_decode():
    v = Vocab(np.array([3, 5, 9]))
    assert len(v) == 4
    assert v.encode(np.array([3, 5, 9, 4, 0, -1, 10, 1 << 50])).tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert v.decode(np.array([1, 2, 3, 0, 4, -2])).tolist() == [3, 5, 9, -1, -1, -1]
    assert v.encode(np.array([[9, 3], [7, 5]])).tolist() == [[3, 1], [0, 2]]  # shape kept
    empty = Vocab(np.zeros(0, np.int64))
    assert len(empty) == 1 and empty.encode(np.array([1, 2])).tolist() == [0, 0]
    assert empty.decode(np.array([0, 1])).tolist() == [-1, -1]
    assert Vocab.build(values=np.array([7, 3, 7, 7, 3, 1]), min_count=2).ids.tolist() == [3, 7]
    with pytest.raises(ValueError):
        Vocab(np.array([3, 3]))


@settings(max_examples=40, deadline=None)
@given(ids=st.sets(st.integers(0, 5000), max_size=60), raw=st.lists(st.integers(-10, 6000), max_size=80))
def test_vocab_table_and_searchsorted_paths_agree(ids, raw):
    ids = np.array(sorted(ids), np.int64)
    dense = Vocab(ids)
    huge = Vocab(np.concatenate([ids, [1 << 62]]))  # one huge id: no lookup table, binary search
    assert dense._table is not None or len(ids) == 0
    assert huge._table is None
    raw = np.array(raw, np.int64)
    np.testing.assert_array_equal(dense.encode(raw), huge.encode(raw))
    np.testing.assert_array_equal(dense.decode(dense.encode(raw)), np.where(np.isin(raw, ids), raw, -1))
    assert huge.encode(np.array([1 << 62]))[0] == len(ids) + 1
    assert huge.decode(np.array([len(ids) + 1]))[0] == 1 << 62


# ---- bad inputs through DataFile ---------------------------------------------------------------------------
def _edit(path, fn):
    with h5py.File(path, "a") as h5:
        fn(h5)


def _replace(name, data):
    def fn(h5):
        del h5[name]
        h5[name] = data

    return fn


def _set(name, index, value):
    def fn(h5):
        arr = h5[name][:]
        arr[index] = value
        h5[name][:] = arr

    return fn


def _read_all(path):
    with DataFile(path) as d:
        for _ in d.batches(batch_size=8, max_len=5):
            pass
        d.read_columns(0, d.n_rows)


BAD_FILES = {
    # name: (edit, expected message parts)
    "missing dataset": (lambda h5: h5.__delitem__("examples/end"), ["missing dataset examples/end"]),
    "float ids": (_replace("examples/user", np.arange(50, dtype=np.float64)), ["examples/user", "integer", "float64"]),
    "2-D behaviours": (_replace("behaviors/item", np.zeros((5, 2), np.int64)), ["behaviors/item", "one-dimensional"]),
    "wrong row count": (_replace("examples/target/item", np.zeros(49, np.int64)), ["examples/target/item", "49 rows"]),
    "end beyond sequence": (_set("examples/end", 7, 10_000), ["examples/end row 7", "beyond"]),
    "seq out of range": (_set("examples/seq", 11, 999), ["examples/seq row 11", "does not exist"]),
    "negative example id": (_set("examples/target/item", 3, -5), ["examples/target/item row 3", "negative"]),
    "negative behaviour id": (_set("behaviors/cate", 4, -1), ["behaviors/cate row 4", "negative"]),
    "NaN dense": (_set("examples/dense/price", 2, np.nan), ["examples/dense/price row 2", "finite"]),
    "bad label": (_set("examples/label", 5, 3), ["examples/label row 5", "not 0 or 1"]),
    "offsets decrease": (_set("behaviors/offsets", 6, 0), ["behaviors/offsets row", "decrease"]),
    "offsets not from 0": (_set("behaviors/offsets", 0, 1), ["behaviors/offsets", "start with 0"]),
    "schema version": (lambda h5: h5.attrs.__setitem__("schema_version", 2), ["schema_version 2"]),
    "schema version text": (lambda h5: h5.attrs.__setitem__("schema_version", "one"), ["schema_version"]),
    "no format attr": (lambda h5: h5.attrs.__delitem__("dmrx_format"), ["not a dmrx data file"]),
    "group is a dataset": (_replace("examples/dense", np.zeros(50, np.float32)), ["examples/dense"]),
    "missing group": (lambda h5: h5.__delitem__("behaviors"), ["missing group /behaviors"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_names_file_dataset_and_row(small_file, case):
    path = small_file[0]
    edit, parts = BAD_FILES[case]
    _edit(path, edit)
    with pytest.raises(DmrxError) as err:
        _read_all(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    for p in parts:
        assert p in msg
    assert "\n" not in msg


def test_not_hdf5_and_missing(tmp_path):
    bad = tmp_path / "notes.h5"
    bad.write_text("user,item\n1,2\n")
    with pytest.raises(DmrxError, match="not an HDF5 file") as err:
        DataFile(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(DmrxError, match="no such file"):
        DataFile(tmp_path / "absent.h5")


@pytest.mark.parametrize("keep", [0.5, 0.98, 0.1])
def test_truncated_file(small_file, keep):
    path = small_file[0]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DmrxError, match="truncated") as err:
        _read_all(path)
    assert str(path) in str(err.value)


def test_corrupt_chunk_names_dataset(small_file):
    path = small_file[0]
    with h5py.File(path, "r") as h5:
        info = h5["behaviors/item"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:  # overwrite the compressed chunk with garbage
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with pytest.raises(DmrxError) as err:
        _read_all(path)
    assert str(path) in str(err.value) and "behaviors/item" in str(err.value)


# ---- bad inputs through the Writer -------------------------------------------------------------------------
def _ok_examples(**over):
    ex = dict(
        seq=[0, 1],
        end=[2, 1],
        user=[1, 2],
        label=[1, 0],
        prob=[0.5, 0.25],
        target={"item": [3, 8]},
        dense={"price": [1.0, 2.0]},
    )
    ex.update(over)
    return ex


BAD_WRITES = {
    "negative behaviour": (dict(item=[1, -2, 3, 7, 8]), {}, ["behaviors/item row 1", "negative"]),
    "float behaviour": (dict(item=[1.0, 2, 3, 7, 8]), {}, ["behaviors/item", "integer", "float64"]),
    "2-D behaviour": (dict(item=[[1, 2, 3, 7, 8]]), {}, ["behaviors/item", "one-dimensional"]),
    "short behaviour": (dict(item=[1, 2, 3]), {}, ["behaviors/item", "3 rows"]),
    "negative target": ({}, dict(target={"item": [3, -8]}), ["examples/target/item row 1", "negative"]),
    "float user": ({}, dict(user=[1.5, 2.0]), ["examples/user", "integer"]),
    "end beyond": ({}, dict(end=[2, 5]), ["examples/end row 1", "beyond"]),
    "unknown seq": ({}, dict(seq=[0, 9]), ["examples/seq row 1", "not added"]),
    "NaN dense": ({}, dict(dense={"price": [1.0, np.nan]}), ["examples/dense/price row 1", "finite"]),
    "2-D dense": ({}, dict(dense={"price": [[1.0], [2.0]]}), ["examples/dense/price", "one-dimensional"]),
    "bad label": ({}, dict(label=[1, 2]), ["examples/label row 1", "not 0 or 1"]),
    "NaN prob": ({}, dict(prob=[np.nan, 0.5]), ["examples/prob row 0", "finite"]),
    "prob above 1": ({}, dict(prob=[0.5, 1.5]), ["examples/prob row 1", "[0, 1]"]),
    "ragged": ({}, dict(user=[1, 2, 3]), ["examples/user", "3 rows"]),
}


@pytest.mark.parametrize("case", sorted(BAD_WRITES))
def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path, case):
    beh, ex, parts = BAD_WRITES[case]
    path = tmp_path / "out.h5"
    with pytest.raises(DmrxError) as err:
        write_dataset(path, {"item": [1, 2, 3, 7, 8], **beh}, [3, 2], _ok_examples(**ex))
    msg = str(err.value)
    assert msg.startswith(f"{path}: ")
    for p in parts:
        assert p in msg
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no partial output, no temporary left


def test_writer_changed_fields_and_failed_finish(tmp_path, monkeypatch):
    path = tmp_path / "out.h5"
    with pytest.raises(DmrxError, match="differ"):
        with Writer(path, ["item"]) as w:
            w.add_sequences([1], item=[1])
            w.add_examples(seq=[0], end=[1], user=[1], label=[1])
            w.add_examples(seq=[0], end=[1], user=[1])
    with pytest.raises(DmrxError, match="differ"):
        with Writer(path, ["item"]) as w:
            w.add_sequences([1], cate=[1])

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(Writer, "_finish", boom)
    with pytest.raises(OSError, match="disk full"):
        with Writer(path, ["item"]) as w:
            w.add_sequences([1], item=[1])
    assert list(tmp_path.iterdir()) == []  # a failure while finishing must not publish the file
