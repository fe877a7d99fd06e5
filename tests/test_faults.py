"""Bad input across every command, table-driven: each case must end in exit code 2, ONE line on the output
that names the file (and the row, column, dataset or key where there is one), no traceback, and nothing new
on disk. The kill and full-disk cases, which need a process of their own, are in test_faults_process.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dmrx.cli.app import app

runner = CliRunner()


# ---- assets -------------------------------------------------------------------------------------------
def derive(src: Path, dst: Path, rows=None, label=None, edit=None, drop=()) -> Path:
    """A copy of data file src with its example rows cut to `rows`, every label set to `label`, datasets in
    `drop` removed and edit(h5) applied."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as h:
        ex = h["examples"]
        names: list[str] = []
        ex.visit(lambda n: names.append(n) if isinstance(ex[n], h5py.Dataset) else None)
        for n in names:
            if rows is None and (label is None or n != "label"):
                continue
            a = ex[n][()]
            a = a[rows] if rows is not None else a
            if n == "label" and label is not None:
                a = np.full(len(a), label, a.dtype)
            del ex[n]
            ex.create_dataset(n, data=a, maxshape=(None,), chunks=True)
        for name in drop:
            del h[name]
        if edit is not None:
            edit(h)
    return dst


def _set(name: str, row: int, value):
    def edit(h):
        h[name][row] = value

    return edit


