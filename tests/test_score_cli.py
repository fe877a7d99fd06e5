"""`dmrx score`: output file, summary, resume after interruption, shards and merge, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmrx.cli.app import app
from dmrx.data.format import Writer
from dmrx.scoring.files import score_file

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cand(tiny_data, tmp_path) -> Path:
    """A private copy of candidates.h5 (tests write outputs beside it and damage copies)."""
    path = tmp_path / "cand.h5"
    shutil.copyfile(tiny_data / "candidates.h5", path)
    return path


def scores(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["score"][:]


def score_cli(*args: str):
    return runner.invoke(app, ["score", *args])


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_scores_file_and_summary(cand, tiny_run):
    before = cand.read_bytes()
    res = score_cli(str(cand), "--model", str(tiny_run), "--json", "--batch-size", "256")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    out = cand.with_name("cand.scores.h5")
    assert summary["output"] == str(out) and out.exists()
    assert cand.read_bytes() == before  # the input is never modified
    with h5py.File(out, "r") as h5:
        s = h5["score"][:]
        attrs = dict(h5.attrs)
    assert s.dtype == np.float32 and len(s) == summary["rows"] == 1500
    assert ((s > 0) & (s < 1)).all()
    assert attrs["model_hash"] == summary["model_hash"] and len(attrs["model_hash"]) == 64
    assert attrs["backend"] == "torch" and attrs["precision"] == "fp32"
    assert summary["users"] == 300 and summary["user_encodings"] >= 300
    assert summary["unknown_ids"]["target/item"] > 0  # items only seen as candidates
    assert set(summary["unknown_ids"]) >= {"target/item", "hist/item", "user", "context/pid"}
    assert leftovers(cand.parent, {"cand.h5", "cand.scores.h5"}) == []  # no temp or partial files


def test_rich_summary_table(cand, tiny_run):
    res = score_cli(str(cand), "--model", str(tiny_run), "--out", str(cand.parent / "o.h5"))
    assert res.exit_code == 0, res.output
    for word in ("rows", "users", "unknown ids: target/item", "backend", "precision", "wall time", "rows/s"):
        assert word in res.stdout


def test_resume_after_interruption_is_byte_identical(cand, tiny_run):
    full = cand.parent / "full.h5"
    score_file(cand, tiny_run, full, batch_size=128, chunk_rows=256)

    class Stop(Exception):
        pass

    def stop_after_two(committed):
        if committed >= 512:
            raise Stop

    part = cand.parent / "part.h5"
    with pytest.raises(Stop):
        score_file(cand, tiny_run, part, batch_size=128, chunk_rows=256, on_commit=stop_after_two)
    assert not part.exists()
    pdir = cand.parent / ".part.h5.partial"
    assert json.loads((pdir / "state.json").read_text())["committed_rows"] == 512
    # a resume with other batch/chunk sizes keeps the interrupted run's (they fix the bytes)
    res = score_cli(
        str(cand),
        "--model",
        str(tiny_run),
        "--out",
        str(part),
        "--resume",
        "--json",
        "--batch-size",
        "1000",
        "--chunk-rows",
        "5000",
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["resumed_from_row"] == 512 and summary["rows_scored_now"] == 1500 - 512
    assert summary["users"] == 300  # statistics carry over the interruption
    assert scores(part).tobytes() == scores(full).tobytes()
    assert not pdir.exists()


def test_resume_after_sigkill_mid_commit(cand, tiny_run):
    """A process killed after writing a chunk's scores but before committing them resumes exactly."""
    full = cand.parent / "full.h5"
    score_file(cand, tiny_run, full, batch_size=128, chunk_rows=256)
    out = cand.parent / "killed.h5"
    args = [
        str(cand),
        "--model",
        str(tiny_run),
        "--out",
        str(out),
        "--batch-size",
        "128",
        "--chunk-rows",
        "256",
        "--json",
    ]
    # The fault is injected from outside the product: this driver SIGKILLs the process on the 4th state
    # write (the commit of chunk 3), after chunk 3's scores are on disk - the worst moment to die.
    driver = (
        "import os, signal, sys\n"
        "import dmrx.scoring.files as f\n"
        "write, calls = f._write_state, []\n"
        "def dying(pdir, state):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    write(pdir, state)\n"
        "f._write_state = dying\n"
        "from dmrx.cli.app import main\n"
        "sys.argv = ['dmrx', 'score'] + sys.argv[1:]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", driver, *args], env=env, capture_output=True, text=True, cwd=cand.parent, timeout=600
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((cand.parent / ".killed.h5.partial" / "state.json").read_text())
    assert state["committed_rows"] == 512  # chunk 3 was written, not committed
    assert (cand.parent / ".killed.h5.partial" / "scores.f32").stat().st_size == 768 * 4
    proc = subprocess.run(
        [sys.executable, "-m", "dmrx", "score", *args, "--resume"],
        env=env,
        capture_output=True,
        text=True,
        cwd=cand.parent,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["resumed_from_row"] == 512
    assert scores(out).tobytes() == scores(full).tobytes()


def test_resume_refuses_a_different_model_setting(cand, tiny_run):
    out = cand.parent / "o.h5"

    def stop(committed):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_file(cand, tiny_run, out, batch_size=128, chunk_rows=256, on_commit=stop)
    res = score_cli(str(cand), "--model", str(tiny_run), "--out", str(out), "--resume", "--precision", "int8")
    assert res.exit_code == 2
    assert "another precision" in res.stderr and "Traceback" not in res.output
    # without --resume a stale partial run is replaced, not trusted
    res = score_cli(str(cand), "--model", str(tiny_run), "--out", str(out), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["resumed_from_row"] is None
    # --resume on a complete output of the same settings has nothing to do
    res = score_cli(str(cand), "--model", str(tiny_run), "--out", str(out), "--resume", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["rows_scored_now"] == 0


def test_shards_merge_to_the_unsharded_scores(cand, tiny_run):
    full = cand.parent / "full.h5"
    score_file(cand, tiny_run, full)
    outs = []
    for i in range(3):
        res = score_cli(str(cand), "--model", str(tiny_run), "--shard", f"{i}/3", "--json")
        assert res.exit_code == 0, res.output
        s = json.loads(res.stdout)
        outs.append(Path(s["output"]))
        assert outs[-1].name == f"cand.scores.shard-{i}-of-3.h5"
    with h5py.File(cand, "r") as h5:
        users = h5["examples/user"][:]
    ranges = []
    for o in outs:
        with h5py.File(o, "r") as h5:
            ranges.append((int(h5.attrs["row_start"]), int(h5.attrs["row_stop"])))
    assert ranges[0][0] == 0 and ranges[-1][1] == 1500
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert stop == start and users[start] != users[start - 1]  # boundaries fall between users
    # shards in any order; default output name drops the shard tag
    res = score_cli("--merge", str(outs[2]), str(outs[0]), str(outs[1]), "--json")
    assert res.exit_code == 0, res.output
    merged = Path(json.loads(res.stdout)["output"])
    assert merged == cand.with_name("cand.scores.h5")
    np.testing.assert_allclose(scores(merged), scores(full), atol=1e-6, rtol=0)
    res = score_cli("--merge", str(outs[0]), str(outs[2]), "--out", str(cand.parent / "m.h5"))
    assert res.exit_code == 2 and "shard(s) [1] of 3 missing" in res.stderr


# ---- bad input -----------------------------------------------------------------------------------------
def _edit(path: Path, fn) -> None:
    with h5py.File(path, "r+") as h5:
        fn(h5)


def _replace(name: str, values) -> callable:
    def fn(h5):
        del h5[name]
        h5.create_dataset(name, data=values)

    return fn


def _set(name: str, row: int, value) -> callable:
    def fn(h5):
        ds = h5[name]
        arr = ds[:]
        arr[row] = value
        del h5[name]
        h5.create_dataset(name, data=arr)

    return fn


BAD = {
    "not_hdf5": (None, "not an HDF5 file"),
    "truncated": (None, "HDF5"),
    "missing_dataset": (lambda h5: h5.__delitem__("examples/end"), "missing dataset examples/end"),
    "wrong_dtype": (
        lambda h5: _replace("examples/target/item", h5["examples/target/item"][:].astype("f8"))(h5),
        "dataset examples/target/item must be integer",
    ),
    "wrong_shape": (
        lambda h5: _replace("examples/user", np.stack([h5["examples/user"][:]] * 2, 1))(h5),
        "dataset examples/user must be one-dimensional",
    ),
    "end_beyond_sequence": (_set("examples/end", 1234, 10**6), "examples/end row 1234"),
    "negative_id": (_set("examples/target/item", 1300, -5), "examples/target/item row 1300"),
    "nan_dense": (_set("examples/dense/price", 1100, np.nan), "examples/dense/price row 1100"),
    "inf_dense": (_set("examples/dense/price", 17, np.inf), "examples/dense/price row 17"),
    "lacks_model_field": (lambda h5: h5.__delitem__("examples/context"), "lacks examples/context/pid"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error_no_output(cand, tiny_run, case):
    edit, message = BAD[case]
    if case == "not_hdf5":
        cand.write_text("user,item\n1,2\n")
    elif case == "truncated":
        data = cand.read_bytes()
        cand.write_bytes(data[: len(data) // 2])
    else:
        _edit(cand, edit)
    res = score_cli(str(cand), "--model", str(tiny_run), "--batch-size", "128", "--chunk-rows", "256")
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in res.output
    assert leftovers(cand.parent, {"cand.h5"}) == []  # no output, no temp, no partial directory


def test_empty_candidate_file_gives_empty_scores(tmp_path, tiny_run):
    path = tmp_path / "empty.h5"
    with Writer(path, ["item", "cate", "brand", "btag"]) as w:
        w.add_sequences([0], item=[], cate=[], brand=[], btag=[])
    res = score_cli(str(path), "--model", str(tiny_run), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == 0
    s = scores(tmp_path / "empty.scores.h5")
    assert s.shape == (0,) and s.dtype == np.float32


def test_usage_errors(cand, tiny_run):
    res = score_cli(str(cand), "--model", str(tiny_run), "--shard", "3/3")
    assert res.exit_code == 2 and "--shard" in res.stderr
    res = score_cli(str(cand), str(cand), "--model", str(tiny_run))
    assert res.exit_code == 2 and "--merge" in res.stderr
    res = score_cli(str(cand), "--model", str(tiny_run), "--out", str(cand))
    assert res.exit_code == 2 and "overwrite the input" in res.stderr
    res = score_cli(str(cand), "--model", str(cand.parent / "nope"))
    assert res.exit_code == 2 and "nope" in res.stderr
