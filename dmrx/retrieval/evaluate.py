"""Offline retrieval evaluation: HitRate@K, Recall@K and NDCG@K of held-out positives, DMR vs most-popular.

A query is a distinct (user, seq, end) among the labelled-positive rows of the test file: the user's vector
u comes from exactly that history (the test row's own, which cannot contain its held-out target), and its
relevant set is the match ids of those rows' targets. DMR ranks all items by u . v' (exact search); the
baseline ranks them by their count among the training file's behaviours (the run's sampler counts). A
held-out item outside the model's vocabulary is counted, and can be hit by neither.

Per query: HitRate@K = 1 if any relevant item is in the top K; Recall@K = relevant items in the top K /
relevant items; NDCG@K = DCG / ideal DCG with binary gains. Each user's queries are averaged first, then
users (so a user with many test rows weighs as much as one with a single held-out item, as in leave-last-out).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from dmrx.data.reader import DataFile, HistoryReader
from dmrx.errors import DmrxError
from dmrx.retrieval.search import ExactSearch, topk_excluding
from dmrx.retrieval.users import UserEncoder

KS = (10, 50, 100)


def metrics_from_hits(hits: np.ndarray, n_rel: np.ndarray, query_user: np.ndarray, ks) -> dict[str, float]:
    """hits [Q, Kmax] bool (rank j holds a relevant item), n_rel [Q] relevant items per query."""
    out: dict[str, float] = {}
    discount = 1.0 / np.log2(np.arange(hits.shape[1]) + 2.0)
    _, uidx = np.unique(query_user, return_inverse=True)
    per_user = np.bincount(uidx).astype(np.float64)

    def macro(v: np.ndarray) -> float:
        if not len(v):
            return float("nan")
        return float((np.bincount(uidx, weights=v) / per_user).mean())

    for k in ks:
        h = hits[:, :k]
        n_hit = h.sum(axis=1)
        ideal = np.cumsum(discount)[np.minimum(n_rel, k) - 1]
        out[f"hit_rate@{k}"] = macro((n_hit > 0).astype(np.float64))
        out[f"recall@{k}"] = macro(n_hit / n_rel)
        out[f"ndcg@{k}"] = macro((h * discount[:k]).sum(axis=1) / ideal)
    return out


def _hits(recs: np.ndarray, rel_query: np.ndarray, rel_item: np.ndarray, n_items: int) -> np.ndarray:
    """recs [Q, K] item positions; (rel_query, rel_item) pairs -> hits [Q, K]."""
    q = np.arange(len(recs))[:, None]
    keys = q * (n_items + 1) + np.where(recs >= 0, recs, n_items)
    rel = rel_query * (n_items + 1) + rel_item
    return np.isin(keys, rel)


def evaluate(
    b,
    data: Path,
    ks=KS,
    exclude_seen: bool = False,
    backend: str = "torch",
    batch_size: int = 2048,
    chunk_rows: int = 1 << 20,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> dict:
    """Retrieval metrics of run bundle `b` on a labelled test file; see the module docstring."""
    from dmrx.retrieval.index import item_table

    encoder = UserEncoder(b, backend)
    spec = b.spec
    match_key = f"target/{spec.match_field}"
    match_vocab = b.vocabs[spec.table_of()[match_key]]
    item_ids, item_vectors = item_table(b)
    n = len(item_ids)
    ks = sorted({min(int(k), n) for k in ks})
    kmax = ks[-1]

    with DataFile(data) as f:
        if not f.fields.has_label:
            raise DmrxError(f"{data}: examples/label is missing; retrieval evaluation needs labelled positives")
        if spec.match_field not in f.fields.target:
            raise DmrxError(f"{data}: lacks examples/{match_key}, the held-out items to find")
        parts = []
        for start in range(0, f.n_rows, chunk_rows):
            cols = f.read_columns(start, min(start + chunk_rows, f.n_rows), ["user", "seq", "end", "label", match_key])
            pos = cols["label"] > 0
            parts.append(
                np.stack([cols["user"][pos], cols["seq"][pos], cols["end"][pos], cols[match_key][pos]], axis=1)
            )
        rows = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
    if not len(rows):
        raise DmrxError(f"{data}: no positive (label 1) rows to evaluate")
    # queries: distinct (user, seq, end); relevant items: the positives' targets (item positions, -1 unknown)
    keys, qidx = np.unique(rows[:, :3], axis=0, return_inverse=True)
    qidx = qidx.reshape(-1)
    target = match_vocab.encode(rows[:, 3]) - 1
    pairs = np.unique(np.stack([qidx, target], 1), axis=0)
    n_rel = np.bincount(pairs[:, 0], minlength=len(keys))
    known = pairs[:, 1] >= 0
    Q = len(keys)

    dmr = np.full((Q, kmax), -1, np.int64)
    pop = np.full((Q, kmax), -1, np.int64)
    counts = np.asarray(b.sampler, np.float64)[1:]
    pop_order = np.lexsort((np.arange(n), -counts))  # most popular first, ties by index
    exact = ExactSearch(item_vectors)
    advance = progress("encoding and searching", Q) if progress else None
    with HistoryReader(
        Path(data), encoder.fields, encoder.max_len, b.encoder(), spec.match_field if exclude_seen else None
    ) as reader:
        for s in range(0, Q, batch_size):
            sl = slice(s, min(s + batch_size, Q))
            batch, seen = reader.read(keys[sl, 1], keys[sl, 2])
            u = encoder(batch)
            exclude = [np.unique(x[x > 0] - 1) for x in seen] if exclude_seen else None
            dmr[sl], _ = topk_excluding(exact.search, u, kmax, exclude, n)
            if exclude is None:
                pop[sl] = pop_order[:kmax]
            else:
                for i, ex in enumerate(exclude):
                    keep = pop_order[: kmax + len(ex)]
                    keep = keep[~np.isin(keep, ex)][:kmax]
                    pop[s + i, : len(keep)] = keep
            if advance:
                advance(sl.stop - sl.start)
    rel_q, rel_i = pairs[known, 0], pairs[known, 1]
    result = {
        "data": str(data),
        "queries": int(Q),
        "users": int(len(np.unique(keys[:, 0]))),
        "positives": int(len(rows)),
        "unknown_positives": int((target < 0).sum()),
        "items": int(n),
        "k": ks,
        "exclude_seen": bool(exclude_seen),
        "dmr": metrics_from_hits(_hits(dmr, rel_q, rel_i, n), n_rel, keys[:, 0], ks),
        "most_popular": metrics_from_hits(_hits(pop, rel_q, rel_i, n), n_rel, keys[:, 0], ks),
    }
    return result
