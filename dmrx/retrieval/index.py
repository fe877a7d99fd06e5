"""Retrieval through V': a run's user vectors and item index, stored in the run, and top-k search over them.

DMR's User-to-Item network scores an item by r = u . v' (Eq. 5): u from the user's history, v' the item's
row of the output table V'. So nearest-item retrieval is top-k inner product of u against V'.

    RUN/index/
      manifest.json      format, version, the run's weights and vocabulary hashes, sizes, sources, recall
                         figures, and the sha256 of every file below (written last)
      items.npy          int64 [N]      raw ids of the match field (items; categories for Alimama-style runs)
      item_vectors.npy   float32 [N, d] V' rows 1..N (row 0, padding/unknown, is never retrieved)
      users.npy          int64 [U]      raw user ids, sorted
      user_vectors.npy   float32 [U, d] u of each user's most recent history
      seen_offsets.npy   int64 [U+1]    CSR: user i saw items seen_items[seen_offsets[i]:seen_offsets[i+1]]
      seen_items.npy     int64 [nnz]    positions in items.npy of every visible behaviour's match id
      hnsw.faiss         (--ann hnsw)   faiss IndexHNSWFlat over item_vectors, inner-product metric

Loading checks the format, that the index was built from this run's weights and vocabularies, and every
file's hash: a stale or damaged index is an error naming the fix, never silently wrong results. numpy .npy
files are read with allow_pickle=False.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmrx.artifacts import manifests
from dmrx.artifacts.atomic import atomic_dir
from dmrx.choices import ANN_KINDS, SEARCH_METHODS
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError
from dmrx.models import bundle as bundle_mod
from dmrx.retrieval.search import ExactSearch, HnswSearch, Int8Search, recall, topk_excluding
from dmrx.retrieval.users import UserEncoder, default_sources, encode_users, latest_histories

FORMAT = "dmrx-index"
VERSION = 1
INDEX_DIR = "index"
ARRAYS = ("items", "item_vectors", "users", "user_vectors", "seen_offsets", "seen_items")
HNSW_FILE = "hnsw.faiss"
METHODS = SEARCH_METHODS
RECALL_KS = (10, 50, 100)


def index_dir(run_dir: Path) -> Path:
    return Path(run_dir) / INDEX_DIR


def item_table(b) -> tuple[np.ndarray, np.ndarray]:
    """(raw ids [N], V' rows [N, d]) of a loaded bundle: the match table without its padding row 0."""
    import torch

    vocab = b.vocabs[b.spec.table_of()[f"target/{b.spec.match_field}"]]
    with torch.no_grad():
        vectors = b.model.output_table().detach().float().cpu().numpy()[1:]
    if len(vocab.ids) != len(vectors):
        raise DmrxError(f"{b.path}: the match vocabulary has {len(vocab.ids)} ids but V' has {len(vectors)} rows")
    return vocab.ids.astype(np.int64), np.ascontiguousarray(vectors, dtype=np.float32)


@dataclass
class Index:
    """A loaded, verified index. `search` works on numpy batches of user vectors and returns raw item ids."""

    path: Path
    manifest: dict
    items: np.ndarray
    item_vectors: np.ndarray
    users: np.ndarray
    user_vectors: np.ndarray
    seen_offsets: np.ndarray
    seen_items: np.ndarray
    _searchers: dict = field(default_factory=dict, repr=False)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def searcher(self, method: str = "exact", ef_search: int | None = None):
        if method not in METHODS:
            raise DmrxError(f"unknown search method {method!r}: use one of {', '.join(METHODS)}")
        if method not in self._searchers:
            if method == "exact":
                self._searchers[method] = ExactSearch(self.item_vectors)
            elif method == "int8":
                self._searchers[method] = Int8Search(self.item_vectors)
            else:
                path = self.path / HNSW_FILE
                if not path.exists():
                    raise DmrxError(
                        f"{self.path}: built without HNSW; rebuild with `dmrx index build "
                        f"{self.path.parent} --ann hnsw`, or search exactly"
                    )
                self._searchers[method] = HnswSearch.load(path, self.manifest["hnsw"]["ef_search"])
        s = self._searchers[method]
        if method == "hnsw" and ef_search is not None:
            s.ef_search = int(ef_search)
        return s

    def check_k(self, k: int) -> int:
        k = int(k)
        if k <= 0:
            raise DmrxError(f"--topk must be a positive number of items, got {k}")
        if k > self.n_items:
            raise DmrxError(f"--topk {k} is larger than the {self.n_items:,} items in the index")
        return k

    def user_rows(self, raw_ids: np.ndarray) -> np.ndarray:
        """Positions of raw user ids in the index, -1 for users it does not hold."""
        raw_ids = np.asarray(raw_ids, np.int64)
        if not self.n_users:
            return np.full(len(raw_ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.users, raw_ids), self.n_users - 1)
        return np.where(self.users[pos] == raw_ids, pos, -1)

    def seen(self, rows: np.ndarray) -> list[np.ndarray]:
        return [self.seen_items[self.seen_offsets[r] : self.seen_offsets[r + 1]] for r in np.asarray(rows).tolist()]

    def search(
        self,
        user_vectors: np.ndarray,
        k: int,
        method: str = "exact",
        exclude: list[np.ndarray] | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k raw item ids and scores u . v' per row of user_vectors (best first; -1 / -inf pad rows
        that have fewer than k items left after `exclude`, a list of item positions per row)."""
        k = self.check_k(k)
        s = self.searcher(method, ef_search)
        rows, scores = topk_excluding(s.search, user_vectors, k, exclude, self.n_items)
        return np.where(rows >= 0, self.items[np.maximum(rows, 0)], -1), scores

    def recommend(
        self,
        user_ids: np.ndarray,
        k: int,
        method: str = "exact",
        exclude_seen: bool = False,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top k for raw user ids that the index holds (check with user_rows first)."""
        rows = self.user_rows(user_ids)
        if (rows < 0).any():
            bad = np.asarray(user_ids)[rows < 0]
            raise DmrxError(f"user {bad[0]} is not in the index")
        exclude = self.seen(rows) if exclude_seen else None
        return self.search(self.user_vectors[rows], k, method, exclude, ef_search)


# ---- building ----------------------------------------------------------------------------------------
def build_index(
    run: str | Path | None = None,
    data: list[Path] | None = None,
    ann: str = "none",
    backend: str = "torch",
    ef_search: int = 128,
    hnsw_m: int = 32,
    ef_construction: int = 128,
    batch_size: int = 2048,
    progress: Callable[[str, int, int], Callable[[int], None]] | None = None,
    recall_users: int = 1000,
) -> dict:
    """Build RUN/index (replacing an older one atomically) and return its manifest.

    progress(task, total, ...) returns an advance(n) callback; None for no progress reporting.
    """
    if ann not in ANN_KINDS:
        raise DmrxError(f"--ann must be none or hnsw, got {ann!r}")
    if ef_search <= 0 or hnsw_m <= 0 or ef_construction <= 0:
        raise DmrxError("--ef-search, the HNSW M and efConstruction must be positive")
    t0 = time.perf_counter()
    b = bundle_mod.load(run)
    encoder = UserEncoder(b, backend)  # checks use_u2i and the backend before any reading
    if ann == "hnsw":
        from dmrx.retrieval.search import faiss_module

        faiss_module()
    paths = [Path(p) for p in data] if data else default_sources(b)
    for p in paths:
        if not p.exists():
            raise DmrxError(f"{p}: no such file")
    item_ids, item_vectors = item_table(b)
    n_rows = 0
    for p in paths:
        with DataFile(p) as f:  # validated here; only histories are read, so example fields may differ
            n_rows += f.n_rows
    latest = latest_histories(paths, progress=progress("reading users", n_rows) if progress else None)
    U = len(latest)
    user_vectors = np.zeros((U, item_vectors.shape[1]), np.float32)
    counts = np.zeros(U, np.int64)
    pieces = []  # per batch: (user positions, their counts, their distinct seen items in user order)
    advance = progress("encoding users", U) if progress else None
    for pos, u, seen in encode_users(b, latest, encoder, batch_size, progress=advance):
        user_vectors[pos] = u
        pos_items, c = _distinct_per_user(seen, len(item_ids))
        counts[pos] = c
        pieces.append((pos, c, pos_items))
    seen_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    seen_items = np.zeros(int(seen_offsets[-1]), np.int64)
    for pos, c, pos_items in pieces:
        starts = np.repeat(seen_offsets[pos], c)
        within = np.arange(len(pos_items)) - np.repeat(np.cumsum(c) - c, c)
        seen_items[starts + within] = pos_items
    del pieces

    figures: dict = {}
    hnsw = None
    sample = np.random.default_rng(0).choice(U, min(U, recall_users), replace=False)
    queries = user_vectors[np.sort(sample)]
    ks = [k for k in RECALL_KS if k <= len(item_ids)] or [len(item_ids)]
    if ann == "hnsw":
        hnsw = HnswSearch.build(
            item_vectors,
            hnsw_m,
            ef_construction,
            ef_search,
            progress=progress("building HNSW", len(item_ids)) if progress else None,
        )
    if len(queries):
        exact = ExactSearch(item_vectors)
        t = time.perf_counter()
        ref_rows, _ = exact.search(queries, max(ks))
        figures["exact_users_per_s"] = len(queries) / (time.perf_counter() - t)
        int8 = Int8Search(item_vectors)
        r8, _ = int8.search(queries, max(ks))
        figures["int8_recall"] = {str(k): recall(r8[:, :k], ref_rows[:, :k]) for k in ks}
        if hnsw is not None:
            t = time.perf_counter()
            rh, _ = hnsw.search(queries, max(ks))
            figures["hnsw_users_per_s"] = len(queries) / (time.perf_counter() - t)
            # recall@k of a top-k search (efSearch >= k), compared with the exact top k
            figures["hnsw_recall"] = {}
            for k in ks:
                rk, _ = hnsw.search(queries, k)
                figures["hnsw_recall"][str(k)] = recall(rk, ref_rows[:, :k])
        figures["recall_users"] = int(len(queries))

    target = index_dir(b.path)
    arrays = {
        "items": item_ids,
        "item_vectors": item_vectors,
        "users": latest.users.astype(np.int64),
        "user_vectors": user_vectors,
        "seen_offsets": seen_offsets,
        "seen_items": seen_items,
    }
    with atomic_dir(target, overwrite=True) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
        if hnsw is not None:
            hnsw.save(tmp / HNSW_FILE)
        manifest = manifests.write(
            tmp,
            FORMAT,
            VERSION,
            [f"{name}.npy" for name in arrays] + [HNSW_FILE] * (hnsw is not None),
            weights_hash=b.weights_hash,
            vocab_hash=b.manifest["files"].get("vocab.safetensors"),
            match_field=b.spec.match_field,
            n_items=int(len(item_ids)),
            n_users=int(U),
            dim=int(item_vectors.shape[1]),
            max_len=int(b.model.cfg.max_len),
            backend=backend,
            ann=ann,
            hnsw={"m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search} if ann == "hnsw" else None,
            sources=[{"path": str(p), "users": int((latest.file == i).sum())} for i, p in enumerate(paths)],
            rows_read=int(latest.rows_read),
            seen_behaviours=int(len(seen_items)),
            figures=figures,
            built_seconds=round(time.perf_counter() - t0, 3),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            versions=bundle_mod.library_versions(),
        )
    return {**manifest, "path": str(target)}


def _distinct_per_user(seen: list[np.ndarray], n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Match-table indices per user -> (distinct item positions, user by user; how many per user).
    Index 0 (padding / unknown) is no item and is dropped."""
    lens = np.array([len(s) for s in seen], np.int64)
    flat = np.concatenate(seen) if len(seen) else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(seen)), lens)
    keep = flat > 0
    keys = np.unique(owner[keep] * (n_items + 1) + flat[keep])  # sorted by user, then item
    return keys % (n_items + 1) - 1, np.bincount(keys // (n_items + 1), minlength=len(seen))


# ---- loading -------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    """The index manifest, format and version checked (not the files)."""
    return manifests.read(path, FORMAT, (VERSION,), missing=f" (rebuild it with `dmrx index build {path.parent}`)")


def load_index(run_dir: Path, run_manifest: dict | None = None) -> Index:
    """The run's index after checking it belongs to the run's weights and every file's hash."""
    run_dir = Path(run_dir)
    path = index_dir(run_dir)
    if not path.is_dir():
        raise DmrxError(f"{path}: no index; build it with `dmrx index build {run_dir}`")
    run_manifest = run_manifest if run_manifest is not None else bundle_mod.verify(run_dir)
    rebuild = f"; rebuild it with `dmrx index build {run_dir}`"
    manifest = manifests.verify(path, FORMAT, (VERSION,), missing=f" ({rebuild[2:]})", hint=rebuild)
    if manifest.get("weights_hash") != run_manifest["files"].get("model.safetensors") or manifest.get(
        "vocab_hash"
    ) != run_manifest["files"].get("vocab.safetensors"):
        raise DmrxError(f"{path}: built for other weights than {run_dir}/model.safetensors (the run changed){rebuild}")
    for name in [f"{a}.npy" for a in ARRAYS]:
        if name not in manifest["files"]:
            raise DmrxError(f"{path}/manifest.json: lists no {name}{rebuild}")
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(path / f"{name}.npy", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DmrxError(f"{path}/{name}.npy: unreadable ({e.__class__.__name__}){rebuild}") from None
    n, u = len(arrays["items"]), len(arrays["users"])
    if (
        arrays["item_vectors"].shape[0] != n
        or arrays["user_vectors"].shape[0] != u
        or len(arrays["seen_offsets"]) != u + 1
    ):
        raise DmrxError(f"{path}: inconsistent array sizes{rebuild}")
    return Index(path, manifest, **arrays)
