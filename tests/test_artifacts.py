"""The shared writers: atomic files and directories with the umask's modes, strict JSON, manifests."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from safetensors.numpy import save_file

from dmrx.artifacts import manifests
from dmrx.artifacts.atomic import atomic_dir, atomic_file, dumps, write_json
from dmrx.errors import DmrxError


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_finished_files_follow_the_umask_whoever_wrote_them(tmp_path, umask_027):
    with atomic_file(tmp_path / "w.safetensors") as tmp:
        save_file({"a": np.zeros(3)}, str(tmp))  # safetensors writes 0600
    assert _mode(tmp_path / "w.safetensors") == 0o640
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        save_file({"a": np.zeros(3)}, str(tmp / "sub" / "x.safetensors"))
    assert _mode(tmp_path / "d") == _mode(tmp_path / "d" / "sub") == 0o750  # mkdtemp makes 0700
    assert _mode(tmp_path / "d" / "sub" / "x.safetensors") == 0o640


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_when_asked(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("1")
    with pytest.raises(DmrxError, match="exists"), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["old"]
    with atomic_dir(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["new"]


def test_json_is_strict():
    text = dumps({"auc": float("nan"), "n": np.int64(3), "x": np.float32(0.5), "inf": [float("inf")]})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}")) == {
        "auc": None,
        "n": 3,
        "x": 0.5,
        "inf": [None],
    }


def test_manifest_round_trip_and_every_fault_named(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text("{}")
    m = manifests.write(tmp_path, "dmrx-thing", 1, ["a.bin", "sub/b.json"], note="hi")
    assert m["files"]["a.bin"] == manifests.sha256(tmp_path / "a.bin") and m["note"] == "hi"
    assert manifests.verify(tmp_path, "dmrx-thing", (1,)) == json.loads((tmp_path / "manifest.json").read_text())
    with pytest.raises(DmrxError, match="not a dmrx other manifest"):
        manifests.verify(tmp_path, "dmrx-other", (1,))
    with pytest.raises(DmrxError, match="version 1 is not supported"):
        manifests.verify(tmp_path, "dmrx-thing", (2,))
    (tmp_path / "a.bin").write_bytes(b"abd")
    with pytest.raises(DmrxError, match=r"a\.bin: damaged"):
        manifests.verify(tmp_path, "dmrx-thing", (1,))
    (tmp_path / "a.bin").unlink()
    with pytest.raises(DmrxError, match=r"a\.bin: missing"):
        manifests.verify(tmp_path, "dmrx-thing", (1,))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DmrxError, match="damaged thing manifest"):
        manifests.read(tmp_path, "dmrx-thing", (1,))
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DmrxError, match="manifest.json is missing"):
        manifests.read(tmp_path, "dmrx-thing", (1,))


def test_write_json_lands_whole(tmp_path):
    write_json(tmp_path / "s.json", {"rows": 3}, durable=True)
    assert json.loads((tmp_path / "s.json").read_text()) == {"rows": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
