"""The checks that prove an exported graph gives the trained model's answers.

- parity: FP32 ONNX Runtime vs torch, max abs CTR difference, at batch 1, an odd batch and a large
  batch, over rows with empty histories, full histories (every slot a real behaviour) and real ones;
  for the ranking graph and for the split path (user_encoder -> candidate_scorer, users shared by
  several candidates).
- quality: AUC and logloss of every precision on held-out rows, file sizes, a quick CPU timing.
- gates: thresholds over those numbers; a missed gate fails the export unless --no-gate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmrx.data.features import Encoder
from dmrx.data.reader import DataFile
from dmrx.evaluation.metrics import auc, logloss
from dmrx.evaluation.predict import to_tensors
from dmrx.models.dmr import DMR
from dmrx.runtime.graphs import GraphSpec, candidate_feeds, slot_layout, to_feeds
from dmrx.runtime.ort import session

PARITY_TOL = 1e-5
FP16_AUC_TOL = 0.0005
INT8_AUC_TOL = 0.001
INT8_LOGLOSS_REL_TOL = 0.005
INT8_SIZE_RATIO = 0.40
PARITY_SIZES = (1, 37, 1024)


@dataclass
class Gate:
    name: str
    value: float | None
    threshold: str
    passed: bool
    note: str = ""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "passed": self.passed,
            "note": self.note,
        }


def _keys(encoder: Encoder, label: bool) -> list[str]:
    return ["seq", "end", "user"] + ["label"] * label + [k for k in encoder.spec.batch_keys() if k != "user"]


def sample_rows(path: Path | None, encoder: Encoder, model: DMR, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n encoded rows: the file's first rows (cycled if it has fewer), or random valid indices without a file."""
    rng = np.random.default_rng(seed)
    T = model.cfg.max_len
    if path is not None:
        with DataFile(path) as data:
            encoder.check_file(data)
            parts = []
            for batch in data.batches(
                min(n, 4096), T, encoder=encoder, keys=_keys(encoder, False), behavior_fields=encoder.spec.behaviors
            ):
                parts.append(encoder.finish(batch))
                if sum(len(p["user"]) for p in parts) >= n:
                    break
        if parts:
            rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            idx = np.arange(n) % len(rows["user"])
            return {k: v[idx] for k, v in rows.items()}
    sizes = {k: model.tables[t].num_embeddings for k, t in model.table_of.items()}
    batch: dict[str, np.ndarray] = {"hist_len": rng.integers(0, T + 1, n)}
    for f in encoder.spec.behaviors:
        batch[f"hist/{f}"] = rng.integers(1, sizes[f"hist/{f}"], (n, T))
    for k in encoder.spec.batch_keys() + ["user_index"] * encoder.spec.use_user_id:
        if k.startswith("dense/"):
            batch[k] = rng.standard_normal(n).astype(np.float32)
        elif k in sizes:
            batch[k] = rng.integers(0, sizes[k], n)
    batch["user"] = np.arange(n)
    slots = np.arange(T)
    for f in encoder.spec.behaviors:
        batch[f"hist/{f}"][slots[None, :] < (T - batch["hist_len"])[:, None]] = 0
    return batch


def with_edge_histories(
    batch: dict[str, np.ndarray], model: DMR, spec_behaviors: list[str], seed: int = 0
) -> dict[str, np.ndarray]:
    """Rows 0, 3, 6, ...: empty histories; rows 1, 4, 7, ...: full ones (every slot a real behaviour)."""
    rng = np.random.default_rng(seed)
    b = {k: v.copy() for k, v in batch.items()}
    n, T = len(b["hist_len"]), model.cfg.max_len
    empty, full = np.arange(n) % 3 == 0, np.arange(n) % 3 == 1
    b["hist_len"][empty] = 0
    b["hist_len"][full] = T
    for f in spec_behaviors:
        key = f"hist/{f}"
        size = model.tables[model.table_of[key]].num_embeddings
        h = b[key]
        h[empty] = 0
        pad = (h == 0) & full[:, None]
        h[pad] = rng.integers(1, max(size, 2), int(pad.sum()))
    return b


