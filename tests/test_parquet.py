"""Parquet candidates: `dmrx data parquet` writes the layout of dmrx.data.arrow, `dmrx score` reads it and
gives the same scores as for the .h5 file it came from; bad columns are one line naming the column."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from dmrx.errors import DmrxError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def invoke(*args):
    from typer.testing import CliRunner

    from dmrx.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def parquet_file(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("parquet") / "train.parquet"
    res = invoke("data", "parquet", tiny_data / "train.h5", out, "--json")
    assert res.exit_code == 0, res.output
    return out


def test_histories_match_the_reader(tiny_data, parquet_file):
    """Every column and every history, read back through to_columns, equals what DataFile.batches gives."""
    from dmrx.data.arrow import to_columns
    from dmrx.data.reader import DataFile

    T = 7  # shorter than many histories: truncation to the most recent T is exercised
    table = pq.read_table(parquet_file)
    with DataFile(tiny_data / "train.h5") as data:
        ref = next(data.batches(data.n_rows, T, chunk_rows=data.n_rows))
        fields = data.fields.behaviors
        assert table.num_rows == data.n_rows > 2000
    columns = {k: k.replace("/", "__") for k in ["user", "target/item", "dense/price"]}
    columns.update({f"hist/{f}": f"hist__{f}" for f in fields})
    # a slice with a non-zero offset into the list arrays, as engines hand out
    for lo, hi in [(0, table.num_rows), (333, 1400)]:
        got = to_columns(table.slice(lo, hi - lo), columns, T)
        for key in columns:
            np.testing.assert_array_equal(got[key], ref[key][lo:hi], err_msg=key)
        np.testing.assert_array_equal(got["hist_len"], ref["hist_len"][lo:hi])
    assert table.column("row").to_pylist() == list(range(table.num_rows))
    assert (ref["hist_len"] == T).any() and (ref["hist_len"] < T).any()


def test_score_parquet_equals_score_h5(tiny_data, tiny_run, parquet_file, tmp_path):
    a, b = tmp_path / "h5.scores.h5", tmp_path / "pq.scores.h5"
    for src, out in ((tiny_data / "train.h5", a), (parquet_file, b)):
        res = invoke(
            "score", src, "--model", tiny_run, "--backend", "torch", "--out", out, "--batch-size", 512, "--json"
        )
        assert res.exit_code == 0, res.output
    with h5py.File(a) as x, h5py.File(b) as y:
        assert y["score"].shape == x["score"].shape == (pq.ParquetFile(parquet_file).metadata.num_rows,)
        assert np.abs(x["score"][:] - y["score"][:]).max() <= 1e-6
        assert y.attrs["model_hash"] == x.attrs["model_hash"] and y.attrs["input"] == str(parquet_file.resolve())


def test_default_output_and_summary(tiny_run, parquet_file, tmp_path):
    import json
    import shutil

    src = tmp_path / "c.parquet"
    shutil.copyfile(parquet_file, src)
    res = invoke("score", src, "--model", tiny_run, "--backend", "torch", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["output"] == str(tmp_path / "c.scores.h5") and (tmp_path / "c.scores.h5").exists()
    assert s["users"] == 300 and 0 < s["user_encodings"] < s["rows"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet", "c.scores.h5"]


def test_shards_and_resume_are_for_h5(tiny_run, parquet_file, tmp_path):
    for extra in (["--shard", "0/2"], ["--resume"]):
        res = invoke("score", parquet_file, "--model", tiny_run, "--out", tmp_path / "o.h5", *extra)
        assert res.exit_code == 2 and "Parquet" in res.output, res.output


def _rewrite(src, dst, fn):
    pq.write_table(fn(pq.read_table(src)), dst)
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.drop_columns(["target__cate"]), "lacks column(s) target__cate"),
        (lambda t: t.set_column(t.schema.get_field_index("hist__item"), "hist__item", t.column("user")), "hist__item"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("dense__price"), "dense__price", pa.array(["x"] * t.num_rows)
            ),
            "column dense__price has type string",
        ),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("target__item"),
                "target__item",
                pa.array([None] + t.column("target__item").to_pylist()[1:], pa.int64()),
            ),
            "column target__item row 0: null",
        ),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("hist__cate"),
                "hist__cate",
                pa.array([[1, 2, 3, 4, 5]] * t.num_rows, pa.list_(pa.int64())),
            ),
            "history length",
        ),
    ],
    ids=["missing", "not-a-list", "string-dense", "null", "ragged-fields"],
)
def test_bad_columns_name_the_column(tiny_run, parquet_file, tmp_path, edit, message):
    bad = _rewrite(parquet_file, tmp_path / "bad.parquet", edit)
    res = invoke("score", bad, "--model", tiny_run, "--backend", "torch")
    assert res.exit_code == 2, res.output
    assert message in res.output and str(bad) in res.output.replace("\n", "")
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet"]  # no output, no temporary file


def test_not_a_parquet_file(tiny_run, tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"PAR1 but nothing else")
    res = invoke("score", bad, "--model", tiny_run)
    assert res.exit_code == 2 and "not a readable Parquet file" in res.output


def test_check_schema_accepts_slash_names(tiny_run):
    from dmrx.data.arrow import check_schema
    from dmrx.scoring import Scorer

    spec = Scorer(tiny_run, backend="torch").spec
    fields = [pa.field("user", pa.int32())]
    fields += [pa.field(k, pa.float64() if k.startswith("dense/") else pa.int64()) for k in spec.batch_keys()[:-1]]
    fields += [pa.field(f"hist/{f}", pa.large_list(pa.int32())) for f in spec.behaviors]
    columns = check_schema(pa.schema(fields), spec, "t")
    assert columns["target/item"] == "target/item" and columns["hist/item"] == "hist/item"
    with pytest.raises(DmrxError, match="t: lacks column"):
        check_schema(pa.schema(fields[1:]), spec, "t")


def test_history_runs_mark_consecutive_equal_histories():
    from dmrx.data.arrow import history_runs

    a, b = [0, 0, 5, 6], [0, 0, 0, 7]
    hist = np.array([a, a, b, a, a])
    seq, end = history_runs([hist, hist * 2], np.array([2, 2, 1, 2, 3]))  # the last row: same ids, other length
    assert seq.tolist() == [0, 0, 1, 2, 3] and not end.any()
