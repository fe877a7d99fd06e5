"""The embedded default data: an Alimama-like click log that dmrx generates itself, deterministic for a seed.

How it is made (all vectorised numpy):
- Items live in a latent space: an item's vector is its category's direction, half its brand's, and a
  small part of its own (item_noise); brands belong to one category; popularity is log-normal. A model sees
  each item a few dozen times, so an item's own part is nearly unlearnable: on the default data a model
  that knew categories and brands exactly would close 97.7% of the oracle's gap
  (benchmarks/synthetic_ceiling.py). Users carry a long-term taste p_u (pulled towards a gender-specific
  centre, so profile fields carry signal).
- Each user's interest s_t drifts as a random walk around p_u. At every step the user picks an item by a
  softmax over a popularity-sampled pool scored against s_t; the behaviour type (pv/cart/fav/buy) is more
  often a strong one when the item fits s_t well. Recent behaviours therefore say more than old ones.
- Impressions happen at random points of each user's sequence. Their targets are partly interest-driven
  (the way a matching stage would retrieve them) and partly popular items. The click logit adds the
  target's similarity to what the visible history shows (a recency-weighted sum of the behaviours' item
  vectors, each step back weighing 0.7 as much, and their plain sum), a modest popularity term, and small
  context/profile effects (pid, price by shopping level, gender by category group). Clicks depend on the
  visible history, not the hidden state, so a model could in principle approach the oracle. The true
  probability is stored, so the oracle AUC is known.
- Splits are by time within each user: the first 80% of impressions train, the next 10% validate, the
  last 10% test. candidates.h5 holds ~20 unlabelled candidates per user at the end of the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmrx.artifacts.atomic import check_destination
from dmrx.data.format import Writer

BTAGS = np.array([1, 2, 3, 4])  # pv, cart, fav, buy
RECENCY = 0.7  # weight of a behaviour one step older in the click model's recent-interest vector


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 10_000
    # Sized so that ~36k training clicks can teach the latent space: 20,000 items, 200 categories, 2,000
    # brands, 16 dimensions and a 5% click rate are more than any model learns from this many rows (DMR
    # closed 49% of the oracle's gap; three times the impressions moved it more than any model option).
    # README, "The embedded synthetic data", compares the two.
    items: int = 5_000
    cates: int = 50
    brands: int = 200
    dim: int = 8  # latent dimension of the generator (unrelated to the model's embedding size)
    mean_len: int = 40  # mean behaviours per user
    max_len: int = 150
    impressions_per_user: int = 30
    candidates_per_user: int = 20
    ctr: float = 0.15
    item_noise: float = 0.05  # per-item part of an item's latent vector, beside its category and brand
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _unit_or_zero(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0)


class _World:
    """Latent items, users and their behaviour sequences."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        rng = self.rng = np.random.default_rng(cfg.seed)
        k = cfg.dim
        cate_vec = _unit(rng.normal(size=(cfg.cates, k)))
        self.item_cate = rng.integers(0, cfg.cates, cfg.items)
        brand_cate = rng.integers(0, cfg.cates, cfg.brands)
        # an item's brand is one of its category's brands (or any brand when the category has none)
        by_cate = [np.flatnonzero(brand_cate == c) for c in range(cfg.cates)]
        self.item_brand = np.array(
            [rng.choice(b) if len(b) else rng.integers(cfg.brands) for b in (by_cate[c] for c in self.item_cate)]
        )
        brand_vec = _unit(rng.normal(size=(cfg.brands, k)))
        # mostly category and brand: what a model can learn from a few impressions per item
        self.item_vec = _unit(
            cate_vec[self.item_cate]
            + 0.5 * brand_vec[self.item_brand]
            + cfg.item_noise * rng.normal(size=(cfg.items, k))
        )
        self.item_pop = rng.normal(0.0, 1.0, cfg.items)
        self.item_price = np.exp(rng.normal(3.0, 0.8, cfg.items)).astype(np.float32)
        self.cate_group = self.item_cate % 4

        self.gender = rng.integers(1, 3, cfg.users)
        self.age = rng.integers(1, 8, cfg.users)
        self.shopping = rng.integers(1, 4, cfg.users)
        centres = _unit(rng.normal(size=(3, k)))
        self.taste = _unit(0.6 * centres[self.gender] + rng.normal(size=(cfg.users, k)))
        lengths = rng.poisson(cfg.mean_len, cfg.users)
        self.lengths = np.clip(lengths, 5, cfg.max_len)
        self._simulate()

    def _pick(self, state: np.ndarray, pool_size: int, sharpness: float) -> np.ndarray:
        """For every row of `state`, an item sampled by softmax(sharpness * fit + popularity) over a pool."""
        pop_p = np.exp(self.item_pop)
        pool = self.rng.choice(self.cfg.items, size=pool_size, replace=False, p=pop_p / pop_p.sum())
        logits = (sharpness * state @ self.item_vec[pool].T + self.item_pop[pool]).astype(np.float32)
        # inverse-CDF sampling per row: one exp per entry, cheaper than Gumbel noise (two logs per entry)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(weights, axis=1)
        u = self.rng.random(len(state), dtype=np.float32)[:, None] * cdf[:, -1:]
        return pool[np.minimum((cdf < u).sum(axis=1), pool_size - 1)]

    def _simulate(self) -> None:
        cfg, rng = self.cfg, self.rng
        T = cfg.max_len
        state = _unit(self.taste + 0.5 * rng.normal(size=self.taste.shape))
        self.states = np.empty((cfg.users, T + 1, cfg.dim))  # states[u, t] = interest after t behaviours
        self.states[:, 0] = state
        items = np.empty((cfg.users, T), np.int64)
        btags = np.empty((cfg.users, T), np.int64)
        for t in range(T):
            items[:, t] = self._pick(state, 256, 6.0)
            fit = np.einsum("uk,uk->u", state, self.item_vec[items[:, t]])
            strong = rng.random(cfg.users) < 0.05 + 0.25 * np.clip(fit, 0, 1)
            btags[:, t] = np.where(strong, rng.choice(BTAGS[1:], cfg.users), BTAGS[0])
            # interest drifts: a random walk pulled back towards the long-term taste
            state = _unit(0.8 * state + 0.2 * self.taste + 0.35 * rng.normal(size=state.shape))
            self.states[:, t + 1] = state
        self.items, self.btags = items, btags
        # What a model can see of each user after t behaviours: the recency-weighted sum of the items'
        # vectors (each step back weighs RECENCY times less) and their plain sum (the long-term taste).
        self.recent = np.zeros((cfg.users, T + 1, cfg.dim), np.float32)
        self.total = np.zeros((cfg.users, T + 1, cfg.dim), np.float32)
        for t in range(T):
            v = self.item_vec[items[:, t]] * (t < self.lengths)[:, None]
            self.recent[:, t + 1] = RECENCY * self.recent[:, t] + v
            self.total[:, t + 1] = self.total[:, t] + v

    def impressions(self, per_user: int, at_end: bool) -> dict[str, np.ndarray]:
        """Impressions (user index, end, target item, pid, click probability), sorted by user and time."""
        cfg, rng = self.cfg, self.rng
        n_imp = rng.poisson(per_user, cfg.users) if not at_end else np.full(cfg.users, per_user)
        user = np.repeat(np.arange(cfg.users), n_imp)
        if at_end:
            end = self.lengths[user]
        else:
            # a sprinkle of cold-start impressions (end 0) plus uniform points in the sequence
            end = np.floor(rng.random(len(user)) * (self.lengths[user] + 1)).astype(np.int64)
        order = np.lexsort((end, user))
        user, end = user[order], end[order]
        state = self.states[user, end]
        target = np.empty(len(user), np.int64)
        driven = rng.random(len(user)) < 0.4
        for idx, sharp in ((np.flatnonzero(driven), 4.0), (np.flatnonzero(~driven), 0.0)):
            for s in range(0, len(idx), 65536):  # bounded memory: the pick scores a [rows, pool] matrix
                part = idx[s : s + 65536]
                target[part] = self._pick(state[part], 512, sharp)
        vec = self.item_vec[target]
        # clicks follow what the history shows (not the hidden state), so a model can approach the oracle
        interest = np.einsum("nk,nk->n", vec, _unit_or_zero(self.recent[user, end]))
        affinity = np.einsum("nk,nk->n", vec, _unit_or_zero(self.total[user, end]))
        pid = rng.integers(1, 3, len(user))
        log_price = (np.log(self.item_price[target]) - 3.0) / 0.8
        logit = (
            2.5 * interest
            + 1.5 * affinity
            + 0.25 * self.item_pop[target]
            + 0.3 * (pid == 2)
            - 0.25 * log_price * (self.shopping[user] == 1)
            + 0.3 * (self.cate_group[target] == self.gender[user])
        )
        bias = _calibrate(logit, cfg.ctr)
        prob = 1.0 / (1.0 + np.exp(-(logit + bias)))
        return {"user": user, "end": end, "target": target, "pid": pid, "prob": prob.astype(np.float32)}


