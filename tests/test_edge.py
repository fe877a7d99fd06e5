"""The export bundle on its own: copied away from its run, scored and used for user vectors without torch,
read by a program that knows only the documented contract (docs/export-contract.md), and refused cleanly
when damaged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dmrx.artifacts import manifests
from dmrx.cli.app import app
from dmrx.data.reader import DataFile, HistoryReader
from dmrx.models import bundle
from dmrx.retrieval.users import UserEncoder
from dmrx.runtime.graphs import slot_layout
from dmrx.scoring import Scorer, score_file

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Run first in a child process: any later `import torch` fails, as on an edge box without torch.
NO_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
sys.meta_path.insert(0, _NoTorch())
"""


def run_without(blocked: tuple[str, ...], program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"BLOCKED = {blocked!r}\n" + NO_TORCH + textwrap.dedent(program)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _scores(path: Path) -> np.ndarray:
    with h5py.File(path) as h5:
        return h5["score"][:]


def test_manifest_points_nowhere_outside(copied_export, tiny_run):
    text = (copied_export / "manifest.json").read_text()
    assert str(tiny_run) not in text and str(tiny_run.parent) not in text
    m = json.loads(text)
    assert all(not Path(name).is_absolute() and ".." not in Path(name).parts for name in m["files"])
    assert {"model.json", "schema.json", "vocab.safetensors", "v_out.safetensors"} <= set(m["files"])


def test_run_and_export_files_have_the_umask_modes(copied_export, tiny_run):
    import os
    import stat

    from dmrx.artifacts.atomic import umask

    want_file, want_dir = 0o666 & ~umask(), 0o777 & ~umask()
    assert stat.S_IMODE(os.stat(copied_export).st_mode) == want_dir
    for path in [*copied_export.rglob("*"), *tiny_run.glob("*.safetensors")]:
        assert stat.S_IMODE(os.stat(path).st_mode) == (want_dir if path.is_dir() else want_file), path


def test_copied_export_scores_without_torch_like_the_run(copied_export, tiny_run, tiny_data, tmp_path):
    cand = tmp_path / "cand.h5"
    shutil.copyfile(tiny_data / "candidates.h5", cand)
    ref = score_file(cand, tiny_run, tmp_path / "torch.h5", backend="torch")
    program = """
        from dmrx.cli.app import main
        sys.argv = ["dmrx", "score"] + sys.argv[1:]
        main()
    """
    out = tmp_path / "edge.h5"
    for precision, tol in (("fp32", 1e-5), ("int8", 0.05)):
        proc = run_without(
            ("torch",),
            program,
            str(cand),
            "--model",
            str(copied_export),
            "--backend",
            "onnxruntime",
            "--precision",
            precision,
            "--out",
            str(out),
            "--json",
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)
        assert summary["backend"] == "onnxruntime" and summary["rows"] == ref["rows"]
        assert np.abs(_scores(out) - _scores(tmp_path / "torch.h5")).max() <= tol, precision
        out.unlink()
    # named on its own, an export scores with its own backends: auto does not reach for torch
    assert Scorer(copied_export).describe()["backend"] == "onnxruntime"


def test_user_vectors_and_retrieval_without_torch(copied_export, tiny_run, tiny_data, tmp_path):
    from dmrx.retrieval.index import build_index, load_index

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("index", "export"))
    build_index(run)
    b = bundle.load(run)
    with DataFile(tiny_data / "test.h5") as d:
        seq, end = d.read_columns(0, 64, ["seq", "end"]).values()
    with HistoryReader(tiny_data / "test.h5", list(b.spec.behaviors), b.max_len, b.encoder()) as reader:
        batch, _ = reader.read(seq, end)
    want_u = UserEncoder(b, "torch")(batch)
    users = load_index(run).users[:20]
    want_items, _ = load_index(run).recommend(users, k=10, method="int8")
    np.savez(tmp_path / "q.npz", seq=seq, end=end, users=users)
    program = """
        import numpy as np
        from dmrx.data.reader import HistoryReader
        from dmrx.retrieval.index import load_index
        from dmrx.retrieval.users import UserEncoder
        from dmrx.runtime import export_bundle

        export_dir, data, run, q, out = sys.argv[1:]
        q = np.load(q)
        export = export_bundle.load(export_dir)
        with HistoryReader(data, list(export.spec.behaviors), export.max_len, export.encoder()) as reader:
            batch, _ = reader.read(q["seq"], q["end"])
        u = UserEncoder(export, "onnxruntime")(batch)
        items, _ = load_index(run).recommend(q["users"], k=10, method="int8")
        np.savez(out, u=u, items=items)
    """
    proc = run_without(
        ("torch",),
        program,
        str(copied_export),
        str(tiny_data / "test.h5"),
        str(run),
        str(tmp_path / "q.npz"),
        str(tmp_path / "got.npz"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "got.npz")
    np.testing.assert_allclose(got["u"], want_u, atol=1e-5)
    np.testing.assert_array_equal(got["items"], want_items)


def test_a_command_that_needs_torch_says_which_extra(tmp_path):
    program = """
        from dmrx.cli.app import main
        sys.argv = ["dmrx", "train", "--data", "train.h5"]
        main()
    """
    proc = run_without(("torch",), program, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "needs torch" in proc.stderr and "dmrx[train]" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# ---- bad bundles -----------------------------------------------------------------------------------------
def _bad_copy(copied_export: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(copied_export, bad)
    return bad


def _rehash(export: Path) -> None:
    """Rewrite the manifest's hashes as a careless hand would, so that only the content check is left."""
    m = json.loads((export / "manifest.json").read_text())
    m["files"] = {name: manifests.sha256(export / name) for name in m["files"]}
    (export / "manifest.json").write_text(json.dumps(m))


def _damage_missing(bad: Path) -> None:
    (bad / "vocab.safetensors").unlink()


def _damage_bytes(bad: Path) -> None:
    data = bytearray((bad / "schema.json").read_bytes())
    data[5] ^= 1
    (bad / "schema.json").write_bytes(bytes(data))


def _graph_from_another_export(bad: Path) -> None:
    shutil.copyfile(bad / "candidate_scorer.int8.onnx", bad / "candidate_scorer.onnx")


def _vocab_of_other_graphs(bad: Path) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(bad / "vocab.safetensors"))
    t["vocab.item"] = t["vocab.item"][:-3]  # a vocabulary from another training run
    save_file(t, str(bad / "vocab.safetensors"))
    _rehash(bad)


@pytest.mark.parametrize(
    "damage, file, words",
    [
        (_damage_missing, "vocab.safetensors", "missing"),
        (_damage_bytes, "schema.json", "damaged"),
        (_graph_from_another_export, "candidate_scorer.onnx", "damaged"),
        (_vocab_of_other_graphs, "vocab.safetensors", "do not belong"),
    ],
)
def test_bad_bundle_is_one_line_naming_the_file(copied_export, tiny_data, tmp_path, damage, file, words):
    bad = _bad_copy(copied_export, tmp_path)
    damage(bad)
    cand = tmp_path / "cand.h5"
    shutil.copyfile(tiny_data / "candidates.h5", cand)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, ["score", str(cand), "--model", str(bad), "--backend", "onnxruntime"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and file in lines[0] and words in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_an_export_of_format_2_scores_one_candidate_per_user_row(copied_export, tiny_data, tmp_path):
    """Format 2 exports took user_row per candidate; the backend feeds them so (their graphs reject slots),
    and the scores are the ones format 3's slots give."""
    old = _bad_copy(copied_export, tmp_path)
    m = json.loads((old / "manifest.json").read_text())
    assert m["version"] == 3
    m["version"] = 2
    (old / "manifest.json").write_text(json.dumps(m))
    with DataFile(tiny_data / "candidates.h5") as d:
        batch = next(d.batches(300, 200))
    new_s, old_s = Scorer(copied_export, "onnxruntime", threads=1), Scorer(old, "onnxruntime", threads=1)
    assert new_s.backend.slots and not old_s.backend.slots
    assert slot_layout(new_s.prepare(batch)[0].user_row).g > 1  # the new path does lay out slots here
    assert np.abs(new_s.score_batch(batch) - old_s.score_batch(batch)).max() <= 1e-6
