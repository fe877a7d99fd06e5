"""`dmrx data synthetic` and `dmrx data info` through the CLI, and the top-level command list."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.data.format import write_dataset
from dmrx.data.info import describe
from dmrx.data.reader import DataFile
from dmrx.data.synthetic import SyntheticConfig

runner = CliRunner()
FILES = ("train.h5", "valid.h5", "test.h5", "candidates.h5")
USERS = 300


def _synthetic(out, seed):
    res = runner.invoke(
        app,
        [
            "data",
            "synthetic",
            "--out",
            str(out),
            "--n-users",
            str(USERS),
            "--n-items",
            "1000",
            "--seed",
            str(seed),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    summaries = {name: _synthetic(root / name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    return root, summaries


def _arrays(path):
    out = {}

    def keep(name, obj):
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[:]

    with h5py.File(path, "r") as h5:
        h5.visititems(keep)
    return out


def test_synthetic_writes_four_valid_files(synth):
    root, summaries = synth
    assert set(summaries["a"]["rows"]) == set(FILES)
    for name in FILES:
        with DataFile(root / "a" / name) as d:
            assert d.n_rows == summaries["a"]["rows"][name] > 0
            assert d.fields.behaviors == ("brand", "btag", "cate", "item")
            batch = next(d.batches(batch_size=64, max_len=20))
            assert batch["hist/item"].shape == (64, 20)
    assert sorted(p.name for p in (root / "a").iterdir()) == sorted(FILES)  # no temporaries left behind


def test_synthetic_is_deterministic_per_seed(synth):
    root, _ = synth
    for name in FILES:
        a, b, c = (_arrays(root / run / name) for run in "abc")
        assert a.keys() == b.keys() == c.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
        assert any(a[k].shape != c[k].shape or not np.array_equal(a[k], c[k]) for k in a), name
    np.testing.assert_raises(
        AssertionError,
        np.testing.assert_array_equal,
        _arrays(root / "a" / "train.h5")["behaviors/item"],
        _arrays(root / "c" / "train.h5")["behaviors/item"],
    )


def test_synthetic_ids_labels_and_candidates(synth):
    root, _ = synth
    labels = []
    for name in ("train.h5", "valid.h5", "test.h5"):
        with DataFile(root / "a" / name) as d:
            cols = d.read_columns(0, d.n_rows)
            assert d.fields.has_label and d.fields.has_prob
            assert 1 <= cols["user"].min() and cols["user"].max() <= USERS  # raw user ids are 1..N
            labels.append(cols["label"])
            if name == "train.h5":
                assert set(cols["user"].tolist()) == set(range(1, USERS + 1))
    ctr = SyntheticConfig().ctr  # ~9,000 labelled rows: the rate's standard error is below 0.004
    assert abs(float(np.concatenate(labels).mean()) - ctr) <= 0.03
    assert abs(float(labels[0].mean()) - ctr) <= 0.03
    with DataFile(root / "a" / "candidates.h5") as d:
        assert not d.fields.has_label
        users = d.read_columns(0, d.n_rows, ["user"])["user"]
        per_user = np.bincount(users, minlength=USERS + 1)
        assert per_user[0] == 0 and set(per_user[1:].tolist()) == {20}


def test_synthetic_cli_defaults_are_the_generators():
    import inspect

    from dmrx.cli.data import synthetic

    params = inspect.signature(synthetic).parameters
    for param, name in (("n_users", "users"), ("n_items", "items"), ("seed", "seed")):
        assert params[param].default == getattr(SyntheticConfig(), name), name


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in ("data", "train", "evaluate", "export", "score", "index", "retrieve"):
        assert name in res.output
    res = runner.invoke(app, ["data", "--help"])
    assert res.exit_code == 0 and "info" in res.output and "synthetic" in res.output


# ---- dmrx data info ----------------------------------------------------------------------------------------
@pytest.fixture
def known_file(tmp_path):
    """A file whose every statistic the test knows."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 30, 40)
    nnz = int(lengths.sum())
    seq = rng.integers(0, 40, 1000)
    end = np.floor(rng.random(1000) * (lengths[seq] + 1)).astype(np.int64)
    end[:37] = 0  # some certainly empty histories
    user = rng.integers(1, 120, 1000)
    label = (rng.random(1000) < 0.07).astype(np.int8)
    prob = rng.random(1000).astype(np.float32)
    path = tmp_path / "known.h5"
    write_dataset(
        path,
        {"item": rng.integers(1, 500, nnz), "btag": rng.integers(1, 5, nnz)},
        lengths,
        dict(
            seq=seq,
            end=end,
            user=user,
            label=label,
            prob=prob,
            profile={"age": rng.integers(1, 8, 1000)},
            target={"item": rng.integers(1, 500, 1000)},
            dense={"price": rng.random(1000)},
        ),
        attrs={"source": "test"},
    )
    return path, dict(lengths=lengths, end=end, user=user, label=label, prob=prob)


def test_info_json_matches_what_was_written(known_file):
    path, w = known_file
    res = runner.invoke(app, ["data", "info", str(path), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["schema_version"] == 1
    assert d["rows"] == 1000 and d["sequences"] == 40 and d["behaviors"] == int(w["lengths"].sum())
    assert d["users"] == len(np.unique(w["user"]))
    assert d["label_rate"] == pytest.approx(w["label"].mean())
    assert d["mean_prob"] == pytest.approx(float(w["prob"].astype(np.float64).mean()), rel=1e-9)
    end = w["end"]
    h = d["history"]
    assert h["min"] == 0 and h["max"] == end.max() and h["mean"] == pytest.approx(end.mean())
    assert h["p50"] == np.percentile(end, 50, method="inverted_cdf")
    assert h["p90"] == np.percentile(end, 90, method="inverted_cdf")
    assert h["empty_share"] == pytest.approx((end == 0).mean()) and h["empty_share"] >= 0.037
    assert d["fields"] == {
        "behaviors": ["btag", "item"],
        "profile": ["age"],
        "target": ["item"],
        "context": [],
        "dense": ["price"],
        "label": True,
        "prob": True,
    }
    assert d["file_bytes"] == path.stat().st_size
    assert d["attrs"] == {"source": "test"}
    # streaming in small chunks gives the same answer
    assert describe(path, chunk_rows=37) == d


def test_info_table(known_file):
    path, w = known_file
    res = runner.invoke(app, ["data", "info", str(path)])
    assert res.exit_code == 0, res.output
    for text in ("1,000", f"{w['label'].mean():.4f}", "btag, item", "empty histories", "file size"):
        assert text in res.stdout


def test_info_without_labels_or_rows(tmp_path):
    write_dataset(tmp_path / "e.h5", {"item": [1, 2]}, [2], dict(seq=[], end=[], user=[]))
    d = describe(tmp_path / "e.h5")
    assert d["rows"] == 0 and d["users"] == 0 and d["history"] is None
    assert d["label_rate"] is None and d["mean_prob"] is None
    res = runner.invoke(app, ["data", "info", str(tmp_path / "e.h5")])
    assert res.exit_code == 0 and "no examples" in res.stdout


@pytest.mark.parametrize("damage", ["text", "truncated", "end beyond", "missing"])
def test_info_bad_file_is_one_line_exit_2(known_file, damage):
    path, _ = known_file
    if damage == "text":
        path.write_text("not hdf5\n")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:4000])
    elif damage == "end beyond":
        with h5py.File(path, "a") as h5:
            h5["examples/end"][5] = 10_000
    else:
        path.unlink()
    res = runner.invoke(app, ["data", "info", str(path)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    if damage == "end beyond":
        assert "examples/end row 5" in lines[0]
