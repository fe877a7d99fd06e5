"""`dmrx data csv`: a flat table with delimiter-joined history columns (FuxiCTR layout) -> one dmrx file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.data.importers.tabular import default_pairs, hash_id, import_csv, parse_mapping
from dmrx.data.reader import DataFile

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FUXI = SHARED / "alimama-fixtures" / "train_sample.csv"

TABLE = """user_id,item_id,cate_id,hist_item_id,hist_cate_id,label,price,pid,age
7,100,10,,,1,2.5,a_1,3
7,101,11,100,10,0,1.0,a_1,
7,102,12,100^101,10^11,1,0.5,b_2,3
8,100,10,103^104,13^14,0,4,a_1,1
8,105,15,103,13,1,8,a_1,1
"""


def read_rows(path: Path, max_len: int = 50) -> list[dict]:
    rows = []
    with DataFile(path) as f:
        for b in f.batches(batch_size=1024, max_len=max_len):
            for i in range(len(b["user"])):
                n = int(b["hist_len"][i])
                row = {k: v[i].item() for k, v in b.items() if v.ndim == 1}
                row.update({k: v[i, max_len - n :].tolist() for k, v in b.items() if v.ndim == 2})
                rows.append(row)
    return rows


def run(*args: str):
    return CliRunner().invoke(app, ["data", "csv", *map(str, args)])


def test_defaults_exact(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text(TABLE)
    result = run(
        src, tmp_path / "o.h5", "--profile", "age", "--context", "pid", "--hash", "pid", "--dense", "price", "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 5 and summary["history"] == {"item": "hist_item_id", "cate": "hist_cate_id"}
    # rows 1-3 of user 7 extend each other: one stored sequence; user 8's rows do not
    assert summary["sequences"] == 3 and summary["behaviors"] == 2 + 2 + 1
    rows = read_rows(tmp_path / "o.h5")
    assert [r["user"] for r in rows] == [7, 7, 7, 8, 8]
    assert [r["hist/item"] for r in rows] == [[], [100], [100, 101], [103, 104], [103]]
    assert [r["hist/cate"] for r in rows] == [[], [10], [10, 11], [13, 14], [13]]
    assert [r["target/item"] for r in rows] == [100, 101, 102, 100, 105]
    assert [r["target/cate"] for r in rows] == [10, 11, 12, 10, 15]
    assert [r["label"] for r in rows] == [1, 0, 1, 0, 1]
    assert [r["profile/age"] for r in rows] == [3, 0, 3, 1, 1]  # empty -> 0
    assert [r["context/pid"] for r in rows] == [hash_id(p) for p in ("a_1", "a_1", "b_2", "a_1", "a_1")]
    assert [r["dense/price"] for r in rows] == [2.5, 1.0, 0.5, 4.0, 8.0]
    with DataFile(tmp_path / "o.h5") as f:
        assert f.fields.behaviors == ("cate", "item") and f.fields.target == ("cate", "item")
        assert f.offsets.tolist() == [0, 2, 4, 5]


def test_no_sharing_across_chunks_still_exact(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text(TABLE)
    import_csv(src, tmp_path / "a.h5", chunk_rows=1, label=None, profile=["age"])
    rows = read_rows(tmp_path / "a.h5")
    assert [r["hist/item"] for r in rows] == [[], [100], [100, 101], [103, 104], [103]]
    assert "label" not in rows[0]
    with DataFile(tmp_path / "a.h5") as f:
        assert f.n_sequences == 5 and not f.fields.has_label


def test_explicit_mapping_tab_and_quotes(tmp_path):
    src = tmp_path / "t.tsv"
    src.write_text('uid\tclick\tad\thist\n1\t1\t"5"\t"1|2|3"\n2\t0\t6\t\n')
    result = run(
        src,
        tmp_path / "o.h5",
        "--user-column",
        "uid",
        "--label",
        "click",
        "--target",
        "item=ad",
        "--history",
        "item=hist",
        "--sep",
        "|",
        "--delimiter",
        "tab",
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "o.h5")
    assert [(r["user"], r["target/item"], r["hist/item"], r["label"]) for r in rows] == [
        (1, 5, [1, 2, 3], 1.0),
        (2, 6, [], 0.0),
    ]


def test_helpers():
    assert parse_mapping("item=item_id, cate = cate_id,brand", "--target") == {
        "item": "item_id",
        "cate": "cate_id",
        "brand": "brand",
    }
    assert default_pairs(["user_id", "item_id", "hist_item_id", "hist_brand_id", "cate_id"]) == {
        "item": ("item_id", "hist_item_id")
    }
    assert hash_id("") == 0 and hash_id("430548_1007") == hash_id("430548_1007") > 0


@pytest.mark.skipif(not FUXI.exists(), reason="no shared alimama fixtures")
def test_fuxictr_fixture(tmp_path):
    profile = (
        "cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,new_user_class_level"
    )
    result = run(
        FUXI,
        tmp_path / "o.h5",
        "--user-column",
        "userid",
        "--label",
        "clk",
        "--history",
        "item=click_sequence",
        "--target",
        "item=adgroup_id,cate=cate_id,brand=brand,campaign=campaign_id,customer=customer",
        "--profile",
        profile,
        "--context",
        "pid",
        "--hash",
        "pid,time_stamp",
        "--dense",
        "price",
    )
    assert result.exit_code == 0, result.output
    with open(FUXI, newline="") as f:
        want = list(csv.DictReader(f))
    rows = read_rows(tmp_path / "o.h5", max_len=50)
    assert len(rows) == len(want) == 100
    for r, w in zip(rows, want, strict=True):
        assert r["user"] == int(w["userid"]) and r["label"] == float(w["clk"])
        assert r["hist/item"] == [int(x) for x in w["click_sequence"].split("^") if x][-50:]
        assert r["target/item"] == int(w["adgroup_id"]) and r["target/brand"] == int(w["brand"] or 0)
        assert r["profile/pvalue_level"] == int(w["pvalue_level"] or 0)
        assert r["context/pid"] == hash_id(w["pid"])
        assert r["dense/price"] == pytest.approx(float(w["price"]))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {"user_id": [1, 1, 2], "item_id": [5, 6, 7], "hist_item_id": [[], [5], [1, 2]], "label": [1, 0, 1]}
    )
    pq.write_table(table, tmp_path / "t.parquet")
    summary = import_csv(tmp_path / "t.parquet", tmp_path / "o.h5")
    assert summary["rows"] == 3 and summary["sequences"] == 2
    rows = read_rows(tmp_path / "o.h5")
    assert [r["hist/item"] for r in rows] == [[], [5], [1, 2]]


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    result = run(tmp_path / "t.parquet", tmp_path / "o.h5")
    assert result.exit_code == 2 and "t.parquet: reading Parquet needs pyarrow" in result.output
    assert not (tmp_path / "o.h5").exists()


# ---- bad input --------------------------------------------------------------------------------------------
HEADER = "user_id,item_id,hist_item_id,label,price\n"
BAD = [
    ("field count", HEADER + "1,2,,1,1.0\n1,3,2,0\n", [], "t.csv: line 3: expected 5 fields"),
    ("bad user", HEADER + "1,2,,1,1.0\nu1,3,2,0,1.0\n", [], "t.csv: line 3, column user_id: 'u1'"),
    ("bad history", HEADER + "1,2,,1,1.0\n\n1,3,2^x,0,1.0\n", [], "t.csv: line 4, column hist_item_id: 'x'"),
    ("empty element", HEADER + "1,2,4^^5,1,1.0\n", [], "t.csv: line 2, column hist_item_id: empty value"),
    ("negative target", HEADER + "1,-2,,1,1.0\n", [], "t.csv: line 2, column item_id: '-2'"),
    ("bad label", HEADER + "1,2,,yes,1.0\n", [], "t.csv: line 2, column label: 'yes' is not a 0/1 label"),
    ("bad dense", HEADER + "1,2,,1,1.0\n1,2,,1,\n", ["--dense", "price"], "t.csv: line 3, column price"),
    ("inf dense", HEADER + "1,2,,1,inf\n", ["--dense", "price"], "t.csv: line 2, column price: 'inf'"),
    (
        "missing column",
        HEADER + "1,2,,1,1.0\n",
        ["--profile", "age,gender"],
        "t.csv: line 1: missing column(s) age, gender",
    ),
    ("no pairs", "user_id,item,label\n1,2,1\n", [], "t.csv: no history columns"),
    ("header only", HEADER, [], "t.csv: no data rows"),
    ("empty file", "", [], "t.csv: empty file"),
    (
        "unequal histories",
        "user_id,item_id,cate_id,hist_item_id,hist_cate_id,label\n1,2,3,4^5,6,1\n",
        [],
        "t.csv: line 2: history column hist_cate_id has 1 elements, hist_item_id has 2",
    ),
    ("huge id", HEADER + "1,12345678901234567890,,1,1.0\n", [], "t.csv: line 2, column item_id"),
    ("bad quote", HEADER + '1,2,"4,1,1.0\n', [], "t.csv: line 2"),
]


@pytest.mark.parametrize("case,text,extra,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, case, text, extra, message):
    src = tmp_path / "t.csv"
    src.write_text(text)
    out = tmp_path / "out" / "o.h5"
    result = run(src, out, *extra, "--chunk-rows", "1")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert src.read_text() == text


def test_missing_file(tmp_path):
    result = run(tmp_path / "nope.csv", tmp_path / "o.h5")
    assert result.exit_code == 2 and "nope.csv: no such file" in result.output


def test_bad_options(tmp_path):
    src = tmp_path / "t.csv"
    src.write_text(TABLE)
    for args, message in (
        (["--target", "it em=item_id"], "--target: 'it em' is not a valid field name"),
        (["--sep", ","], "must differ from the delimiter"),
        (["--history", "item="], "--history: field item names no column"),
    ):
        result = run(src, tmp_path / "o.h5", *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "o.h5").exists()
