"""Top-k inner-product search of user vectors against an item table: numpy batches in, numpy batches out.

Every searcher has `search(user_vectors [B, d] float32, k) -> (rows [B, k] int64, scores [B, k] float32)`,
rows being positions in the item table it was built on, best first (-1 / -inf pad a row that has fewer
than k results). Nothing here knows about runs, files or raw ids, so the same objects plug into a Ray or
Spark map over numpy batches unchanged.

- `ExactSearch`: the default and the recall oracle. Users in blocks of 256 against items in cache-sized
  chunks, one matrix product per (block, chunk), reduced on the fly to per-block maxima; the k blocks with
  the largest maxima provably hold the k best items, which are then re-scored exactly. The item table is
  read once per block of users, not once per user, and no top-k over all items is ever taken.
- `Int8Search`: the fast single-user path. One pass over an int8 copy of the table (per-column scales
  folded into the query; u8 x s8 -> s32 matrix product in ONNX Runtime's MLAS kernels, exact integer
  arithmetic on every CPU: see Int8Search._open), a block-max shortlist (the best `shortlist` scores lie
  in the `shortlist` blocks of 64 items with the largest maxima, so no top-k over all items is needed),
  then exact fp32 re-ranking of the shortlist. Approximate: its recall against ExactSearch is measured by
  `dmrx index build` and benchmarks/retrieve.py.
- `HnswSearch`: faiss HNSW with the inner-product metric, the optional `[faiss]` extra; efSearch tunable.
"""

from __future__ import annotations

import numpy as np

from dmrx.errors import DmrxError

BLOCK = 64  # items per block of the int8 shortlist


def _as_queries(users: np.ndarray, dim: int) -> np.ndarray:
    users = np.ascontiguousarray(users, dtype=np.float32)
    if users.ndim == 1:
        users = users[None]
    if users.ndim != 2 or users.shape[1] != dim:
        raise DmrxError(f"user vectors must have shape [B, {dim}], got {list(users.shape)}")
    return users


def _check_k(k: int, n: int) -> int:
    k = int(k)
    if k <= 0:
        raise DmrxError(f"k must be positive, got {k}")
    if k > n:
        raise DmrxError(f"k = {k} is larger than the {n:,} items in the index")
    return k


