"""The TensorRT scoring backend: the export's engines (engines/<graph>.<precision>.plan) on the GPU.

An engine takes at most its optimisation profile's maximum rows per call (8192 users or candidates for the
engines `dmrx export --engine tensorrt` builds), and `--batch-size` may ask for more: a bigger batch is
scored in pieces of at most that many candidates, each with only the histories it uses, and the pieces'
scores are put back together in order. The candidate scorer gets one candidate per slot (`user_row` per
candidate, which every export takes): slots save the CPU's caches a per-candidate copy of the user's
tensors, and whether they pay on a GPU is unmeasured (no GPU has run this backend).
"""

from __future__ import annotations

import math

import numpy as np

from dmrx.data.features import batch_key
from dmrx.errors import DmrxError
from dmrx.runtime.ort import USER_PREFIX


class TensorRTBackend:
    """The export bundle's TensorRT engines (user_encoder + candidate_scorer) on the GPU."""

    name = "tensorrt"

    def __init__(self, export, precision: str):
        from dmrx.runtime.tensorrt import Engine, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise DmrxError(f"--backend tensorrt: {reason}")
        export_dir, manifest = export.path, export.manifest
        engines = export.engines(precision)
        if engines is None:
            raise DmrxError(
                f"--backend tensorrt --precision {precision}: {export_dir}/engines has no "
                f"{precision} engines (dmrx export --engine tensorrt)"
            )
        self.precision = precision
        self.user = Engine(engines["user_encoder"])
        self.cand = Engine(engines["candidate_scorer"])
        self.engines = engines
        self.names = dict(manifest.get("input_names", {}))
        # users per user_encoder call, users and candidates per candidate_scorer call: one piece respects all
        limits = [e.max_rows(n) for e in (self.user, self.cand) for n in e.inputs]
        self.max_rows = min((m for m in limits if m is not None), default=None)

    def score(self, work) -> np.ndarray:
        if work.n_candidates == 0:
            return np.zeros(0, np.float32)
        step = self.max_rows
        if step is None or max(work.n_candidates, work.n_users) <= step:
            return self._score(work)
        # a piece of at most `step` candidates uses at most `step` histories
        pieces = work.split(math.ceil(work.n_candidates / step))
        return np.concatenate([self._score(w) for w in pieces])

    def _score(self, work) -> np.ndarray:
        import torch

        key_of = {v: k for k, v in self.names.items()}
        src = dict(work.hist)
        src["hist_len"] = work.hist_len
        feeds = {n: torch.from_numpy(np.ascontiguousarray(src[key_of.get(n, batch_key(n))])) for n in self.user.inputs}
        user = self.user(feeds)
        feeds = {}
        for n in self.cand.inputs:
            if n.startswith(USER_PREFIX):
                feeds[n] = user[n[len(USER_PREFIX) :]]
            elif n == "user_row":
                feeds[n] = torch.from_numpy(work.user_row)
            else:
                feeds[n] = torch.from_numpy(np.ascontiguousarray(work.cand[key_of.get(n, batch_key(n))]))
        out = self.cand(feeds)["ctr"].float().cpu().numpy().reshape(-1)
        if len(out) != work.n_candidates:
            raise DmrxError(f"{self.engines['candidate_scorer']}: {len(out)} scores for {work.n_candidates} candidates")
        return out

    def describe(self) -> dict:
        from dmrx.runtime.tensorrt import gpu

        return {
            "backend": "tensorrt",
            "precision": self.precision,
            "device": "cuda",
            "gpu": gpu()[0],
            "path": ", ".join(p.name for p in self.engines.values()),
            "max_rows": self.max_rows,
        }
