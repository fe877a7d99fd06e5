"""How much of the synthetic data's signal a model can reach from what it sees.

The click model scores a target's latent item vector against the (recency-weighted and total) latent vectors
of the visible history. A model sees ids, categories and brands, not the latent vectors, and sees each item
only a few dozen times, so the part of an item's vector that is its own (SyntheticConfig.item_noise) is
nearly unlearnable. This prints the AUC of the click model's main terms computed with item vectors replaced
by their (category, brand) or category mean: the ceilings of a model that learns categories and brands
perfectly, or categories only; and the popularity term alone. Each also as the share of the oracle's gap
over 0.5 it closes.

    python benchmarks/synthetic_ceiling.py                       # the default data
    python benchmarks/synthetic_ceiling.py --item-noise 0.15 --json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dmrx.data import synthetic as S
from dmrx.evaluation.metrics import auc


def _history_score(world: S._World, imp: dict, vec: np.ndarray) -> np.ndarray:
    """The click logit's history and popularity terms with item vectors `vec` (as in _World.impressions)."""
    cfg = world.cfg
    recent = np.zeros((cfg.users, cfg.max_len + 1, cfg.dim), np.float32)
    total = np.zeros_like(recent)
    for t in range(cfg.max_len):
        v = vec[world.items[:, t]] * (t < world.lengths)[:, None]
        recent[:, t + 1] = S.RECENCY * recent[:, t] + v
        total[:, t + 1] = total[:, t] + v
    u, end, target = imp["user"], imp["end"], imp["target"]
    interest = np.einsum("nk,nk->n", vec[target], S._unit_or_zero(recent[u, end]))
    affinity = np.einsum("nk,nk->n", vec[target], S._unit_or_zero(total[u, end]))
    return 2.5 * interest + 1.5 * affinity + 0.25 * world.item_pop[target]


def _group_mean(world: S._World, key: np.ndarray) -> np.ndarray:
    _, inv = np.unique(key, return_inverse=True)
    sums = np.zeros((inv.max() + 1, world.cfg.dim))
    np.add.at(sums, inv, world.item_vec)
    return S._unit(sums[inv])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--item-noise", type=float, default=S.SyntheticConfig.item_noise)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cfg = S.SyntheticConfig(item_noise=args.item_noise, seed=args.seed)
    world = S._World(cfg)
    imp = world.impressions(cfg.impressions_per_user, at_end=False)
    label = np.random.default_rng([cfg.seed, 1]).random(len(imp["prob"])) < imp["prob"]
    oracle = auc(label, imp["prob"])
    rows = {
        "oracle (true probability)": oracle,
        "category + brand known exactly": auc(
            label, _history_score(world, imp, _group_mean(world, world.item_cate * cfg.brands + world.item_brand))
        ),
        "category known exactly": auc(label, _history_score(world, imp, _group_mean(world, world.item_cate))),
        "popularity term only": auc(label, world.item_pop[imp["target"]]),
    }
    out = {k: {"auc": v, "gap_closed": (v - 0.5) / (oracle - 0.5)} for k, v in rows.items()}
    if args.json:
        print(json.dumps({"item_noise": cfg.item_noise, "impressions": int(len(label)), "results": out}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"synthetic data (item_noise {cfg.item_noise}, seed {cfg.seed}): all impressions")
    for c in ("what the score knows", "AUC", "share of the oracle's gap"):
        table.add_column(c, justify="right")
    for k, v in out.items():
        table.add_row(k, f"{v['auc']:.4f}", f"{v['gap_closed']:.1%}")
    Console().print(table)


if __name__ == "__main__":
    main()
