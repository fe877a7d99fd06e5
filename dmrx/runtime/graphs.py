"""The exported graphs' contract: which inputs each graph reads, in which order, and how to feed it.

- ranking:          aligned rows (history + candidate features) -> ctr, logit, r, r_hat
- user_encoder:     history -> the user-side tensors (hist_emb, mask, u, i2i_keys)
- candidate_scorer: user-side tensors of U users + user_row [S] + candidate features [C] -> ctr [C], ...
                    The candidates come in S slots of g = C / S consecutive candidates, slot s belonging to
                    user user_row[s] (S = C, g = 1: one user row per candidate). In a slot the attention
                    broadcasts one copy of the user's tensors to g candidates, and the user's own features
                    (profile fields, user_index: `slot_keys`) come once per slot; `slot_layout` lays a batch
                    out, padding a user's last slot with index-0 candidates whose scores are dropped.

Inputs are named after the batch keys with "/" written "__" (dmrx.runtime.ort.onnx_name); the mapping is
recorded in the export manifest. Dense features are float32, everything else int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmrx.data.reader import group_rows
from dmrx.errors import DmrxError
from dmrx.runtime.ort import USER_PREFIX, onnx_name

GRAPHS = ("ranking", "user_encoder", "candidate_scorer")
USER_TENSORS = ("hist_emb", "mask", "u", "i2i_keys")  # what the candidate side reads (u2i_proj is not)

__all__ = ["GRAPHS", "USER_PREFIX", "USER_TENSORS", "GraphSpec", "Slots", "candidate_feeds", "slot_layout", "to_feeds"]

# What a slot costs beyond its g candidates (gathering the user's [T, d_e] and [T, h] tensors once), in
# candidates' worth of candidate_scorer time: fitted to the FP32 and INT8 graphs' times per candidate at
# g = 1, 4, 16 and 32 (one thread, 2-core Xeon; the INT8 graph 8.0, 6.2, 5.7, 5.65 us, so ~2.4 us per
# slot and ~5.6 us per candidate, FP32 ~2.7 and ~8.4).
SLOT_COST = 0.4
MAX_SLOT = 32  # larger slots gain < 2% and cost padding


@dataclass
class GraphSpec:
    """Which batch keys and tensors a model's graphs read and write."""

    hist_keys: list[str]  # hist/<field> ... and hist_len
    cand_keys: list[str]  # target/*, profile/*, user_index, context/*, dense/*
    user_outputs: list[str]  # user-side tensors the encoder emits, in order
    score_outputs: list[str]  # ctr, logit, r?, r_hat?
    max_len: int
    names: dict[str, str] = field(default_factory=dict)  # batch key -> ONNX input name
    slot_keys: list[str] = field(default_factory=list)  # candidate_scorer inputs given once per slot: the user's own

    @classmethod
    def of(cls, model) -> GraphSpec:
        """The graphs of a DMR model (anything with the model's .spec and .cfg)."""
        spec, cfg = model.spec, model.cfg
        hist = [f"hist/{f}" for f in spec.behaviors] + ["hist_len"]
        cand = [f"target/{f}" for f in spec.target] + spec.profile_keys()
        cand += [f"context/{f}" for f in spec.context] + [f"dense/{f}" for f in spec.dense]
        user = ["hist_emb", "mask"] + ["u"] * cfg.use_u2i + ["i2i_keys"] * cfg.use_i2i
        score = ["ctr", "logit"] + ["r"] * cfg.use_u2i + ["r_hat"] * cfg.use_i2i
        names = {k: onnx_name(k) for k in hist + cand}
        return cls(hist, cand, user, score, cfg.max_len, names, spec.profile_keys())

    def inputs(self, graph: str) -> list[str]:
        """ONNX input names of a graph, in order."""
        if graph == "ranking":
            return [self.names[k] for k in self.hist_keys + self.cand_keys]
        if graph == "user_encoder":
            return [self.names[k] for k in self.hist_keys]
        if graph == "candidate_scorer":
            return [USER_PREFIX + t for t in self.user_outputs] + ["user_row"] + [self.names[k] for k in self.cand_keys]
        raise ValueError(graph)

    def outputs(self, graph: str) -> list[str]:
        return self.user_outputs if graph == "user_encoder" else self.score_outputs


def to_feeds(batch: dict[str, np.ndarray], gs: GraphSpec, graph: str) -> dict[str, np.ndarray]:
    """An encoded batch (after Encoder.finish) -> the ranking or user_encoder graph's feeds."""
    keys = gs.hist_keys + (gs.cand_keys if graph == "ranking" else [])
    feeds = {}
    for k in keys:
        if k not in batch:
            raise DmrxError(f"the batch lacks {k!r}, which the {graph} graph reads")
        dtype = np.float32 if k.startswith("dense/") else np.int64
        feeds[gs.names[k]] = np.ascontiguousarray(batch[k], dtype=dtype)
    return feeds


