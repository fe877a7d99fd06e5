"""Shards of a candidate file, and joining their outputs.

Shards (`shard=(i, n)`) are contiguous row ranges whose boundaries are moved forward to the next change of
user, so a user's candidates stay in one shard (and are grouped as in an unsharded run, for files sorted by
user as dmrx writes them). Each shard output records its row range; `merge_shards` checks that the ranges
tile the file exactly and joins them in row order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np

from dmrx.artifacts.atomic import atomic_file
from dmrx.artifacts.hdf5 import h5_writer
from dmrx.errors import DmrxError

SCORES_FORMAT = "dmrx-scores"


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DmrxError(f"--shard must be I/N (shard I of N, 0 <= I < N), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise DmrxError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return i, n


def shard_range(data, index: int, count: int, window: int = 4096) -> tuple[int, int]:
    """Rows [lo, hi) of shard `index` of `count`: equal slices moved forward to the next change of user."""
    N = data.n_rows

    def boundary(k: int) -> int:
        b = k * N // count
        if b <= 0 or b >= N:
            return min(max(b, 0), N)
        pos = b
        while pos < N:
            users = data.read_columns(pos - 1, min(pos + window, N), ["user"])["user"]
            change = np.flatnonzero(users[1:] != users[:-1])
            if len(change):
                return pos + int(change[0])
            pos += len(users) - 1
        return N

    return boundary(index), boundary(index + 1)


def read_scores_attrs(path: Path) -> tuple[dict, int]:
    path = Path(path)
    if not path.exists():
        raise DmrxError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as h5:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
            if "score" not in h5 or not isinstance(h5["score"], h5py.Dataset):
                raise DmrxError(f"{path}: missing dataset /score")
            n = h5["score"].shape[0]
    except OSError as e:
        kind = "not an HDF5 file" if not h5py.is_hdf5(path) else "damaged or truncated HDF5 file"
        raise DmrxError(f"{path}: {kind} ({e.__class__.__name__})") from None
    if attrs.get("dmrx_format") != SCORES_FORMAT:
        raise DmrxError(f"{path}: not a dmrx scores file (root attribute dmrx_format is not {SCORES_FORMAT!r})")
    return attrs, n


def merge_shards(paths: list[str | os.PathLike], out: str | os.PathLike | None = None) -> dict:
    """Join shard outputs of one candidate file into one /score in row order (checked to tile the file)."""
    t0 = time.perf_counter()
    if not paths:
        raise DmrxError("--merge needs the shard outputs to join")
    shards = []
    for p in paths:
        attrs, n = read_scores_attrs(Path(p))
        if n != attrs["row_stop"] - attrs["row_start"]:
            raise DmrxError(
                f"{p}: dataset /score has {n} rows, its row range {attrs['row_start']}:"
                f"{attrs['row_stop']} needs {attrs['row_stop'] - attrs['row_start']}"
            )
        shards.append((Path(p), attrs, n))
    ref = shards[0][1]
    for p, a, _ in shards[1:]:
        for key in (
            "input",
            "input_rows",
            "input_bytes",
            "input_mtime_ns",
            "model_hash",
            "backend",
            "precision",
            "shard_count",
        ):
            if a.get(key) != ref.get(key):
                raise DmrxError(
                    f"{p}: {key} {a.get(key)!r} differs from {shards[0][0]}'s {ref.get(key)!r}; "
                    "shards to merge must come from one input, model, backend and precision"
                )
    count = int(ref["shard_count"])
    seen = sorted(int(a["shard_index"]) for _, a, _ in shards)
    if seen != list(range(count)):
        dup = sorted({i for i in seen if seen.count(i) > 1})
        lost = sorted(set(range(count)) - set(seen))
        what = f"shard(s) {dup} given twice" if dup else f"shard(s) {lost} of {count} missing"
        raise DmrxError(f"--merge: {what}")
    shards.sort(key=lambda s: s[1]["row_start"])
    pos = 0
    for p, a, _ in shards:
        if a["row_start"] != pos:
            raise DmrxError(f"{p}: starts at row {a['row_start']}, expected {pos} (shards overlap or leave a gap)")
        pos = a["row_stop"]
    total = int(ref["input_rows"])
    if pos != total:
        raise DmrxError(f"--merge: shards cover rows 0:{pos} of {total}")
    if out is None:
        name = shards[0][0].name
        cut = name.find(".shard-")
        out = shards[0][0].with_name(name[:cut] + ".h5" if cut >= 0 else "merged." + name)
    out = Path(out)
    if any(out.resolve() == p.resolve() for p, _, _ in shards):
        raise DmrxError(f"{out}: the merged output would overwrite a shard; choose another --out")
    block = 1 << 20
    with atomic_file(out) as tmp:
        with h5_writer(tmp) as h5:
            ds = h5.create_dataset("score", shape=(total,), dtype="<f4")
            for p, a, n in shards:
                with h5py.File(p, "r") as src:
                    for s in range(0, n, block):
                        ds[a["row_start"] + s : a["row_start"] + min(s + block, n)] = src["score"][s : s + block]
            attrs = dict(ref)
            attrs.update(row_start=0, row_stop=total, shard_index=0, shard_count=1, merged_from=len(shards))
            for k, v in attrs.items():
                h5.attrs[k] = v
    return {
        "output": str(out),
        "rows": total,
        "shards": len(shards),
        "backend": ref["backend"],
        "precision": ref["precision"],
        "model_hash": ref["model_hash"],
        "wall_s": time.perf_counter() - t0,
    }