@pytest.fixture(scope="session")
def bad(tiny_data, tmp_path_factory) -> Path:
    """Bad and degenerate data files, made from the tiny data."""
    d = tmp_path_factory.mktemp("bad")
    train, valid, cand = tiny_data / "train.h5", tiny_data / "valid.h5", tiny_data / "candidates.h5"
    derive(valid, d / "valid_no_pos.h5", label=0)
    derive(train, d / "train_one_class.h5", label=1)
    derive(train, d / "train_empty.h5", rows=slice(0, 0))
    derive(valid, d / "valid_empty.h5", rows=slice(0, 0))
    derive(train, d / "train_no_label.h5", drop=["examples/label"])
    derive(valid, d / "valid_no_cate.h5", drop=["examples/target/cate"])
    derive(valid, d / "valid_nan.h5", edit=_set("examples/dense/price", 3, np.nan))
    derive(valid, d / "valid_neg_user.h5", edit=_set("examples/user", 2, -1))
    derive(valid, d / "valid_neg_item.h5", edit=_set("behaviors/item", 5, -3))
    derive(valid, d / "valid_end_beyond.h5", edit=_set("examples/end", 4, 10_000))
    derive(valid, d / "valid_bad_label.h5", edit=_set("examples/label", 6, 7))
    derive(cand, d / "cand_nan.h5", edit=_set("examples/dense/price", 1, np.inf))
    derive(cand, d / "cand_no_item.h5", drop=["examples/target/item"])
    derive(cand, d / "cand_seq_beyond.h5", edit=_set("examples/seq", 0, 10**9))
    (d / "not_hdf5.h5").write_bytes(b"user,item\n1,2\n")
    raw = (tiny_data / "valid.h5").read_bytes()
    (d / "truncated.h5").write_bytes(raw[: len(raw) // 2])
    (d / "a_file").write_text("in the way\n")
    (d / "users_huge.txt").write_text("1\n99999999999999999999999\n")
    (d / "users_text.txt").write_text("1\nseven\n")
    (d / "cdir").mkdir()
    configs = {
        "cfg_embed_str.json": {"model": {"embed_dim": "32"}},
        "cfg_batch_float.json": {"train": {"batch_size": 1.5}},
        "cfg_epochs_zero.json": {"train": {"epochs": 0}},
        "cfg_lr_neg.json": {"train": {"lr": -1}},
        "cfg_unknown_option.json": {"train": {"epochz": 3}},
        "cfg_unknown_section.json": {"trian": {}},
        "cfg_model_list.json": {"model": [1, 2]},
        "cfg_mlp_str.json": {"model": {"mlp": ["a", 2]}},
        "cfg_device.json": {"train": {"device": "tpu"}},
        "cfg_bool_int.json": {"train": {"epochs": True}},
        "cfg_not_table.json": [1, 2, 3],
    }
    for name, body in configs.items():
        (d / name).write_text(json.dumps(body))
    (d / "cfg_broken.json").write_text('{"train": {"epochs": 2,}')
    (d / "cfg_binary.json").write_bytes(b"\xff\xfe\x00garbage")
    return d


@pytest.fixture(scope="session")
def lr_run(tiny_data, tmp_path_factory) -> Path:
    """A baseline (logistic regression) run: no user/candidate split, no V'."""
    from dmrx.models.dmr import DMRConfig
    from dmrx.training.trainer import TrainConfig, train

    run = tmp_path_factory.mktemp("runs") / "lr"
    train(
        tiny_data / "train.h5",
        tiny_data / "valid.h5",
        run,
        DMRConfig(model="lr", embed_dim=8, max_len=20),
        TrainConfig(epochs=1, batch_size=64, max_steps=10, log_every=5),
    )
    return run


@pytest.fixture(scope="session")
def indexed_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run with its retrieval index built."""
    from dmrx.retrieval.index import build_index

    run = tmp_path_factory.mktemp("runs") / "indexed"
    shutil.copytree(tiny_run, run)
    build_index(run)
    return run


def stop_at_batch(n: int):
    """A progress reporter for trainer.train that interrupts the run (as Ctrl-C would) at batch n."""

    class Task:
        def update(self, completed=None, **kwargs):
            if completed is not None and completed >= n:
                raise KeyboardInterrupt

    return lambda *args, **kwargs: Task()


@pytest.fixture(scope="session")
def interrupted_run(tiny_data, tmp_path_factory) -> Path:
    """A run interrupted after its step-2 checkpoint: resumable."""
    from dmrx.models.dmr import DMRConfig
    from dmrx.training import trainer

    run = tmp_path_factory.mktemp("runs") / "interrupted"
    cfg = DMRConfig(embed_dim=8, attn_hidden=16, mlp=(16,), num_negatives=20, max_len=20)
    tcfg = trainer.TrainConfig(epochs=1, batch_size=64, checkpoint_every=2, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(tiny_data / "train.h5", None, run, cfg, tcfg, progress=stop_at_batch(3))
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step-000000002"
    return run


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- the table ----------------------------------------------------------------------------------------
# (id, argv, words the one line must contain). Placeholders: {data} the tiny data, {bad} the bad files,
# {run} the tiny run (read-only use), {lr} a baseline run, {idx} an indexed run, {w} the test's directory.
CASES = [
    # data files: missing, not HDF5, truncated, bad values
    ("info-missing", "data info {w}/nope.h5", ["nope.h5", "no such file"]),
    ("info-not-hdf5", "data info {bad}/not_hdf5.h5", ["not_hdf5.h5", "not an HDF5 file"]),
    ("info-truncated", "data info {bad}/truncated.h5", ["truncated.h5"]),
    ("info-nan", "data info {bad}/valid_nan.h5", ["valid_nan.h5", "examples/dense/price", "row 3"]),
    ("info-neg-user", "data info {bad}/valid_neg_user.h5", ["valid_neg_user.h5", "examples/user", "row 2"]),
    ("info-neg-item", "data info {bad}/valid_neg_item.h5", ["valid_neg_item.h5", "behaviors/item", "row 5"]),
    ("info-end-beyond", "data info {bad}/valid_end_beyond.h5", ["valid_end_beyond.h5", "examples/end", "row 4"]),
    ("info-bad-label", "data info {bad}/valid_bad_label.h5", ["valid_bad_label.h5", "examples/label", "row 6"]),
    # training data: degenerate and bad
    ("train-empty", "train --data {bad}/train_empty.h5 --out {w}/r", ["train_empty.h5", "0 rows"]),
    ("train-one-class", "train --data {bad}/train_one_class.h5 --out {w}/r", ["train_one_class.h5", "examples/label"]),
    ("train-no-label", "train --data {bad}/train_no_label.h5 --out {w}/r", ["train_no_label.h5", "examples/label"]),
    ("train-missing", "train --data {w}/nope.h5 --out {w}/r", ["nope.h5", "no such file"]),
    ("train-not-hdf5", "train --data {bad}/not_hdf5.h5 --out {w}/r", ["not_hdf5.h5"]),
    (
        "train-valid-no-pos",
        "train --data {data}/train.h5 --valid {bad}/valid_no_pos.h5 --out {w}/r",
        ["valid_no_pos.h5", "examples/label"],
    ),
    (
        "train-valid-empty",
        "train --data {data}/train.h5 --valid {bad}/valid_empty.h5 --out {w}/r",
        ["valid_empty.h5", "0 rows"],
    ),
    (
        "train-valid-no-field",
        "train --data {data}/train.h5 --valid {bad}/valid_no_cate.h5 --out {w}/r",
        ["valid_no_cate.h5", "examples/target/cate"],
    ),
    (
        "train-valid-nan",
        "train --data {data}/train.h5 --valid {bad}/valid_bad_label.h5 --out {w}/r",
        ["valid_bad_label.h5", "row 6"],
    ),
    ("train-valid-truncated", "train --data {data}/train.h5 --valid {bad}/truncated.h5 --out {w}/r", ["truncated.h5"]),
    # configs
    (
        "cfg-embed-str",
        "train --data {data}/train.h5 --config {bad}/cfg_embed_str.json --out {w}/r",
        ["cfg_embed_str.json", "embed_dim"],
    ),
    (
        "cfg-batch-float",
        "train --data {data}/train.h5 --config {bad}/cfg_batch_float.json --out {w}/r",
        ["cfg_batch_float.json", "batch_size"],
    ),
    (
        "cfg-epochs-zero",
        "train --data {data}/train.h5 --config {bad}/cfg_epochs_zero.json --out {w}/r",
        ["cfg_epochs_zero.json", "epochs"],
    ),
    (
        "cfg-lr-neg",
        "train --data {data}/train.h5 --config {bad}/cfg_lr_neg.json --out {w}/r",
        ["cfg_lr_neg.json", "lr"],
    ),
    (
        "cfg-unknown-option",
        "train --data {data}/train.h5 --config {bad}/cfg_unknown_option.json --out {w}/r",
        ["cfg_unknown_option.json", "epochz"],
    ),
    (
        "cfg-unknown-section",
        "train --data {data}/train.h5 --config {bad}/cfg_unknown_section.json --out {w}/r",
        ["cfg_unknown_section.json", "trian"],
    ),
    (
        "cfg-model-list",
        "train --data {data}/train.h5 --config {bad}/cfg_model_list.json --out {w}/r",
        ["cfg_model_list.json", "model"],
    ),
    (
        "cfg-mlp-str",
        "train --data {data}/train.h5 --config {bad}/cfg_mlp_str.json --out {w}/r",
        ["cfg_mlp_str.json", "mlp"],
    ),
    (
        "cfg-device",
        "train --data {data}/train.h5 --config {bad}/cfg_device.json --out {w}/r",
        ["cfg_device.json", "device"],
    ),
    (
        "cfg-bool-int",
        "train --data {data}/train.h5 --config {bad}/cfg_bool_int.json --out {w}/r",
        ["cfg_bool_int.json", "epochs"],
    ),
    (
        "cfg-not-table",
        "train --data {data}/train.h5 --config {bad}/cfg_not_table.json --out {w}/r",
        ["cfg_not_table.json"],
    ),
    (
        "cfg-broken-json",
        "train --data {data}/train.h5 --config {bad}/cfg_broken.json --out {w}/r",
        ["cfg_broken.json", "JSON"],
    ),
    ("cfg-binary", "train --data {data}/train.h5 --config {bad}/cfg_binary.json --out {w}/r", ["cfg_binary.json"]),
    ("cfg-directory", "train --data {data}/train.h5 --config {bad}/cdir --out {w}/r", ["cdir", "directory"]),
    ("cfg-missing", "train --data {data}/train.h5 --config {w}/nope.json --out {w}/r", ["nope.json"]),
    # run lifecycle
    ("resume-not-a-dir", "train --resume --out {w}/nothing", ["nothing", "no such run directory"]),
    ("resume-not-a-dir-data", "train --resume --out {w}/nothing --data {data}/train.h5", ["nothing", "no such run"]),
    ("resume-plain-dir", "train --resume --out {bad}/cdir --data {data}/train.h5", ["cdir", "not an interrupted run"]),
    ("resume-finished", "train --resume --out {run}", ["{run}", "finished"]),
    ("train-over-finished", "train --data {data}/train.h5 --out {run}", ["{run}", "not empty"]),
    ("train-over-file", "train --data {data}/train.h5 --out {bad}/a_file", ["a_file", "not a directory"]),
    ("train-under-file", "train --data {data}/train.h5 --out {bad}/a_file/r", ["a_file", "not a directory"]),
    # evaluation and export on degenerate files
    ("eval-empty", "evaluate {run} --data {bad}/valid_empty.h5", ["valid_empty.h5", "0 rows"]),
    ("eval-no-label", "evaluate {run} --data {data}/candidates.h5", ["candidates.h5", "examples/label"]),
    ("eval-no-field", "evaluate {run} --data {bad}/valid_no_cate.h5", ["valid_no_cate.h5", "examples/target/cate"]),
    ("eval-nan", "evaluate {run} --data {bad}/valid_nan.h5", ["valid_nan.h5", "examples/dense/price", "row 3"]),
    ("eval-missing-run", "evaluate {w}/norun --data {data}/test.h5", ["norun"]),
    ("export-eval-empty", "export {runcopy} --fp16 --eval-data {bad}/valid_empty.h5", ["valid_empty.h5", "0 rows"]),
    (
        "export-eval-no-pos",
        "export {runcopy} --fp16 --eval-data {bad}/valid_no_pos.h5",
        ["valid_no_pos.h5", "examples/label"],
    ),
    (
        "export-eval-no-field",
        "export {runcopy} --fp16 --eval-data {bad}/valid_no_cate.h5",
        ["valid_no_cate.h5", "examples/target/cate"],
    ),
    ("export-missing-run", "export {w}/norun", ["norun"]),
    # scoring
    ("score-missing", "score {w}/nope.h5 --model {run} --out {w}/s.h5", ["nope.h5", "no such file"]),
    ("score-not-hdf5", "score {bad}/not_hdf5.h5 --model {run} --out {w}/s.h5", ["not_hdf5.h5"]),
    (
        "score-nan",
        "score {bad}/cand_nan.h5 --model {run} --out {w}/s.h5",
        ["cand_nan.h5", "examples/dense/price", "row 1"],
    ),
    (
        "score-no-field",
        "score {bad}/cand_no_item.h5 --model {run} --out {w}/s.h5",
        ["cand_no_item.h5", "examples/target/item"],
    ),
    (
        "score-seq-beyond",
        "score {bad}/cand_seq_beyond.h5 --model {run} --out {w}/s.h5",
        ["cand_seq_beyond.h5", "examples/seq", "row 0"],
    ),
    (
        "score-neg-user",
        "score {bad}/valid_neg_user.h5 --model {run} --out {w}/s.h5",
        ["valid_neg_user.h5", "examples/user", "row 2"],
    ),
    ("score-out-dir", "score {data}/candidates.h5 --model {run} --out {bad}/cdir", ["cdir", "directory"]),
    (
        "score-out-under-file",
        "score {data}/candidates.h5 --model {run} --out {bad}/a_file/s.h5",
        ["a_file", "not a directory"],
    ),
    ("score-missing-run", "score {data}/candidates.h5 --model {w}/norun --out {w}/s.h5", ["norun"]),
    ("score-bad-shard", "score {data}/candidates.h5 --model {run} --shard 3/2 --out {w}/s.h5", ["3/2"]),
    ("score-cuda", "score {data}/candidates.h5 --model {run} --device cuda --out {w}/s.h5", ["--device cuda", "CUDA"]),
    ("score-merge-missing", "score --merge {w}/a.h5 {w}/b.h5 --out {w}/m.h5", ["a.h5"]),
    ("train-cuda", "train --data {data}/train.h5 --device cuda --out {w}/r", ["--device cuda", "CUDA"]),
    # retrieval
    ("retrieve-user-huge", "retrieve {idx} --user 99999999999999999999999", ["--user", "99999999999999999999999"]),
    ("retrieve-user-neg", "retrieve {idx} --user -5", ["--user", "-5"]),
    ("retrieve-user-text", "retrieve {idx} --user seven", ["--user", "seven"]),
    ("retrieve-users-huge", "retrieve {idx} --users {bad}/users_huge.txt", ["users_huge.txt", "line 2"]),
    ("retrieve-users-text", "retrieve {idx} --users {bad}/users_text.txt", ["users_text.txt", "line 2"]),
    ("retrieve-users-missing", "retrieve {idx} --users {w}/nope.txt", ["nope.txt"]),
    ("retrieve-all-out-dir", "retrieve {idx} --all --out {bad}/cdir", ["cdir", "directory"]),
    ("retrieve-all-out-under-file", "retrieve {idx} --all --out {bad}/a_file/top.csv", ["a_file", "not a directory"]),
    ("retrieve-eval-empty", "retrieve {idx} --eval --data {bad}/valid_empty.h5", ["valid_empty.h5"]),
    # baselines: scoring works (test below); retrieval says it needs V'
    ("index-lr", "index build {lr}", ["{lr}", "V'"]),
    ("retrieve-lr", "retrieve {lr} --user 5", ["{lr}", "V'"]),
    # data import and generation: output paths
    (
        "synthetic-out-file",
        "data synthetic --out {bad}/a_file --n-users 10 --n-items 600",
        ["a_file", "not a directory"],
    ),
    (
        "synthetic-under-file",
        "data synthetic --out {bad}/a_file/d --n-users 10 --n-items 600",
        ["a_file", "not a directory"],
    ),
    ("csv-out-dir", "data csv {csv} {bad}/cdir", ["cdir", "directory"]),
    ("csv-out-under-file", "data csv {csv} {bad}/a_file/o.h5", ["a_file", "not a directory"]),
    ("csv-missing", "data csv {w}/nope.csv {w}/o.h5", ["nope.csv"]),
    ("csv-bad-label", "data csv {csv_bad} {w}/o.h5", ["bad.csv", "label"]),
]

TABLE = (
    "user_id,item_id,cate_id,hist_item_id,hist_cate_id,label\n"
    "7,100,10,,,1\n7,101,11,100,10,0\n8,102,12,100^101,10^11,1\n"
)


@pytest.mark.parametrize("case_id, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(
    case_id, argv, words, tiny_data, tiny_run, bad, lr_run, indexed_run, tmp_path, monkeypatch
):
    if case_id.endswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is present: --device cuda is not an error here")
    w = tmp_path / "w"
    w.mkdir()
    (tmp_path / "bad.csv").write_text(TABLE.replace("10^11,1", "10^11,2"))
    (tmp_path / "t.csv").write_text(TABLE)
    runcopy = tmp_path / "runcopy"
    if "{runcopy}" in argv:
        shutil.copytree(tiny_run, runcopy)
    fill = {
        "data": tiny_data,
        "bad": bad,
        "run": tiny_run,
        "lr": lr_run,
        "idx": indexed_run,
        "w": w,
        "runcopy": runcopy,
        "csv": tmp_path / "t.csv",
        "csv_bad": tmp_path / "bad.csv",
    }
    watched = [tmp_path, bad, tiny_run, indexed_run, lr_run]
    before = {str(d): tree(d) for d in watched}
    monkeypatch.chdir(w)
    res = runner.invoke(app, [a.format(**fill) for a in argv.split()])
    # retrieve's note that it builds a missing index first is not part of the error
    lines = [line for line in res.output.splitlines() if line.strip() and "has no index yet" not in line]
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for word in words:
        assert word.format(**fill) in lines[0], (word, lines[0])
    after = {str(d): tree(d) for d in watched}
    assert after == before, {k: after[k] ^ before[k] for k in after if after[k] != before[k]}


# ---- degenerate but legal ------------------------------------------------------------------------------
def test_evaluate_one_class_reports_undefined_auc_without_warnings(tiny_run, bad):
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--data", str(bad / "valid_no_pos.h5")])
    assert res.exit_code == 0, res.output
    assert "nan" not in res.output.lower() and "Warning" not in res.output
    assert "one class only" in res.output


def test_baseline_run_scores_like_its_model(lr_run, tiny_data, tmp_path):
    """Scoring works for every model dmrx trains: a baseline through its forward, per row."""
    from dmrx.data.reader import DataFile
    from dmrx.evaluation.predict import predict
    from dmrx.models import bundle

    out = tmp_path / "s.h5"
    res = runner.invoke(app, ["score", str(tiny_data / "candidates.h5"), "--model", str(lr_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    with h5py.File(out) as h5:
        got = h5["score"][()]
    b = bundle.load(lr_run)
    with DataFile(tiny_data / "candidates.h5") as f:
        want = predict(b.model, b.encoder(), f)["prob"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_failed_train_leaves_no_run_and_a_rerun_works(tiny_data, bad, tmp_path):
    """A training that fails before it trains a step leaves nothing; the same --out then trains."""
    out = tmp_path / "r"
    res = runner.invoke(
        app,
        ["train", "--data", str(tiny_data / "train.h5"), "--valid", str(bad / "valid_no_cate.h5"), "--out", str(out)],
    )
    assert res.exit_code == 2 and not out.exists()
    res = runner.invoke(
        app,
        ["train", "--data", str(tiny_data / "train.h5"), "--out", str(out), "--max-steps", "2", "--batch-size", "64"],
    )
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").exists()


def test_an_interrupted_run_is_refused_as_new_and_named_for_resume(interrupted_run, tiny_data):
    res = runner.invoke(app, ["train", "--data", str(tiny_data / "train.h5"), "--out", str(interrupted_run)])
    assert res.exit_code == 2 and "--resume" in res.output and str(interrupted_run) in res.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize(
    "argv",
    [
        "data synthetic --out {ro}/d --n-users 10 --n-items 600",
        "train --data {data}/train.h5 --out {ro}/r --max-steps 1",
        "score {data}/candidates.h5 --model {run} --out {ro}/s.h5",
        "retrieve {idx} --all --out {ro}/top.csv",
    ],
)
def test_unwritable_directory(argv, tiny_data, tiny_run, indexed_run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        res = runner.invoke(app, argv.format(ro=ro, data=tiny_data, run=tiny_run, idx=indexed_run).split())
        assert res.exit_code == 2 and "Traceback" not in res.output and str(ro) in res.output, res.output
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o700)
