"""Batched inference over a dmrx data file with a torch model: the evaluation and validation path."""

from __future__ import annotations

import numpy as np
import torch

from dmrx.data.features import Encoder
from dmrx.data.reader import DataFile
from dmrx.models.dmr import DMR


def to_tensors(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict(model: DMR, encoder: Encoder, data: DataFile, batch_size: int = 4096,
            device: torch.device | str = "cpu", progress=None, row_range: tuple[int, int] | None = None
            ) -> dict[str, np.ndarray]:
    """CTR and relevance units for every row, in file order, plus labels, users and true probabilities."""
    encoder.check_file(data)
    was_training = model.training
    model.eval()
    keys = encoder.spec.batch_keys() + ["label"] * data.fields.has_label + ["prob"] * data.fields.has_prob
    keys = ["seq", "end"] + sorted(set(keys) | {"user"})
    out: dict[str, list[np.ndarray]] = {}
    raw_users = []
    for batch in data.batches(batch_size, model.cfg.max_len, encoder=encoder, keys=keys,
                              behavior_fields=encoder.spec.behaviors, row_range=row_range):
        raw_users.append(batch["user"])
        res = model(to_tensors(encoder.finish(batch), device))
        cols = {"prob": torch.sigmoid(res["logit"].float())}
        for k in ("r", "r_hat"):
            if k in res:
                cols[k] = res[k].float()
        for k, v in cols.items():
            out.setdefault(k, []).append(v.cpu().numpy())
        for k in ("label", "prob_true"):
            src = "prob" if k == "prob_true" else k
            if src in batch:
                out.setdefault(k, []).append(batch[src])
        if progress is not None:
            progress(len(batch["user"]))
    model.train(was_training)
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["user"] = np.concatenate(raw_users) if raw_users else np.zeros(0, np.int64)
    if not raw_users:
        result.setdefault("prob", np.zeros(0, np.float32))
    return result
