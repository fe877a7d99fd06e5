"""The exported graphs' contract: which inputs each graph reads, in which order, and how to feed it.

- ranking:          aligned rows (history + candidate features) -> ctr, logit, r, r_hat
- user_encoder:     history -> the user-side tensors (hist_emb, mask, u, i2i_keys)
- candidate_scorer: user-side tensors of U users + user_row [C] + candidate features [C] -> ctr [C], ...

Inputs are named after the batch keys with "/" written "__" (dmrx.runtime.ort.onnx_name); the mapping is
recorded in the export manifest. Dense features are float32, everything else int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmrx.errors import DmrxError
from dmrx.runtime.ort import USER_PREFIX, onnx_name

GRAPHS = ("ranking", "user_encoder", "candidate_scorer")
USER_TENSORS = ("hist_emb", "mask", "u", "i2i_keys")  # what the candidate side reads (u2i_proj is not)

__all__ = ["GRAPHS", "USER_PREFIX", "USER_TENSORS", "GraphSpec", "candidate_feeds", "to_feeds"]


@dataclass
class GraphSpec:
    """Which batch keys and tensors a model's graphs read and write."""

    hist_keys: list[str]  # hist/<field> ... and hist_len
    cand_keys: list[str]  # target/*, profile/*, user_index, context/*, dense/*
    user_outputs: list[str]  # user-side tensors the encoder emits, in order
    score_outputs: list[str]  # ctr, logit, r?, r_hat?
    max_len: int
    names: dict[str, str] = field(default_factory=dict)  # batch key -> ONNX input name

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
        return cls(hist, cand, user, score, cfg.max_len, names)

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


def candidate_feeds(
    user: dict[str, np.ndarray], user_row: np.ndarray, batch: dict[str, np.ndarray], gs: GraphSpec
) -> dict[str, np.ndarray]:
    """The candidate_scorer's feeds: user-side tensors [U, ...], user_row [C], candidate features [C]."""
    feeds = {USER_PREFIX + k: np.ascontiguousarray(user[k], dtype=np.float32) for k in gs.user_outputs}
    feeds["user_row"] = np.ascontiguousarray(user_row, dtype=np.int64)
    for k in gs.cand_keys:
        dtype = np.float32 if k.startswith("dense/") else np.int64
        feeds[gs.names[k]] = np.ascontiguousarray(batch[k], dtype=dtype)
    return feeds
