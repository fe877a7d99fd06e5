"""Users for retrieval: each user's most recent history, read by (seq, end), and its vector u.

A user's most recent history is the example with the largest visible `end` among all rows of that user in
the given files (ties go to the later file, then the later row). Its last T = max_len behaviours are what
the model reads; all of its visible behaviours are what `--exclude-seen` excludes.

Histories are read straight from the file's behaviour datasets by (seq, end) with the data reader's
HistoryReader (dmrx.data.reader), so encoding a user costs one history read, whatever the number of examples
the user has, and the histories are the ones training and evaluation batches hold. The same reader serves
index building and retrieval evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmrx.data.reader import DataFile, HistoryReader
from dmrx.errors import DmrxError
from dmrx.models.bundle import run_data


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


def default_sources(b) -> list[Path]:
    """The run's training file (required), its validation file, and valid.h5 / test.h5 beside the training
    file: those that exist, each once."""
    paths = [run_data(b.path, "train", config=b.config)]
    for role in ("valid", "valid.h5", "test.h5"):
        path = run_data(b.path, role, config=b.config, missing_ok=True)
        if path is not None:
            paths.append(path)
    out, seen = [], set()
    for p in paths:
        if p.resolve() not in seen:
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


class UserEncoder:
    """History batch -> u [B, d_v] float32: with torch (the run's model), or with onnxruntime (the exported
    user_encoder graph: RUN/export beside a run, or an export bundle on its own, which needs no torch)."""

    def __init__(self, bundle, backend: str = "torch"):
        from dmrx.runtime import export_bundle

        exported = isinstance(bundle, export_bundle.ExportBundle)
        arch = bundle.settings["arch"] if exported else bundle.model.cfg.model
        if arch != "dmr":
            raise DmrxError(
                f"{bundle.path}: a {arch} baseline has no user vector u and no output item table V'; "
                "retrieval needs a DMR run (dmrx train --arch dmr)"
            )
        if not bundle.use_u2i:
            raise DmrxError(
                f"{bundle.path}: the model has no User-to-Item network, so it has no user vector u to retrieve with"
            )
        self.backend = backend
        self.fields = list(bundle.spec.behaviors)
        self.max_len = bundle.max_len
        if backend == "torch":
            if exported:
                raise DmrxError(f"{bundle.path}: an export bundle encodes users with --backend onnxruntime")
            self.model, self._sess = bundle.model, None
        elif backend == "onnxruntime":
            from dmrx.runtime.ort import onnx_name, session

            export_dir = bundle.path if exported else Path(bundle.path) / "export"
            if not exported and not export_bundle.is_export(export_dir):
                raise DmrxError(
                    f"{export_dir / 'user_encoder.onnx'}: not there; the onnxruntime backend uses the exported "
                    f"user encoder (run `dmrx export {bundle.path}` first, or use --backend torch)"
                )
            manifest = bundle.manifest if exported else export_bundle.read(export_dir)
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
            import torch

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
