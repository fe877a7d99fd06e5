"""Users for retrieval: each user's most recent history, read by (seq, end), and its vector u.

A user's most recent history is the example with the largest visible `end` among all rows of that user in
the given files (ties go to the later file, then the later row). Its last T = max_len behaviours are what
the model reads; all of its visible behaviours are what `--exclude-seen` excludes.

Histories are read straight from the file's behaviour datasets by (seq, end), in a few contiguous slices
(requests sorted by position, nearby ones merged), so encoding a user costs one history read, whatever the
number of examples the user has. The same reader serves index building and retrieval evaluation; a test
checks that it assembles the same batches as `DataFile.batches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError

_MERGE_GAP = 1 << 15  # behaviour rows: gaps smaller than this are read through rather than seeked over


@dataclass
class Latest:
    """One history per user: raw user ids (sorted) and where that history lives."""

    users: np.ndarray  # int64 [U], sorted
    file: np.ndarray  # int64 [U]: index into paths
    seq: np.ndarray  # int64 [U]
    end: np.ndarray  # int64 [U]
    paths: list[Path]
    rows_read: int = 0

    def __len__(self) -> int:
        return len(self.users)


def default_sources(config: dict) -> list[Path]:
    """The run's training file, its validation file, and valid.h5 / test.h5 beside the training file."""
    data = config.get("data") or {}
    train = data.get("train")
    if not train:
        raise DmrxError("the run's config.json names no training file: give the data with --data")
    train = Path(train)
    if not train.exists():
        raise DmrxError(
            f"{train}: the run's training file is not there (moved, or a relative path from "
            "another directory): give the data with --data"
        )
    paths = [train]
    if data.get("valid"):
        paths.append(Path(data["valid"]))
    paths += [train.parent / "valid.h5", train.parent / "test.h5"]
    out, seen = [], set()
    for p in paths:
        if p.exists() and p.resolve() not in seen:
            seen.add(p.resolve())
            out.append(p)
    return out


def latest_histories(
    paths: list[Path], chunk_rows: int = 1 << 20, progress: Callable[[int], None] | None = None
) -> Latest:
    """Stream every file's (user, seq, end) columns, keeping per user the longest visible history."""
    state = None  # (user, end, rank, file, seq): the best row so far per user
    rows_read = 0
    for fi, path in enumerate(paths):
        with DataFile(path) as f:
            for start in range(0, f.n_rows, chunk_rows):
                stop = min(start + chunk_rows, f.n_rows)
                cols = f.read_columns(start, stop, ["user", "seq", "end"])
                rank = (np.int64(fi) << 40) + np.arange(start, stop, dtype=np.int64)
                chunk = (cols["user"], cols["end"], rank, np.full(stop - start, fi, np.int64), cols["seq"])
                state = (
                    chunk
                    if state is None
                    else tuple(np.concatenate([a, b]) for a, b in zip(state, chunk, strict=False))
                )
                state = _best_per_user(*state)
                rows_read += stop - start
                if progress is not None:
                    progress(stop - start)
    if state is None or not len(state[0]):
        names = ", ".join(str(p) for p in paths) or "(none)"
        raise DmrxError(f"no users: the data files hold no examples ({names})")
    user, end, _, file, seq = state
    return Latest(user, file, seq, end, list(paths), rows_read)


def _best_per_user(user, end, rank, file, seq):
    order = np.lexsort((rank, end, user))  # within a user: by end, then rank; the last one wins
    user = user[order]
    last = np.ones(len(user), bool)
    last[:-1] = user[1:] != user[:-1]
    keep = order[last]
    return user[last], end[keep], rank[keep], file[keep], seq[keep]