@torch.inference_mode()
def torch_scores(model: DMR, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = model(to_tensors({k: v for k, v in batch.items() if k != "user"}))
    res = {"ctr": torch.sigmoid(out["logit"]), **out}
    return {k: v.float().numpy() for k, v in res.items() if v.dim() == 1}


@torch.inference_mode()
def torch_grouped(
    model: DMR, users: dict[str, np.ndarray], user_row: np.ndarray, cands: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    enc = model.encode_user(to_tensors(users))
    out = model.score_grouped(enc, torch.from_numpy(user_row), to_tensors(cands))
    res = {"ctr": torch.sigmoid(out["logit"]), **out}
    return {k: v.float().numpy() for k, v in res.items() if v.dim() == 1}


def parity(model: DMR, gs: GraphSpec, paths: dict[str, Path], rows: dict[str, np.ndarray], sizes=PARITY_SIZES) -> dict:
    """Max abs differences, ONNX Runtime FP32 vs torch, per graph path and batch size."""
    model.eval()
    rank = session(paths["ranking"])
    enc, cand = session(paths["user_encoder"]), session(paths["candidate_scorer"])
    rng = np.random.default_rng(1)
    out: dict = {"tolerance": PARITY_TOL, "ranking": {}, "split": {}, "user_encoder_u": {}}
    worst = 0.0
    for n in sizes:
        cases = [with_edge_histories({k: v[:n] for k, v in rows.items()}, model, model.spec.behaviors, n)]
        if n == 1:  # at batch 1, one empty and one full history
            shifted = {k: v[1:2] if len(v) > 1 else v[:1] for k, v in rows.items()}
            cases.append(with_edge_histories(shifted, model, model.spec.behaviors, 7))
        d_rank = d_split = d_u = 0.0
        for b in cases:
            ref = torch_scores(model, b)
            got = dict(zip(gs.score_outputs, rank.run(None, to_feeds(b, gs, "ranking")), strict=False))
            d_rank = max(d_rank, float(np.abs(got["ctr"] - ref["ctr"]).max()))
            # split path: U users, each candidate pointing at one of them
            U = max(1, len(b["hist_len"]) // 4)
            users = {k: b[k][:U] for k in gs.hist_keys}
            user_row = rng.integers(0, U, len(b["hist_len"]))
            user_out = dict(zip(gs.user_outputs, enc.run(None, to_feeds(users, gs, "user_encoder")), strict=False))
            ref_g = torch_grouped(model, users, user_row, {k: b[k] for k in gs.cand_keys})
            got_g = dict(
                zip(gs.score_outputs, cand.run(None, candidate_feeds(user_out, user_row, b, gs)), strict=False)
            )
            d_split = max(d_split, float(np.abs(got_g["ctr"] - ref_g["ctr"]).max()))
            # and the same candidates laid out in slots of g per user, as the scoring backend feeds them
            slots = slot_layout(user_row, [np.asarray(b[k]) for k in gs.slot_keys])
            got_s = cand.run(["ctr"], candidate_feeds(user_out, slots.user_row, slots.lay_out(b, gs), gs))[0]
            d_split = max(d_split, float(np.abs(slots.collect(got_s) - ref_g["ctr"]).max()))
            if "u" in user_out:
                with torch.inference_mode():
                    ref_u = model.encode_user(to_tensors(users))["u"].numpy()
                d_u = max(d_u, float(np.abs(user_out["u"] - ref_u).max()))
        out["ranking"][str(n)] = d_rank
        out["split"][str(n)] = d_split
        out["user_encoder_u"][str(n)] = d_u
        worst = max(worst, d_rank, d_split)
    out["max_abs_ctr_diff"] = worst
    out["passed"] = worst <= PARITY_TOL
    return out


def evaluate(
    paths: dict[str, dict[str, Path]],
    gs: GraphSpec,
    encoder: Encoder,
    data_path: Path,
    max_rows: int,
    batch_size: int = 1024,
) -> dict[str, dict]:
    """AUC/logloss of each precision's ranking graph and its split path over the first max_rows rows.

    paths: precision -> {"ranking": p, "user_encoder": p, "candidate_scorer": p}."""
    sess = {p: {g: session(path) for g, path in graphs.items()} for p, graphs in paths.items()}
    probs: dict[str, list] = {}
    labels = []
    seen = 0
    with DataFile(data_path) as data:
        encoder.check_file(data)
        for batch in data.batches(
            batch_size, gs.max_len, encoder=encoder, keys=_keys(encoder, True), behavior_fields=encoder.spec.behaviors
        ):
            batch = encoder.finish(batch)
            if seen + len(batch["user"]) > max_rows:
                batch = {k: v[: max_rows - seen] for k, v in batch.items()}
            seen += len(batch["user"])
            labels.append(batch["label"])
            feeds = to_feeds(batch, gs, "ranking")
            for p, s in sess.items():
                probs.setdefault(p, []).append(s["ranking"].run(["ctr"], feeds)[0])
                uf = to_feeds(batch, gs, "user_encoder")
                user = dict(zip(gs.user_outputs, s["user_encoder"].run(None, uf), strict=False))
                cf = candidate_feeds(user, np.arange(len(batch["user"]), dtype=np.int64), batch, gs)
                probs.setdefault(p + "/split", []).append(s["candidate_scorer"].run(["ctr"], cf)[0])
            if seen >= max_rows:
                break
    y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
    out = {}
    for p, parts in probs.items():
        pr = np.concatenate(parts).astype(np.float64)
        out[p] = {"rows": int(len(y)), "auc": auc(y, pr), "logloss": logloss(y, pr)}
    out["_probs"] = {p: np.concatenate(v) for p, v in probs.items()}
    return out


def quick_timing(path: Path, feeds: dict[str, np.ndarray], seconds: float = 0.5, threads: int = 1) -> float:
    """Rows per second of one graph on CPU ONNX Runtime (one thread), best of a few short rounds."""
    s = session(path, threads=threads)
    n = len(next(iter(feeds.values())))
    s.run(None, feeds)  # warm-up
    best = 0.0
    for _ in range(3):
        t0, calls = time.perf_counter(), 0
        while True:
            s.run(None, feeds)
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / 3:
                break
        best = max(best, calls * n / dt)
    return best