@dataclass
class Slots:
    """Candidates laid out for the candidate_scorer: slot s holds g places of user user_row[s], candidate i
    sits at place position[i], and places left over are padding (index 0, dense 0.0). The user's own
    features (GraphSpec.slot_keys) are fed once per slot, read at candidate member[s]."""

    g: int
    user_row: np.ndarray  # [S] int64
    position: np.ndarray  # [C] int64, distinct, in [0, S * g)
    member: np.ndarray  # [S] int64: a candidate of each slot

    @classmethod
    def single(cls, user_row: np.ndarray) -> Slots:
        """One candidate per slot: the layout every candidate_scorer takes."""
        every = np.arange(len(user_row), dtype=np.int64)
        return cls(1, np.asarray(user_row, np.int64), every, every)

    @property
    def places(self) -> int:
        return len(self.user_row) * self.g

    def spread(self, col: np.ndarray) -> np.ndarray:
        """A candidate column [C] at its places [S * g], padding 0."""
        if self.g == 1:  # one candidate per slot, in candidate order (slot_layout keeps that order for g = 1)
            return col
        out = np.zeros(self.places, col.dtype)
        out[self.position] = col
        return out

    def per_slot(self, col: np.ndarray) -> np.ndarray:
        """A column of the user's own features [C] as the slots take it [S]."""
        return col if self.g == 1 else col[self.member]

    def lay_out(self, batch: dict[str, np.ndarray], gs: GraphSpec) -> dict[str, np.ndarray]:
        """The candidate columns of `batch` as the candidate_scorer takes them in these slots."""
        return {k: (self.per_slot if k in gs.slot_keys else self.spread)(np.asarray(batch[k])) for k in gs.cand_keys}

    def collect(self, scores: np.ndarray) -> np.ndarray:
        """Per-place outputs [S * g] back in candidate order [C]."""
        return scores if self.g == 1 else scores[self.position]


def slot_layout(user_row: np.ndarray, same: list[np.ndarray] = (), max_g: int = MAX_SLOT) -> Slots:
    """The slot size g that minimises the candidate_scorer's work for these candidates (places scored plus
    SLOT_COST per slot), and the layout: each user's candidates in order in ceil(n / g) slots of its own.
    `same`: candidate columns a slot must not mix (the user's own features, fed once per slot); candidates
    of one user that differ in them go to separate slots."""
    user_row = np.asarray(user_row, np.int64)
    C = len(user_row)
    if C == 0:
        return Slots.single(user_row)
    group = user_row
    if len(same):
        first = _first_of(user_row)
        if not all(np.array_equal(col, col[first[user_row]]) for col in same):  # rare: features vary by row
            group = group_rows(np.column_stack([user_row, *same]))[1]
    counts = np.bincount(group)
    present = counts[counts > 0]
    g_all = np.arange(1, max_g + 1)
    n_slots = np.ceil(present[None, :] / g_all[:, None]).sum(axis=1)
    g = int(g_all[np.argmin(n_slots * g_all + SLOT_COST * n_slots)])
    if g == 1:
        return Slots.single(user_row)
    per_group = (counts + g - 1) // g
    first_slot = np.cumsum(per_group) - per_group
    first_cand = np.cumsum(counts) - counts
    order = np.argsort(group, kind="stable")
    groups = group[order]
    position = np.empty_like(user_row)
    position[order] = first_slot[groups] * g + np.arange(C) - first_cand[groups]
    member = _first_of(group)[np.repeat(np.arange(len(counts)), per_group)]
    return Slots(g, user_row[member], position, member)


def _first_of(ids: np.ndarray) -> np.ndarray:
    """For each id 0..max, the first row holding it (-1 where none does)."""
    present, index = np.unique(ids, return_index=True)
    first = np.full(int(ids.max()) + 1, -1, np.int64)
    first[present] = index
    return first


def candidate_feeds(
    user: dict[str, np.ndarray], user_row: np.ndarray, batch: dict[str, np.ndarray], gs: GraphSpec
) -> dict[str, np.ndarray]:
    """The candidate_scorer's feeds: user-side tensors [U, ...], user_row [S], candidate features [C] (S
    divides C; candidate_feeds does not lay them out: see slot_layout)."""
    feeds = {USER_PREFIX + k: np.ascontiguousarray(user[k], dtype=np.float32) for k in gs.user_outputs}
    feeds["user_row"] = np.ascontiguousarray(user_row, dtype=np.int64)
    for k in gs.cand_keys:
        dtype = np.float32 if k.startswith("dense/") else np.int64
        feeds[gs.names[k]] = np.ascontiguousarray(batch[k], dtype=dtype)
    return feeds
