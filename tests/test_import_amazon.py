"""`dmrx data amazon`: S3-Rec sequences -> leave-last-out train/valid/test with sampled negatives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.data.importers.amazon import import_amazon, item_fields
from dmrx.data.reader import DataFile

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPLITS = ("train", "valid", "test")

SEQUENCES = "1 10 11 12 13 14\n2 11 15 16\n\n3 20 21\n"
ATTRIBUTES = {
    "10": [100, 5, 6],
    "11": [5, 7],
    "12": [101, 5],
    "13": [103],
    "14": [],
    "15": [102, 8, 9],
    "16": [100, 6],
    "20": [7],
}  # 21 is missing
# by the rule: non-first ids {5, 6, 7, 8, 9}; brand = first when not among them, cate = last
CATE = {10: 6, 11: 7, 12: 5, 13: 0, 14: 0, 15: 9, 16: 6, 20: 7, 21: 0}
BRAND = {10: 100, 11: 0, 12: 101, 13: 103, 14: 0, 15: 102, 16: 100, 20: 0, 21: 0}
ITEMS = {1: {10, 11, 12, 13, 14}, 2: {11, 15, 16}, 3: {20, 21}}
UNIVERSE = set().union(*ITEMS.values())


def write_source(d: Path, seqs: str = SEQUENCES, attrs=None, name: str = "Toy") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.txt").write_text(seqs)
    (d / f"{name}_item2attributes.json").write_text(
        attrs if isinstance(attrs, str) else json.dumps(ATTRIBUTES if attrs is None else attrs)
    )
    return d


def read_rows(path: Path, max_len: int = 50) -> list[dict]:
    """Every example of a file as a dict with unpadded histories."""
    rows = []
    with DataFile(path) as f:
        for b in f.batches(batch_size=1024, max_len=max_len):
            for i in range(len(b["user"])):
                n = int(b["hist_len"][i])
                row = {k: (v[i].item()) for k, v in b.items() if v.ndim == 1}
                for k, v in b.items():
                    if v.ndim == 2:
                        row[k] = v[i, max_len - n :].tolist()
                rows.append(row)
    return rows


def test_tiny_exact(tmp_path):
    src = write_source(tmp_path / "src")
    summary = import_amazon(src, "Toy", tmp_path / "out", seed=3)
    assert summary["rows"] == {"train.h5": 4, "valid.h5": 4, "test.h5": 6}
    got = {s: read_rows(tmp_path / "out" / f"{s}.h5") for s in SPLITS}
    # (user, history, positive target) per split, in file order
    want = {
        "train": [(1, [10], 11), (1, [10, 11], 12)],
        "valid": [(1, [10, 11, 12], 13), (2, [11], 15)],
        "test": [(1, [10, 11, 12, 13], 14), (2, [11, 15], 16), (3, [20], 21)],
    }
    for split in SPLITS:
        rows = got[split]
        assert [r["label"] for r in rows] == [1.0, 0.0] * len(want[split])
        for (user, hist, target), pos, neg in zip(want[split], rows[::2], rows[1::2], strict=True):
            for r in (pos, neg):
                assert r["user"] == user
                assert r["hist/item"] == hist
                assert r["hist/cate"] == [CATE[i] for i in hist]
                assert r["hist/brand"] == [BRAND[i] for i in hist]
                assert r["target/cate"] == CATE[r["target/item"]]
                assert r["target/brand"] == BRAND[r["target/item"]]
            assert pos["target/item"] == target
            assert neg["target/item"] in UNIVERSE - ITEMS[user]
    with DataFile(tmp_path / "out" / "train.h5") as f:
        assert f.fields.behaviors == ("brand", "cate", "item")
        assert f.fields.target == ("brand", "cate", "item")
        assert f.fields.profile == f.fields.context == f.fields.dense == ()
        assert f.n_sequences == 1  # user 1 only; stored once, referenced by both of its examples
        assert f.offsets.tolist() == [0, 2]  # its prefix up to the last training end, n - 3 = 2


def test_item_fields_rule():
    ids, cate, brand = item_fields({int(k): v for k, v in ATTRIBUTES.items()})
    assert dict(zip(ids.tolist(), cate.tolist(), strict=True)) == {k: v for k, v in CATE.items() if k != 21}
    assert dict(zip(ids.tolist(), brand.tolist(), strict=True)) == {k: v for k, v in BRAND.items() if k != 21}


def test_deterministic_and_seeded(tmp_path):
    rng = np.random.default_rng(0)
    lines = [
        " ".join(map(str, [u, *rng.choice(np.arange(1, 200), rng.integers(5, 30), replace=False)]))
        for u in range(1, 30)
    ]
    src = write_source(
        tmp_path / "src", "\n".join(lines) + "\n", {str(i): [i % 7 + 1, 50 + i % 11] for i in range(1, 200)}
    )
    negatives = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        import_amazon(src, "Toy", tmp_path / run, seed=seed)
        negatives[run] = [r["target/item"] for r in read_rows(tmp_path / run / "train.h5")[1::2]]
    assert negatives["a"] == negatives["b"]
    assert negatives["a"] != negatives["c"]
    users = {int(x.split()[0]): set(map(int, x.split()[1:])) for x in lines}
    rows = read_rows(tmp_path / "a" / "train.h5")
    assert all(r["target/item"] not in users[r["user"]] for r in rows[1::2])


def test_max_len_trims_storage(tmp_path):
    src = write_source(tmp_path / "src")
    import_amazon(src, "Toy", tmp_path / "full", max_len=0)
    import_amazon(src, "Toy", tmp_path / "short", max_len=2)
    for split in SPLITS:
        full = read_rows(tmp_path / "full" / f"{split}.h5", max_len=2)
        short = read_rows(tmp_path / "short" / f"{split}.h5", max_len=2)
        assert full == short  # what a reader with max_len 2 sees is the same
    with DataFile(tmp_path / "full" / "test.h5") as a, DataFile(tmp_path / "short" / "test.h5") as b:
        assert a.n_behaviors == 4 + 2 + 1 and b.n_behaviors == 2 + 2 + 1
    rows = read_rows(tmp_path / "short" / "test.h5", max_len=50)
    assert rows[0]["hist/item"] == [12, 13]  # the file holds no more than 2 items of history


@pytest.mark.skipif(not (SHARED / "amazon-beauty" / "Beauty.txt").exists(), reason="no shared Beauty data")
def test_real_beauty(tmp_path):
    src = SHARED / "amazon-beauty"
    result = CliRunner().invoke(app, ["data", "amazon", str(src), "Beauty", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["users"] == 22363 and summary["items"] == 12101 and summary["interactions"] == 198502
    assert summary["rows"] == {"train.h5": 2 * (198502 - 3 * 22363), "valid.h5": 2 * 22363, "test.h5": 2 * 22363}
    seqs = {}
    for line in (src / "Beauty.txt").read_text().splitlines():
        u, *items = map(int, line.split())
        seqs[u] = items
    with DataFile(tmp_path / "test.h5") as f:
        b = next(f.batches(batch_size=2000, max_len=50))
    for i in range(0, 2000, 2):
        items = seqs[int(b["user"][i])]
        n = int(b["hist_len"][i])
        assert b["target/item"][i] == items[-1] and b["label"][i] == 1
        assert b["hist/item"][i, 50 - n :].tolist() == items[:-1][-50:]
        assert b["target/item"][i + 1] not in items and b["label"][i + 1] == 0


# ---- bad input --------------------------------------------------------------------------------------------
BAD = [
    ("missing json", None, "missing", "Toy_item2attributes.json: no such file"),
    ("bad token", "1 10 11\n2 11 x7 12\n", None, "Toy.txt: line 2, field 3"),
    ("no items", "1 10 11\n\n3\n", None, "Toy.txt: line 3"),
    ("negative", "1 10 -11\n", None, "Toy.txt: line 1, field 3"),
    ("duplicate user", "1 10 11\n2 10\n1 12 13\n", None, "Toy.txt: line 3: user 1 appears again"),
    ("empty", "", None, "Toy.txt: no users"),
    ("bad json", SEQUENCES, '{"10": [1, 2],\n "11": [3,', "Toy_item2attributes.json: line 2"),
    ("bad attr", SEQUENCES, '{"10": [1, "a"]}', "Toy_item2attributes.json: item 10"),
    ("bad key", SEQUENCES, '{"x1": [1]}', "Toy_item2attributes.json: item key 'x1'"),
]


@pytest.mark.parametrize("case,seqs,attrs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(tmp_path, case, seqs, attrs, message):
    src = write_source(tmp_path / "src", SEQUENCES if seqs is None else seqs, attrs if attrs != "missing" else None)
    if attrs == "missing":
        (src / "Toy_item2attributes.json").unlink()
    before = {p: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "amazon", str(src), "Toy", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())
    assert {p: p.read_bytes() for p in src.iterdir()} == before  # inputs untouched


def test_missing_dir(tmp_path):
    result = CliRunner().invoke(app, ["data", "amazon", str(tmp_path / "nope"), "Toy", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "nope: no such directory" in result.output


def test_no_negative_possible_leaves_nothing(tmp_path):
    # user 2 interacted with every item: the error comes while building, before any file is written
    src = write_source(tmp_path / "src", "1 10 11 10\n2 10 11 12\n3 12 10\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "amazon", str(src), "Toy", "--out", str(out)])
    assert result.exit_code == 2 and "user 2 interacted with every item" in result.output
    assert not out.exists() or not any(out.iterdir())
