"""docs/export-contract.md, followed by a program that knows nothing of dmrx: numpy, safetensors and ONNX
Runtime only, in a process where importing dmrx or torch fails. Its CTRs must be dmrx's own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dmrx.data.reader import DataFile
from dmrx.scoring import Scorer

# The caller: every step is a sentence of docs/export-contract.md.
CALLER = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("dmrx", "torch"):
            raise ImportError(f"{name} is not available to this program")
sys.meta_path.insert(0, _Blocked())

import hashlib, json
from pathlib import Path
import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

export, batch_file, flavour, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
manifest = json.loads((export / "manifest.json").read_text())
for name, digest in manifest["files"].items():
    assert hashlib.sha256((export / name).read_bytes()).hexdigest() == digest, name
model = json.loads((export / "model.json").read_text())
schema = json.loads((export / "schema.json").read_text())
vocab = {k[len("vocab."):]: v for k, v in load_file(str(export / "vocab.safetensors")).items()}
table_of = {key: table for table, keys in schema["tables"].items() for key in keys}

def encode(key, raw):
    ids = vocab[table_of[key]]
    pos = np.minimum(np.searchsorted(ids, raw), max(len(ids) - 1, 0))
    return np.where((len(ids) > 0) & (ids[pos] == raw), pos + 1, 0).astype(np.int64)

raw = dict(np.load(batch_file))
T = model["max_len"]
# one history per distinct user; each candidate points at its user's row
users, first, user_row = np.unique(raw["user"], return_index=True, return_inverse=True)
hist = {}
for f in schema["behaviors"]:
    r = raw[f"hist/{f}"][first][:, -T:]
    enc = encode(f"hist/{f}", r)
    real = np.arange(r.shape[1])[None, :] >= r.shape[1] - np.minimum(raw["hist_len"][first], T)[:, None]
    hist[f] = np.where(real, enc, 0)
suffix = "" if flavour == "fp32" else "." + flavour
options = ort.SessionOptions()
if flavour == "int8":  # the Q/DQ graphs, on a CPU that may lack VNNI
    options.add_session_config_entry("session.x64quantprecision", "1")
# INT8: keep the quantized matrix products on integer kernels (ONNX Runtime's MatMulAddFusion would not)
fusions = {"disabled_optimizers": ["MatMulAddFusion"]} if flavour != "fp32" else {}
user = ort.InferenceSession(str(export / f"user_encoder{suffix}.onnx"), options, providers=["CPUExecutionProvider"],
                            **fusions)
cand = ort.InferenceSession(str(export / f"candidate_scorer{suffix}.onnx"), options,
                            providers=["CPUExecutionProvider"], **fusions)
feeds = {f"hist__{f}": hist[f] for f in schema["behaviors"]}
feeds["hist_len"] = np.minimum(raw["hist_len"][first], T).astype(np.int64)
outs = dict(zip([o.name for o in user.get_outputs()], user.run(None, feeds)))
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
         "tensor(bool)": np.bool_}
key_of = {name: key for key, name in manifest["input_names"].items()}
# slots of G candidates, each user's candidates in slots of its own, free places index 0 / dense 0.0
G = 4
n_slots = -(-np.bincount(user_row) // G)
slot_user = np.repeat(np.arange(len(users)), n_slots)
first_slot = np.cumsum(n_slots) - n_slots
place = np.empty(len(user_row), np.int64)
for u in range(len(users)):
    mine = np.flatnonzero(user_row == u)
    place[mine] = first_slot[u] * G + np.arange(len(mine))
member = first[slot_user]  # inputs with axis "slots" take the slot's user's value (the same on all its rows)
feeds = {}
for i in cand.get_inputs():
    if i.name.startswith("user__"):
        x = outs[i.name[len("user__"):]]
    elif i.name == "user_row":
        x = slot_user
    elif i.name == "user_index":
        x = encode("user_index", raw["user"])
    else:
        key = key_of[i.name]
        if key.startswith("dense/"):
            f = key[len("dense/"):]
            x = (raw[key].astype(np.float32) - np.float32(schema["dense_mean"][f])) / np.float32(schema["dense_std"][f])
        else:
            x = encode(key, raw[key])
    if i.name == "user_row" or i.name.startswith("user__"):
        pass
    elif i.shape[0] == "slots":
        assert (x == x[first][user_row]).all(), i.name  # one value per user in this batch
        x = x[member]
    else:
        laid = np.zeros(len(slot_user) * G, x.dtype)
        laid[place] = x
        x = laid
    feeds[i.name] = np.ascontiguousarray(x, dtype=types[i.type])
np.save(out, cand.run(["ctr"], feeds)[0][place])
"""


# dmrx runs the CPU INT8 flavour for --precision int8: the caller runs the same graphs, so the CTRs agree to
# float rounding at either precision
@pytest.mark.parametrize("precision, flavour, tol", [("fp32", "fp32", 1e-6), ("int8", "int8-cpu", 1e-6)])
def test_a_program_that_knows_only_the_contract_scores_like_dmrx(
    copied_export, tiny_data, tmp_path, precision, flavour, tol
):
    scorer = Scorer(copied_export, backend="onnxruntime", precision=precision, threads=1)
    with DataFile(tiny_data / "candidates.h5") as d:
        keys = sorted(set(scorer.spec.batch_keys()) | {"user"})
        batch = next(d.batches(200, 200, keys=keys, behavior_fields=list(scorer.spec.behaviors)))
    # raw ids, histories wider than max_len (the caller keeps the last T), rows of several users
    raw = {k: np.asarray(v) for k, v in batch.items()}
    want = scorer.score_batch(raw)
    np.savez(tmp_path / "batch.npz", **raw)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CALLER),
            str(copied_export),
            str(tmp_path / "batch.npz"),
            flavour,
            str(tmp_path / "ctr.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "ctr.npy")
    assert got.shape == want.shape and len(np.unique(raw["user"])) > 1
    assert np.abs(got - want).max() <= tol, np.abs(got - want).max()