class HistoryReader:
    """Reads histories by (seq, end) from one data file: [B, T] windows and the visible match ids."""

    def __init__(self, path: Path, fields: list[str], max_len: int, encoder=None, seen_field: str | None = None):
        self.data = DataFile(path)  # validated on open; offsets
        missing = [f for f in fields if f not in self.data.fields.behaviors]
        if missing:
            self.data.close()
            raise DmrxError(f"{path}: lacks behaviors/{', behaviors/'.join(missing)}, which the model was trained with")
        self._h5 = h5py.File(path, "r")
        self.fields, self.max_len, self.encoder, self.seen_field = (
            list(fields),
            int(max_len),
            encoder,
            seen_field,
        )

    def close(self) -> None:
        self._h5.close()
        self.data.close()

    def __enter__(self) -> HistoryReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spans(self, name: str, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A buffer holding rows [lo_i, hi_i) of dataset `name`, and where each range starts in it."""
        start = np.zeros(len(lo), np.int64)
        nonempty = np.flatnonzero(hi > lo)
        if not len(nonempty):
            return np.zeros(0, np.int64), start
        order = nonempty[np.argsort(lo[nonempty], kind="stable")]
        slo, shi = lo[order], np.maximum.accumulate(hi[order])
        new = np.ones(len(order), bool)
        new[1:] = slo[1:] > shi[:-1] + _MERGE_GAP
        first = np.flatnonzero(new)
        c_lo, c_hi = slo[first], np.maximum.reduceat(shi, first)
        c_buf = np.concatenate([[0], np.cumsum(c_hi - c_lo)[:-1]])
        cluster = np.cumsum(new) - 1
        start[order] = c_buf[cluster] + slo - c_lo[cluster]
        ds = self._h5[name]
        try:
            parts = [ds[a:b] for a, b in zip(c_lo.tolist(), c_hi.tolist(), strict=False)]
        except OSError as e:
            raise DmrxError(
                f"{self.data.path}: dataset {name} cannot be read, the file is damaged or "
                f"truncated ({e.__class__.__name__})"
            ) from None
        buf = np.concatenate(parts).astype(np.int64, copy=False)
        return buf, start

    def read(self, seq: np.ndarray, end: np.ndarray) -> tuple[dict[str, np.ndarray], list[np.ndarray] | None]:
        """The batch encode_user reads ("hist/<field>" [B, T] right-aligned, "hist_len" [B]) and, with a
        seen_field, each history's visible ids of that field (encoded when the reader has an encoder)."""
        seq, end = np.asarray(seq, np.int64), np.asarray(end, np.int64)
        if len(seq) and (seq.min() < 0 or seq.max() >= self.data.n_sequences):
            raise DmrxError(f"{self.data.path}: sequence index out of range")
        off = self.data.offsets
        if len(seq) and (end > off[seq + 1] - off[seq]).any():
            raise DmrxError(f"{self.data.path}: a history end lies beyond its sequence")
        T = self.max_len
        hi = off[seq] + end
        length = np.minimum(end, T)
        slots = np.arange(T)
        batch: dict[str, np.ndarray] = {}
        seen = None
        for f in self.fields:
            full = f == self.seen_field
            lo = off[seq] if full else hi - length
            buf, start = self._spans(f"behaviors/{f}", lo, hi)
            if self.encoder is not None and len(buf):
                buf = self.encoder(f"hist/{f}", buf)
            first = start + (hi - lo) - T  # buffer position of window slot 0
            idx = first[:, None] + slots
            real = slots >= (T - length)[:, None]
            win = np.zeros((len(seq), T), np.int64)
            if len(buf):
                win[real] = buf[idx[real]]
            batch[f"hist/{f}"] = win
            if full:
                seen = [buf[s : s + n] for s, n in zip(start.tolist(), (hi - lo).tolist(), strict=False)]
        batch["hist_len"] = length
        if self.seen_field is not None and seen is None:
            lo = off[seq]
            buf, start = self._spans(f"behaviors/{self.seen_field}", lo, hi)
            if self.encoder is not None and len(buf):
                buf = self.encoder(f"hist/{self.seen_field}", buf)
            seen = [buf[s : s + n] for s, n in zip(start.tolist(), (hi - lo).tolist(), strict=False)]
        return batch, seen


class UserEncoder:
    """History batch -> u [B, d_v] float32, with torch (the run's model) or onnxruntime (the exported
    user_encoder graph, RUN/export/user_encoder.onnx)."""

    def __init__(self, bundle, backend: str = "torch"):
        model = bundle.model
        if not model.cfg.use_u2i:
            raise DmrxError(
                f"{bundle.path}: the model has no User-to-Item network (use_u2i is off), so it has "
                "no user vector u to retrieve with"
            )
        self.model, self.backend = model, backend
        self.fields = list(bundle.spec.behaviors)
        self.max_len = model.cfg.max_len
        if backend == "torch":
            self._sess = None
        elif backend == "onnxruntime":
            from dmrx.runtime import export_bundle
            from dmrx.runtime.ort import onnx_name, session

            export_dir = Path(bundle.path) / "export"
            if not export_bundle.is_export(export_dir):
                raise DmrxError(
                    f"{export_dir / 'user_encoder.onnx'}: not there; the onnxruntime backend uses the exported "
                    f"user encoder (run `dmrx export {bundle.path}` first, or use --backend torch)"
                )
            manifest = export_bundle.read(export_dir)
            if (manifest.get("source") or {}).get("weights_sha256") != bundle.weights_hash:
                raise DmrxError(
                    f"{export_dir}: exported from other weights than {bundle.path}/model.safetensors; "
                    f"re-export with `dmrx export {bundle.path}` or use --backend torch"
                )
            path = export_bundle.check_file(export_dir, manifest, export_bundle.graph_name("user_encoder", "fp32"))
            self._sess = session(path)
            self._inputs = {i.name: i for i in self._sess.get_inputs()}
            if "u" not in {o.name for o in self._sess.get_outputs()}:
                raise DmrxError(f"{path}: the graph has no output named 'u'")
            want = {onnx_name(f"hist/{f}") for f in self.fields} | {"hist_len"}
            unknown = sorted(set(self._inputs) - want)
            if unknown:
                raise DmrxError(f"{path}: unexpected inputs {unknown}; expected {sorted(want)}")
            self._name = onnx_name
        else:
            raise DmrxError(f"unknown backend {backend!r}: use torch or onnxruntime")

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if self._sess is None:
            with torch.inference_mode():
                feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
                return self.model.encode_user(feeds)["u"].float().numpy()
        feeds = {self._name(k): np.ascontiguousarray(v, dtype=np.int64) for k, v in batch.items()}
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}
        return np.asarray(self._sess.run(["u"], feeds)[0], dtype=np.float32)


def encode_users(
    bundle,
    latest: Latest,
    encoder: UserEncoder,
    batch_size: int = 2048,
    with_seen: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]]:
    """Yield (positions into latest.users, u [b, d_v], seen match indices per user) in read order."""
    enc = bundle.encoder()
    match = bundle.spec.match_field if with_seen else None
    for fi, path in enumerate(latest.paths):
        mine = np.flatnonzero(latest.file == fi)
        if not len(mine):
            continue
        mine = mine[np.lexsort((latest.end[mine], latest.seq[mine]))]  # file order: few, long reads
        with HistoryReader(path, encoder.fields, encoder.max_len, enc, match) as reader:
            for s in range(0, len(mine), batch_size):
                pos = mine[s : s + batch_size]
                batch, seen = reader.read(latest.seq[pos], latest.end[pos])
                yield pos, encoder(batch), seen
                if progress is not None:
                    progress(len(pos))
