"""`dmrx data alimama`: the raw Tianchi files -> train.h5 (first 7 days) and test.h5 (last day)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.data.importers.alimama import PROFILE_FIELDS, import_alimama
from dmrx.data.reader import DataFile

T = 1494000000  # 2017-05-06 00:00 Beijing time
DAY = 86400
HEADERS = {
    "raw_sample.csv": "user,time_stamp,adgroup_id,pid,nonclk,clk",
    "ad_feature.csv": "adgroup_id,cate_id,campaign_id,customer,brand,price",
    "user_profile.csv": "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,"
    "shopping_level,occupation,new_user_class_level ",  # the real header ends in a space
    "behavior_log.csv": "user,time_stamp,btag,cate,brand",
}
TINY = {
    "raw_sample.csv": [
        f"1,{T + 50},501,430548_1007,1,0",
        f"1,{T + 60},502,430539_1007,0,1",
        f"2,{T + 5},501,430548_1007,1,0",
        f"3,{T + DAY},502,430548_1007,1,0",
        f"1,{T + 7 * DAY + 10},501,430548_1007,0,1",
        f"2,{T + 7 * DAY},502,430539_1007,1,0",
    ],
    "ad_feature.csv": ["501,7,301,401,NULL,10.0", "502,8,302,402,202,0.5"],
    "user_profile.csv": ["1,11,2,1,3,1,2,0,4", "2,0,,1,,,3,1,"],
    "behavior_log.csv": [
        f"1,{T - 100},pv,10,100",
        f"1,{T + 50},cart,11,NULL",
        f"2,{T - 10},buy,12,102",
        f"1,{T + 50},fav,13,103",
        f"1,{T + 7 * DAY + 5},pv,14,104",
        f"9,{T},pv,1,1",
        f"1,{T + 7 * DAY + 1000},pv,15,105",
    ],
}


def write_raw(d: Path, files: dict[str, list[str]] | None = None, newline: str = "\n") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, rows in (files or TINY).items():
        (d / name).write_bytes((newline.join([HEADERS[name], *rows]) + newline).encode())
    return d


def read_rows(path: Path, max_len: int = 50) -> list[dict]:
    rows = []
    with DataFile(path) as f:
        for b in f.batches(batch_size=4096, max_len=max_len):
            for i in range(len(b["user"])):
                n = int(b["hist_len"][i])
                row = {k: v[i].item() for k, v in b.items() if v.ndim == 1}
                hist = [b[f"hist/{f}"][i, max_len - n :].tolist() for f in ("btag", "cate", "brand")]
                row["hist"] = list(zip(*hist, strict=True))
                rows.append(row)
    return rows


def test_tiny_exact(tmp_path):
    summary = import_alimama(write_raw(tmp_path / "raw"), tmp_path / "out")
    assert summary["rows"] == {"train.h5": 4, "test.h5": 2}
    assert summary["pid_vocab"] == ["430539_1007", "430548_1007"]
    assert summary["behaviors_read"] == 7 and summary["behaviors_kept"] == 5
    train = {(r["user"], r["target/item"]): r for r in read_rows(tmp_path / "out" / "train.h5")}
    test = {(r["user"], r["target/item"]): r for r in read_rows(tmp_path / "out" / "test.h5")}
    assert sorted(train) == [(1, 501), (1, 502), (2, 501), (3, 502)]
    assert sorted(test) == [(1, 501), (2, 502)]
    # strictly before the impression; equal timestamps keep the file order (cart before fav)
    assert train[1, 501]["hist"] == [(1, 10, 100)]
    assert train[1, 502]["hist"] == [(1, 10, 100), (2, 11, 0), (3, 13, 103)]
    assert train[2, 501]["hist"] == [(4, 12, 102)]
    assert train[3, 502]["hist"] == []
    assert test[1, 501]["hist"] == [(1, 10, 100), (2, 11, 0), (3, 13, 103), (1, 14, 104)]
    assert test[2, 502]["hist"] == [(4, 12, 102)]
    r = train[1, 502]
    assert (
        r["label"],
        r["context/pid"],
        r["target/cate"],
        r["target/brand"],
        r["target/campaign"],
        r["target/customer"],
    ) == (1.0, 1, 8, 202, 302, 402)
    assert r["dense/price"] == pytest.approx(math.log1p(0.5))
    assert [r[f"profile/{f}"] for f in PROFILE_FIELDS] == [11, 2, 1, 3, 1, 2, 0, 4]
    r = train[2, 501]
    assert (r["label"], r["context/pid"], r["target/brand"]) == (0.0, 2, 0)  # NULL brand -> 0
    assert [r[f"profile/{f}"] for f in PROFILE_FIELDS] == [0, 0, 1, 0, 0, 3, 1, 0]  # empty -> 0
    assert [train[3, 502][f"profile/{f}"] for f in PROFILE_FIELDS] == [0] * 8  # no profile
    with DataFile(tmp_path / "out" / "train.h5") as f:
        assert f.fields.behaviors == ("brand", "btag", "cate")
        assert f.fields.target == ("brand", "campaign", "cate", "customer", "item")
        assert f.fields.context == ("pid",) and f.fields.dense == ("price",)
        assert f.n_sequences == 3  # one per user, shared by that user's impressions
        assert json.loads(f.attrs["pid_vocab"]) == ["430539_1007", "430548_1007"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_crlf_no_final_newline_and_tiny_chunks(tmp_path):
    src = write_raw(tmp_path / "raw", newline="\r\n")
    data = (src / "behavior_log.csv").read_bytes()
    (src / "behavior_log.csv").write_bytes(data.rstrip(b"\r\n"))
    import_alimama(src, tmp_path / "a", chunk_rows=1)  # many buckets
    import_alimama(write_raw(tmp_path / "raw2"), tmp_path / "b")
    for split in ("train", "test"):
        a = read_rows(tmp_path / "a" / f"{split}.h5")
        b = read_rows(tmp_path / "b" / f"{split}.h5")
        assert sorted(a, key=lambda r: (r["user"], r["target/item"])) == sorted(
            b, key=lambda r: (r["user"], r["target/item"])
        )


def random_raw(d: Path, rng: np.random.Generator, n_beh: int = 3000, n_imp: int = 500) -> Path:
    users = rng.choice(np.arange(1, 10**6), 40, replace=False)
    ads = rng.choice(np.arange(1, 10**6), 30, replace=False)
    files = {
        "ad_feature.csv": [
            f"{a},{rng.integers(1, 50)},{rng.integers(1, 9)},{rng.integers(1, 9)},"
            f"{rng.choice(['NULL', str(rng.integers(1, 99))])},{rng.random() * 100:.2f}"
            for a in ads
        ],
        "user_profile.csv": [f"{u}," + ",".join(rng.choice(["", "1", "2", "3"], 8)) for u in users[:30]],
        "raw_sample.csv": [
            f"{rng.choice(users)},{T + rng.integers(0, 8 * DAY)},{rng.choice(ads)},"
            f"{rng.choice(['430548_1007', '430539_1007'])},0,{rng.integers(0, 2)}"
            for _ in range(n_imp)
        ],
        # coarse timestamps so that ties (equal user and time) are common
        "behavior_log.csv": [
            f"{rng.choice(users)},{T - 5 * DAY + 600 * rng.integers(0, 13 * 144)},"
            f"{rng.choice(['pv', 'cart', 'fav', 'buy'])},{rng.integers(1, 50)},"
            f"{rng.choice(['NULL', str(rng.integers(1, 99))])}"
            for _ in range(n_beh)
        ],
    }
    return write_raw(d, files)


def reference(src: Path, max_len: int) -> dict[str, list[tuple]]:
    """A plain-Python import: what every example should hold."""

    def rows(name):
        with open(src / name, newline="") as f:
            return [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]

    def num(v):
        return 0 if v in ("", "NULL") else int(v)

    ads = {r["adgroup_id"]: r for r in rows("ad_feature.csv")}
    prof = {r["userid"]: r for r in rows("user_profile.csv")}
    beh = defaultdict(list)
    btag = {"pv": 1, "cart": 2, "fav": 3, "buy": 4}
    for i, r in enumerate(rows("behavior_log.csv")):
        beh[r["user"]].append((int(r["time_stamp"]), i, (btag[r["btag"]], num(r["cate"]), num(r["brand"]))))
    for v in beh.values():
        v.sort()
    imps = rows("raw_sample.csv")
    days = [(int(r["time_stamp"]) + 8 * 3600) // DAY for r in imps]
    first, last = min(days), max(days)
    pids = sorted({r["pid"] for r in imps})
    out = {"train": [], "test": []}
    for r, day in zip(imps, days, strict=True):
        split = "train" if day < min(first + 7, last) else "test" if day == last else None
        if split is None:
            continue
        t = int(r["time_stamp"])
        hist = [x[2] for x in beh[r["user"]] if x[0] < t][-max_len:]
        a, p = ads[r["adgroup_id"]], prof.get(r["user"], {})
        out[split].append(
            (
                int(r["user"]),
                t,
                int(r["adgroup_id"]),
                float(r["clk"]),
                pids.index(r["pid"]) + 1,
                num(a["cate_id"]),
                num(a["brand"]),
                int(a["campaign_id"]),
                int(a["customer"]),
                round(math.log1p(float(a["price"])), 4),
                tuple(num(p.get(f, "")) for f in PROFILE_FIELDS),
                tuple(hist),
            )
        )
    return out


@pytest.mark.parametrize("chunk_rows,max_len", [(1 << 19, 50), (400, 3)])
def test_matches_reference(tmp_path, chunk_rows, max_len):
    src = random_raw(tmp_path / "raw", np.random.default_rng(chunk_rows))
    summary = import_alimama(src, tmp_path / "out", chunk_rows=chunk_rows, max_len=max_len)
    if chunk_rows == 400:
        assert summary["buckets"] > 1  # the external sort path with several buckets
    want = reference(src, max_len)
    for split in ("train", "test"):
        got = [
            (
                r["user"],
                r["target/item"],
                r["label"],
                r["context/pid"],
                r["target/cate"],
                r["target/brand"],
                r["target/campaign"],
                r["target/customer"],
                round(r["dense/price"], 4),
                tuple(r[f"profile/{f}"] for f in PROFILE_FIELDS),
                tuple(r["hist"]),
            )
            for r in read_rows(tmp_path / "out" / f"{split}.h5", max_len=max_len)
        ]
        # the file has no timestamps: compare as multisets keyed without the time
        assert sorted(got) == sorted(w[:1] + w[2:] for w in want[split])


# ---- bad input --------------------------------------------------------------------------------------------
def edit(name: str, rows: list[str]):
    return {**TINY, name: rows}


BAD = [
    (
        "field count",
        edit("behavior_log.csv", TINY["behavior_log.csv"][:2] + ["1,5,pv,10"]),
        "behavior_log.csv: line 4: expected 5 comma-separated fields, found 4",
    ),
    ("bad user", edit("raw_sample.csv", ["1x,5,501,430548_1007,1,0"]), "raw_sample.csv: line 2, column user"),
    (
        "bad btag",
        edit("behavior_log.csv", TINY["behavior_log.csv"] + [f"1,{T},click,1,1"]),
        "behavior_log.csv: line 9, column btag: 'click'",
    ),
    (
        "bad label",
        edit("raw_sample.csv", TINY["raw_sample.csv"] + [f"1,{T},501,430548_1007,0,2"]),
        "raw_sample.csv: line 8, column clk",
    ),
    (
        "unknown ad",
        edit("raw_sample.csv", [f"1,{T},777,430548_1007,1,0"]),
        "raw_sample.csv: line 2, column adgroup_id: '777' is not in ad_feature.csv",
    ),
    (
        "duplicate ad",
        edit("ad_feature.csv", TINY["ad_feature.csv"] + ["501,1,1,1,1,1.0"]),
        "ad_feature.csv: line 4, column adgroup_id: 501 appears again",
    ),
    ("bad price", edit("ad_feature.csv", ["501,7,301,401,NULL,ten"]), "ad_feature.csv: line 2, column price"),
    ("negative id", edit("user_profile.csv", ["1,-1,2,1,3,1,2,0,4"]), "user_profile.csv: line 2, column cms_segid"),
    ("huge id", edit("behavior_log.csv", [f"1,{T},pv,1234567890123456789,1"]), "behavior_log.csv: line 2, column cate"),
    ("header only", edit("behavior_log.csv", []), "behavior_log.csv: no data rows"),
    (
        "one day",
        edit("raw_sample.csv", TINY["raw_sample.csv"][:3]),
        "raw_sample.csv: every impression falls on one day",
    ),
]


@pytest.mark.parametrize("case,files,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, case, files, message):
    src = write_raw(tmp_path / "raw", files)
    check_fails(src, tmp_path / "out", message)


def check_fails(src: Path, out: Path, message: str) -> None:
    before = {p: p.read_bytes() for p in src.iterdir()}
    result = CliRunner().invoke(app, ["data", "alimama", str(src), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())  # no output, no temporary buckets
    assert {p: p.read_bytes() for p in src.iterdir()} == before


def test_missing_file(tmp_path):
    src = write_raw(tmp_path / "raw")
    (src / "user_profile.csv").unlink()
    check_fails(src, tmp_path / "out", "user_profile.csv: no such file")


def test_missing_column(tmp_path):
    src = write_raw(tmp_path / "raw")
    (src / "behavior_log.csv").write_text("user,time_stamp,cate,brand\n1,2,3,4\n")
    check_fails(src, tmp_path / "out", "behavior_log.csv: line 1: missing column(s) btag")


def test_empty_file(tmp_path):
    src = write_raw(tmp_path / "raw")
    (src / "raw_sample.csv").write_text("")
    check_fails(src, tmp_path / "out", "raw_sample.csv: empty file")


def test_existing_outputs_survive_a_failure(tmp_path):
    out = tmp_path / "out"
    import_alimama(write_raw(tmp_path / "good"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    src = write_raw(tmp_path / "bad", edit("behavior_log.csv", TINY["behavior_log.csv"] + ["1,2,pv,x,1"]))
    result = CliRunner().invoke(app, ["data", "alimama", str(src), "--out", str(out)])
    assert result.exit_code == 2 and "behavior_log.csv: line 9, column cate" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
