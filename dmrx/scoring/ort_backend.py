"""The onnxruntime scoring backend: the export's user_encoder and candidate_scorer graphs.

The candidate side takes a batch in slots (dmrx.runtime.graphs.slot_layout): a user's candidates in slots
of g that read one copy of the user's tensors, instead of a gathered copy per candidate ([T, d_e] and
[T, h] each, a third of the INT8 graph's time at one candidate per slot). On CPU it runs in calls of about
CPU_BLOCK candidates, so that the [g, T, h] attention intermediates stay in cache. int8 loads the export's
CPU flavour (*.int8-cpu.onnx: 7-bit weights, laid out for ONNX Runtime's CPU kernels) when it has one,
else the TensorRT-targeted Q/DQ graphs. Exports before slots (format version 2) take one candidate per
slot.
"""

from __future__ import annotations

import numpy as np

from dmrx.data.features import batch_key
from dmrx.errors import DmrxError
from dmrx.runtime.graphs import Slots, slot_layout
from dmrx.runtime.ort import CPU_INT8, NUMPY_DTYPES, USER_PREFIX, session
from dmrx.scoring.cores import available_cores

CPU_BLOCK = 256  # candidates per candidate_scorer call on CPU


class OrtBackend:
    """The exported user_encoder and candidate_scorer graphs (FP32, FP16 or INT8) under onnxruntime: the CPU
    provider, and the CUDA / TensorRT execution providers when onnxruntime has them and a GPU is asked for.
    describe() reports the providers the session actually runs."""

    name = "onnxruntime"

    def __init__(
        self, export, precision: str, device: str | None = None, threads: int | None = None, cpu_flavour: bool = True
    ):
        import onnxruntime as ort

        export_dir, manifest = export.path, export.manifest
        have = manifest.get("precisions", ["fp32"])
        if precision not in have or precision == "bf16":
            raise DmrxError(
                f"--backend onnxruntime --precision {precision}: {export_dir} has "
                f"{', '.join(have)} graphs (export with --fp16 / --int8)"
            )
        cpu = device in (None, "cpu")
        files = None
        if precision == "int8" and cpu and cpu_flavour:
            files = export.split_graphs(CPU_INT8)
        files = files or export.split_graphs(precision)
        if files is None:
            raise DmrxError(f"{export_dir}: the {precision} user_encoder/candidate_scorer graphs are missing")
        self.precision = precision
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if not cpu:
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
        self.block = None if gpu else CPU_BLOCK
        self.slots = export.candidate_slots
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
        # the user's own features, fed once per slot: the inputs whose axis 0 the graph names "slots"
        self.per_slot = {
            i.name for i in self.cand.get_inputs() if i.name != "user_row" and i.shape and i.shape[0] == "slots"
        }
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
        for name, key, _ in self.cand_in:
            if not name.startswith(USER_PREFIX) and name != "user_row" and key not in work.cand:
                raise DmrxError(f"{self.files['candidate_scorer']}: input {name} is not a candidate column")
        if self.slots:
            same = [work.cand[k] for name, k, _ in self.cand_in if name in self.per_slot]
            slots = slot_layout(work.user_row, same)
        else:
            slots = Slots.single(work.user_row)
        user_feeds, slot_feeds, cand_feeds = {}, {"user_row": slots.user_row}, {}
        for name, key, dt in self.cand_in:
            if name.startswith(USER_PREFIX):
                user_feeds[name] = np.ascontiguousarray(user[name[len(USER_PREFIX) :]], dtype=dt)
            elif name in self.per_slot:
                slot_feeds[name] = slots.per_slot(np.ascontiguousarray(work.cand[key], dtype=dt))
            elif name != "user_row":
                cand_feeds[name] = slots.spread(np.ascontiguousarray(work.cand[key], dtype=dt))
        g, n = slots.g, len(slots.user_row)
        step = max(1, self.block // g) if self.block else n
        out = [
            self.cand.run(
                ["ctr"],
                user_feeds
                | {k: v[a : a + step] for k, v in slot_feeds.items()}
                | {k: v[a * g : (a + step) * g] for k, v in cand_feeds.items()},
            )[0]
            for a in range(0, n, step)
        ]
        return slots.collect(np.concatenate(out).reshape(-1)).astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {
            "backend": "onnxruntime",
            "precision": self.precision,
            "providers": list(self.providers),
            "device": "cuda" if any(p != "CPUExecutionProvider" for p in self.providers) else "cpu",
            "threads": self.threads,
            "path": f"{self.files['user_encoder'].name} + {self.files['candidate_scorer'].name}",
            "candidate_block": self.block,
            "candidate_slots": self.slots,
        }
