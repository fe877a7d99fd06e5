"""AUC, gAUC and logloss over numpy arrays; the relevance units' means on clicks and non-clicks.

Hand-written rather than sklearn's roc_auc_score because gAUC needs one AUC per user for hundreds of
thousands of users: a per-group Python loop over sklearn is minutes, one grouped rank computation is
milliseconds. Both AUCs handle ties by average rank; tests check them against sklearn.
"""

from __future__ import annotations

import numpy as np


def _ranks(scores: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """1-based average ranks of scores within each group (ties share their mean rank)."""
    order = np.lexsort((scores, groups))
    s, g = scores[order], groups[order]
    n = len(s)
    new_run = np.ones(n, bool)
    new_run[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n)
    new_group = np.ones(n, bool)
    new_group[1:] = g[1:] != g[:-1]
    starts = np.flatnonzero(new_group)
    group_start = np.repeat(starts, np.diff(np.append(starts, n)))
    avg = (run_start + run_end + 1) / 2.0  # mean of positions run_start+1 .. run_end
    ranks = np.empty(n)
    ranks[order] = avg[run_id] - group_start
    return ranks


def grouped_auc(labels, scores, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group ids, AUC per group, rows per group) for the groups holding both labels."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    uniq, gidx = np.unique(np.asarray(groups), return_inverse=True)
    ranks = _ranks(scores, gidx)
    n_pos = np.bincount(gidx, weights=labels, minlength=len(uniq))
    n_all = np.bincount(gidx, minlength=len(uniq))
    n_neg = n_all - n_pos
    rank_sum = np.bincount(gidx, weights=ranks * labels, minlength=len(uniq))
    ok = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return uniq[ok], auc, n_all[ok]


def auc(labels, scores) -> float:
    labels = np.asarray(labels)
    _, a, _ = grouped_auc(labels, scores, np.zeros(len(labels), np.int64))
    return float(a[0]) if len(a) else float("nan")


def gauc(labels, scores, users) -> tuple[float, float]:
    """(gAUC weighted by each user's impressions, as DIN defines it; the unweighted mean over users)."""
    _, a, n = grouped_auc(labels, scores, users)
    if not len(a):
        return float("nan"), float("nan")
    return float((a * n).sum() / n.sum()), float(a.mean())


def logloss(labels, probs, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, np.float64), eps, 1 - eps)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


def relevance_means(res: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of each relevance unit (r, User-to-Item; r_hat, Item-to-Item) that `res` holds, over the clicks
    (res["label"] > 0) and over the non-clicks: mean_r_pos, mean_r_neg, mean_r_hat_pos, mean_r_hat_neg.
    A class without rows has mean NaN."""
    pos = np.asarray(res["label"]) > 0
    out = {}
    for unit in ("r", "r_hat"):
        if unit in res:
            values = np.asarray(res[unit], np.float64)
            for name, rows in (("pos", pos), ("neg", ~pos)):
                out[f"mean_{unit}_{name}"] = float(values[rows].mean()) if rows.any() else float("nan")
    return out


def report(labels, probs, users, true_probs=None) -> dict:
    """The metrics `dmrx evaluate` prints."""
    g, g_mean = gauc(labels, probs, users)
    out = {
        "rows": int(len(labels)),
        "auc": auc(labels, probs),
        "gauc": g,
        "gauc_user_mean": g_mean,
        "logloss": logloss(labels, probs),
        "label_rate": float(np.mean(labels)) if len(labels) else 0.0,
        "mean_pred": float(np.mean(probs)) if len(probs) else 0.0,
    }
    if true_probs is not None:
        out["oracle_auc"] = auc(labels, true_probs)
    return out