class ExactSearch:
    """Exact top-k by blocked matrix products (torch CPU kernels over numpy memory, no copy).

    Pass 1, per block of users and cache-sized chunk of items: scores = U V_chunk^T, then the maximum of
    every run of BLOCK consecutive items. The k best items of a user lie in its k blocks with the largest
    maxima (a block holding one of the k best has a maximum >= the k-th best score, and at most k blocks
    do), so pass 2 re-scores just those k * BLOCK items exactly and takes their top k. No top-k over all
    items, no per-user pass over V'.
    """

    name = "exact"

    def __init__(self, items: np.ndarray, user_block: int = 256, chunk_floats: int = 1 << 18):
        try:
            import torch
        except ImportError:
            raise DmrxError(
                "exact search runs on torch's CPU kernels, which are not installed: use the int8 "
                "search (--search int8) or install torch"
            ) from None
        self.items = np.ascontiguousarray(items, dtype=np.float32)
        self._v = torch.from_numpy(self.items)
        self.n, self.dim = self.items.shape
        self.n_blocks = -(-self.n // BLOCK)
        padded = self.items
        if self.n % BLOCK:  # whole blocks for pass 2 (a copy only when n is not a multiple of BLOCK)
            padded = np.zeros((self.n_blocks * BLOCK, self.dim), np.float32)
            padded[: self.n] = self.items
        self._blocks = torch.from_numpy(padded).view(self.n_blocks, BLOCK, self.dim)
        self.user_block, self.chunk_floats = int(user_block), int(chunk_floats)

    def search(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        users = _as_queries(users, self.dim)
        k = _check_k(k, self.n)
        rows = np.empty((len(users), k), np.int64)
        scores = np.empty((len(users), k), np.float32)
        with torch.inference_mode():
            for b0 in range(0, len(users), self.user_block):
                r, s = self._block(torch.from_numpy(users[b0 : b0 + self.user_block]), k)
                rows[b0 : b0 + len(r)], scores[b0 : b0 + len(r)] = r.numpy(), s.numpy()
        return rows, scores

    def block_max(self, u):
        """[b, n_blocks]: each user's best score within every run of BLOCK items (torch tensors)."""
        import torch

        b = len(u)
        chunk = max(BLOCK, (self.chunk_floats // b) // BLOCK * BLOCK)  # b x chunk scores stay in cache
        out = torch.empty((b, self.n_blocks))
        for c0 in range(0, self.n, chunk):
            s = u @ self._v[c0 : c0 + chunk].T  # [b, C]
            c = s.shape[1]
            if c % BLOCK:  # the last, partial block: pad with -inf
                s = torch.cat([s, s.new_full((b, BLOCK - c % BLOCK), -torch.inf)], dim=1)
            torch.amax(s.view(b, -1, BLOCK), dim=2, out=out[:, c0 // BLOCK : c0 // BLOCK + s.shape[1] // BLOCK])
        return out

    def _block(self, u, k: int):
        import torch

        b = len(u)
        kb = min(k, self.n_blocks)
        blocks = self.block_max(u).topk(kb, dim=1, sorted=False).indices  # [b, kb]
        step = max(1, (1 << 22) // (kb * BLOCK * self.dim))  # bounded gathers: ~16 MB at a time
        slots = torch.arange(BLOCK)
        best_v, best_i = [], []
        for s0 in range(0, b, step):
            bl, uu = blocks[s0 : s0 + step], u[s0 : s0 + step]
            vec = self._blocks.index_select(0, bl.reshape(-1)).view(len(bl), kb * BLOCK, self.dim)
            sc = torch.bmm(vec, uu.unsqueeze(2)).squeeze(2)  # [b', kb * BLOCK]: exact fp32 scores
            cand = (bl.unsqueeze(2) * BLOCK + slots).reshape(len(bl), -1)
            sc = sc.masked_fill(cand >= self.n, -torch.inf)
            v, i = sc.topk(k, dim=1)
            best_v.append(v)
            best_i.append(cand.gather(1, i))
        return torch.cat(best_i), torch.cat(best_v)


class Int8Search:
    """Int8 pass over the table, block-max shortlist, exact fp32 re-ranking (see the module docstring)."""

    name = "int8"

    def __init__(self, items: np.ndarray, shortlist: int = 1024, threads: int = 0):
        self.items = np.ascontiguousarray(items, dtype=np.float32)
        self.threads = int(threads)
        self.n, self.dim = self.items.shape
        self.shortlist = int(shortlist)
        scale = np.abs(self.items).max(axis=0) / 127.0
        self.scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # per column
        self.n_blocks = -(-self.n // BLOCK)
        codes = np.zeros((self.n_blocks * BLOCK, self.dim), np.int8)  # padded rows score 0, dropped later
        codes[: self.n] = np.clip(np.rint(self.items / self.scale), -127, 127)
        self.codes = codes
        self._open()

    def _open(self) -> None:
        from dmrx.runtime.ort import session

        # On x86 without VNNI, MLAS's U8S8 kernel (VPMADDUBSW) adds pairs of u8*s8 products into a saturating
        # int16: query bytes up to 255 times codes up to +-127 clip, and the clipped scores are the large, aligned
        # ones that matter (AVX2 EPYC, 1M Gaussian items: recall@50 0.9998 instead of 1.0). The session's
        # X64_PRECISION makes it U8U8, exact (see dmrx.runtime.ort; ~5-8% single-user latency there, none with
        # VNNI or off x86). 7-bit codes in [-64, 63] could not clip either, but are coarser (true top 10 in a
        # 10-item shortlist: 0.968 of them, 0.982 with 8 bits).
        self._sess = session(self._graph(self.codes), threads=self.threads)

    def __getstate__(self) -> dict:  # picklable (Ray, Spark): the session is rebuilt on arrival
        return {k: v for k, v in self.__dict__.items() if k != "_sess"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    @staticmethod
    def _graph(codes: np.ndarray):
        from onnx import TensorProto as TP
        from onnx import helper
        from onnx import numpy_helper as nh

        n_pad, d = codes.shape
        inits = [
            nh.from_array(np.ascontiguousarray(codes.T), "codes"),
            nh.from_array(np.array(128, np.uint8), "zero_point"),
            nh.from_array(np.array([0, n_pad // BLOCK, BLOCK], np.int64), "blocked"),
            nh.from_array(np.array([0, -1], np.int64), "flat"),
            nh.from_array(np.array([2], np.int64), "axis2"),
            nh.from_array(np.array([-1], np.int64), "last"),
        ]
        nodes = [
            helper.make_node("MatMulInteger", ["query", "codes", "zero_point"], ["scores"]),  # [B, n_pad]
            helper.make_node("Reshape", ["scores", "blocked"], ["by_block"]),  # [B, n_blocks, BLOCK]
            helper.make_node("ReduceMax", ["by_block", "axis2"], ["block_max"], keepdims=0),
            helper.make_node("TopK", ["block_max", "k_blocks"], ["_bv", "blocks"], sorted=0),
            helper.make_node("Unsqueeze", ["blocks", "last"], ["blocks_nd"]),
            helper.make_node("GatherND", ["by_block", "blocks_nd"], ["picked"], batch_dims=1),
            helper.make_node("Reshape", ["picked", "flat"], ["picked_flat"]),  # [B, k_blocks * BLOCK]
            helper.make_node("TopK", ["picked_flat", "k_items"], ["_cv", "within"], sorted=0),
        ]
        graph = helper.make_graph(
            nodes,
            "dmrx_int8_shortlist",
            [
                helper.make_tensor_value_info("query", TP.UINT8, ["B", d]),
                helper.make_tensor_value_info("k_blocks", TP.INT64, [1]),
                helper.make_tensor_value_info("k_items", TP.INT64, [1]),
            ],
            [
                helper.make_tensor_value_info("blocks", TP.INT64, ["B", None]),
                helper.make_tensor_value_info("within", TP.INT64, ["B", None]),
            ],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        return model

    def quantize(self, users: np.ndarray) -> np.ndarray:
        """uint8 queries (zero point 128, one scale per row: a row's ranking ignores its scale)."""
        x = users * self.scale
        s = np.abs(x).max(axis=1, keepdims=True) / 127.0
        s[s == 0] = 1.0
        return (np.rint(x / s) + 128).clip(1, 255).astype(np.uint8)

    def candidates(self, users: np.ndarray, length: int) -> np.ndarray:
        """Shortlist rows [B, <= length] by int8 score (may include padded rows >= n)."""
        kb = min(length, self.n_blocks)
        ki = min(length, kb * BLOCK)
        step = max(1, (1 << 24) // (self.n_blocks * BLOCK))  # the int32 scores of a call stay <= 64 MB
        out = []
        for s in range(0, len(users), step):
            feeds = {"query": self.quantize(users[s : s + step]), "k_blocks": np.array([kb]), "k_items": np.array([ki])}
            blocks, within = self._sess.run(None, feeds)
            out.append(np.take_along_axis(blocks, within // BLOCK, axis=1) * BLOCK + within % BLOCK)
        return np.concatenate(out) if out else np.zeros((0, ki), np.int64)

    def search(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        users = _as_queries(users, self.dim)
        k = _check_k(k, self.n)
        length = max(self.shortlist, 4 * k)
        step = max(1, (1 << 22) // (length * self.dim))  # re-rank gathers stay <= 16 MB
        parts = [self._search(users[s : s + step], k, length) for s in range(0, len(users), step)]
        if not parts:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search(self, users: np.ndarray, k: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        cand = self.candidates(users, length)
        valid = cand < self.n
        vec = self.items[np.where(valid, cand, 0)]  # [B, L, d]
        exact = np.einsum("bld,bd->bl", vec, users)
        exact[~valid] = -np.inf
        kk = min(k, exact.shape[1])
        top = np.argpartition(-exact, kk - 1, axis=1)[:, :kk]
        top_s = np.take_along_axis(exact, top, 1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        rows = np.take_along_axis(cand, top, 1)
        scores = np.take_along_axis(top_s, order, 1).astype(np.float32)
        rows[~np.isfinite(scores)] = -1
        return _pad(rows, scores, k)


def _pad(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if rows.shape[1] == k:
        return rows, scores
    extra = k - rows.shape[1]
    return (
        np.concatenate([rows, np.full((len(rows), extra), -1, np.int64)], 1),
        np.concatenate([scores, np.full((len(rows), extra), -np.inf, np.float32)], 1),
    )


def faiss_module():
    """faiss, or a DmrxError saying how to get it (it is the optional `[faiss]` extra)."""
    try:
        import faiss
    except ImportError:
        raise DmrxError("HNSW needs faiss, dmrx's optional faiss extra: pip install faiss-cpu") from None
    return faiss


class HnswSearch:
    """faiss HNSW (flat storage, inner-product metric)."""

    name = "hnsw"

    def __init__(self, index, ef_search: int = 128):
        self.index = index
        self.n, self.dim = index.ntotal, index.d
        self.ef_search = int(ef_search)

    @classmethod
    def build(
        cls, items: np.ndarray, m: int = 32, ef_construction: int = 128, ef_search: int = 128, progress=None
    ) -> HnswSearch:
        faiss = faiss_module()
        items = np.ascontiguousarray(items, dtype=np.float32)
        index = faiss.IndexHNSWFlat(items.shape[1], int(m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(ef_construction)
        step = 1 << 16
        for s in range(0, len(items), step):
            index.add(items[s : s + step])
            if progress is not None:
                progress(min(step, len(items) - s))
        return cls(index, ef_search)

    @classmethod
    def load(cls, path, ef_search: int) -> HnswSearch:
        return cls(faiss_module().read_index(str(path)), ef_search)

    def save(self, path) -> None:
        faiss_module().write_index(self.index, str(path))

    def __getstate__(self) -> dict:  # picklable (Ray, Spark)
        return {"index": faiss_module().serialize_index(self.index), "ef_search": self.ef_search}

    def __setstate__(self, state: dict) -> None:
        self.__init__(faiss_module().deserialize_index(state["index"]), state["ef_search"])

    def search(self, users: np.ndarray, k: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        faiss = faiss_module()
        users = _as_queries(users, self.dim)
        k = _check_k(k, self.n)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(int(ef_search or self.ef_search), k)
        scores, rows = self.index.search(users, k, params=params)
        rows = rows.astype(np.int64)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return rows, scores


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx_row ∩ exact_row| / k (both [B, k] row ids; -1 never counts)."""
    hits = [
        len(np.intersect1d(a[a >= 0], e[e >= 0])) / max((e >= 0).sum(), 1) for a, e in zip(approx, exact, strict=False)
    ]
    return float(np.mean(hits)) if hits else float("nan")


def topk_excluding(
    search, users: np.ndarray, k: int, exclude: list[np.ndarray] | None, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """`search(users, k')` with each user's `exclude` rows removed: fetch k + |exclude| and filter, which
    stays exact for an exact search. Rows short of k results are padded with -1 / -inf."""
    if exclude is None:
        return search(users, k)
    extra = max((len(e) for e in exclude), default=0)
    kk = min(k + extra, n)
    rows, scores = search(users, kk)
    out_r = np.full((len(users), k), -1, np.int64)
    out_s = np.full((len(users), k), -np.inf, np.float32)
    for i, ex in enumerate(exclude):
        keep = (rows[i] >= 0) & ~np.isin(rows[i], ex) if len(ex) else rows[i] >= 0
        r, s = rows[i][keep][:k], scores[i][keep][:k]
        out_r[i, : len(r)], out_s[i, : len(s)] = r, s
    return out_r, out_s