def _calibrate(logit: np.ndarray, ctr: float) -> float:
    """The bias that makes the mean click probability equal `ctr` (bisection; the mean is monotone)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logit + mid)))) < ctr:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _write(
    world: _World, path: Path, imp: dict[str, np.ndarray], rows: np.ndarray, labelled: bool, rng: np.random.Generator
) -> int:
    cfg = world.cfg
    user, end = imp["user"][rows], imp["end"][rows]
    # store each user's sequence only as far as this file's examples can see
    seen = np.zeros(cfg.users, np.int64)
    np.maximum.at(seen, user, end)
    mask = np.arange(cfg.max_len)[None, :] < seen[:, None]
    target = imp["target"][rows]
    prob = imp["prob"][rows]
    with Writer(path, ["item", "cate", "brand", "btag"], attrs={"source": "dmrx synthetic", "seed": cfg.seed}) as w:
        w.add_sequences(
            seen,
            item=world.items[mask] + 1,
            cate=world.item_cate[world.items[mask]] + 1,
            brand=world.item_brand[world.items[mask]] + 1,
            btag=world.btags[mask],
        )
        w.add_examples(
            seq=user,
            end=end,
            user=user + 1,
            label=(rng.random(len(rows)) < prob).astype(np.int8) if labelled else None,
            prob=prob,
            profile={"gender": world.gender[user], "age": world.age[user], "shopping": world.shopping[user]},
            target={"item": target + 1, "cate": world.item_cate[target] + 1, "brand": world.item_brand[target] + 1},
            context={"pid": imp["pid"][rows]},
            dense={"price": np.log(world.item_price[target])},
        )
    return len(rows)


def generate(out_dir: str | Path = ".", cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, int]:
    """Write train.h5, valid.h5, test.h5 and candidates.h5 into out_dir; return rows per file.

    Raw ids are 1-based: users 1..cfg.users, items 1..cfg.items, categories and brands likewise.
    """
    out_dir = check_destination(out_dir, "dir")
    world = _World(cfg)
    imp = world.impressions(cfg.impressions_per_user, at_end=False)
    # split by time within each user: rank of the impression among the user's impressions
    first = np.searchsorted(imp["user"], np.arange(cfg.users))
    count = np.bincount(imp["user"], minlength=cfg.users)
    rank = (np.arange(len(imp["user"])) - first[imp["user"]]) / np.maximum(count[imp["user"]], 1)
    label_rng = np.random.default_rng([cfg.seed, 1])
    rows = {
        "train": np.flatnonzero(rank < 0.8),
        "valid": np.flatnonzero((rank >= 0.8) & (rank < 0.9)),
        "test": np.flatnonzero(rank >= 0.9),
    }
    written: dict[str, int] = {}
    try:
        for name, r in rows.items():
            written[f"{name}.h5"] = _write(world, out_dir / f"{name}.h5", imp, r, True, label_rng)
        cand = world.impressions(cfg.candidates_per_user, at_end=True)
        written["candidates.h5"] = _write(
            world, out_dir / "candidates.h5", cand, np.arange(len(cand["user"])), False, label_rng
        )
    except BaseException:
        for name in written:  # the four files are one data set: none without the others
            (out_dir / name).unlink(missing_ok=True)
        raise
    return written
