"""The TensorRT scoring backend: the export's engines (engines/<graph>.<precision>.plan) on the GPU."""

from __future__ import annotations

import numpy as np

from dmrx.errors import DmrxError
from dmrx.runtime.ort import USER_PREFIX, batch_key


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

    def score(self, work) -> np.ndarray:
        import torch

        if work.n_candidates == 0:
            return np.zeros(0, np.float32)
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
        return self.cand(feeds)["ctr"].float().cpu().numpy().reshape(-1)

    def describe(self) -> dict:
        import torch

        return {
            "backend": "tensorrt",
            "precision": self.precision,
            "device": "cuda",
            "gpu": torch.cuda.get_device_name(0),
            "path": ", ".join(p.name for p in self.engines.values()),
        }
