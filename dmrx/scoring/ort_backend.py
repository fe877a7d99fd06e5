"""The onnxruntime scoring backend: the export's user_encoder and candidate_scorer graphs."""

from __future__ import annotations

import numpy as np

from dmrx.errors import DmrxError
from dmrx.runtime.ort import NUMPY_DTYPES, USER_PREFIX, batch_key, session
from dmrx.scoring.cores import available_cores


class OrtBackend:
    """The exported user_encoder and candidate_scorer graphs (FP32, FP16 or INT8) under onnxruntime: the CPU
    provider, and the CUDA / TensorRT execution providers when onnxruntime has them and a GPU is asked for.
    describe() reports the providers the session actually runs."""

    name = "onnxruntime"

    def __init__(self, export, precision: str, device: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        export_dir, manifest = export.path, export.manifest
        have = manifest.get("precisions", ["fp32"])
        if precision not in have or precision == "bf16":
            raise DmrxError(
                f"--backend onnxruntime --precision {precision}: {export_dir} has "
                f"{', '.join(have)} graphs (export with --fp16 / --int8)"
            )
        files = export.split_graphs(precision)
        if files is None:
            raise DmrxError(f"{export_dir}: the {precision} user_encoder/candidate_scorer graphs are missing")
        self.precision = precision
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device not in (None, "cpu"):
            for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")[::-1]:
                if p in available:
                    providers.insert(0, p)
            if len(providers) == 1:
                raise DmrxError(
                    f"--backend onnxruntime --device {device}: this onnxruntime has no CUDA or "
                    f"TensorRT execution provider (has {', '.join(available)})"
                )
        gpu = len(providers) > 1
        # on CPU, as torch: `threads` workers, each running session.run on one thread (sessions are thread-safe)
        self.workers = 1 if gpu else int(threads or available_cores())
        self.user = session(files["user_encoder"], threads=0 if gpu else 1, providers=providers, spinning=False)
        self.cand = session(files["candidate_scorer"], threads=0 if gpu else 1, providers=providers, spinning=False)
        self.threads = self.workers
        self.providers = self.cand.get_providers()
        self.files = files
        key_of = {v: k for k, v in manifest.get("input_names", {}).items()}
        self.user_in = [
            (i.name, key_of.get(i.name, batch_key(i.name)), NUMPY_DTYPES.get(i.type, np.float32))
            for i in self.user.get_inputs()
        ]
        self.user_out = [o.name for o in self.user.get_outputs()]
        self.cand_in = [
            (i.name, key_of.get(i.name, batch_key(i.name)), NUMPY_DTYPES.get(i.type, np.float32))
            for i in self.cand.get_inputs()
        ]
        outs = [o.name for o in self.cand.get_outputs()]
        if "ctr" not in outs:
            raise DmrxError(f"{files['candidate_scorer']}: no 'ctr' output (has {outs})")

    def score(self, work) -> np.ndarray:
        if work.n_candidates == 0:
            return np.zeros(0, np.float32)
        src = dict(work.hist)
        src["hist_len"] = work.hist_len
        feeds = {}
        for name, key, dt in self.user_in:
            if key not in src:
                raise DmrxError(f"{self.files['user_encoder']}: input {name} is not a history column")
            feeds[name] = np.ascontiguousarray(src[key], dtype=dt)
        user = dict(zip(self.user_out, self.user.run(None, feeds), strict=False))
        feeds = {}
        for name, key, dt in self.cand_in:
            if name.startswith(USER_PREFIX):
                x = user[name[len(USER_PREFIX) :]]
            elif name == "user_row":
                x = work.user_row
            elif key in work.cand:
                x = work.cand[key]
            else:
                raise DmrxError(f"{self.files['candidate_scorer']}: input {name} is not a candidate column")
            feeds[name] = np.ascontiguousarray(x, dtype=dt)
        return np.asarray(self.cand.run(["ctr"], feeds)[0], dtype=np.float32).reshape(-1)

    def describe(self) -> dict:
        return {
            "backend": "onnxruntime",
            "precision": self.precision,
            "providers": list(self.providers),
            "device": "cuda" if any(p != "CPUExecutionProvider" for p in self.providers) else "cpu",
            "threads": self.threads,
            "path": f"{self.files['user_encoder'].name} + {self.files['candidate_scorer'].name}",
        }
