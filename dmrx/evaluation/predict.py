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
def predict(
    model: DMR,
    encoder: Encoder,
    data: DataFile,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    progress=None,
    row_range: tuple[int, int] | None = None,
    i2i_by_slot: bool = False,
) -> dict[str, np.ndarray]:
    """CTR and relevance units for every row, in file order, plus labels, users and true probabilities.

    Per row: prob; r and r_hat when the model has them; label and prob_true when the file has them; user
    (raw ids). With i2i_by_slot and a model with an Item-to-Item network, also its attention weights summed
    by history slot (slot T-1 holds the most recent behaviour): i2i_sum [T], i2i_count [T] (real behaviours
    per slot) and i2i_uniform [T] (the sum of 1 / history length over the same behaviours), so that a mean
    weight per position needs no [rows, T] array.
    """
    encoder.check_file(data)
    was_training = model.training
    model.eval()
    T = model.cfg.max_len
    keys = encoder.spec.batch_keys() + ["label"] * data.fields.has_label + ["prob"] * data.fields.has_prob
    keys = ["seq", "end"] + sorted(set(keys) | {"user"})
    out: dict[str, list[np.ndarray]] = {}
    raw_users = []
    i2i = None
    for batch in data.batches(
        batch_size, T, encoder=encoder, keys=keys, behavior_fields=encoder.spec.behaviors, row_range=row_range
    ):
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
        if i2i_by_slot and "i2i_weights" in res:
            i2i = _add_by_slot(i2i if i2i is not None else np.zeros((3, T)), res["i2i_weights"], batch["hist_len"])
        if progress is not None:
            progress(len(batch["user"]))
    model.train(was_training)
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["user"] = np.concatenate(raw_users) if raw_users else np.zeros(0, np.int64)
    if not raw_users:
        result.setdefault("prob", np.zeros(0, np.float32))
    if i2i is not None:
        result["i2i_sum"], result["i2i_count"], result["i2i_uniform"] = i2i
    return result


def _add_by_slot(acc: np.ndarray, weights: torch.Tensor, hist_len: np.ndarray) -> np.ndarray:
    """acc [3, T] += (weights, 1, 1 / history length) summed per slot over the real behaviours."""
    w = weights.float().cpu().numpy()
    n = np.minimum(hist_len, w.shape[1])
    real = np.arange(w.shape[1])[None, :] >= (w.shape[1] - n)[:, None]
    acc[0, -w.shape[1] :] += (w * real).sum(0)
    acc[1, -w.shape[1] :] += real.sum(0)
    acc[2, -w.shape[1] :] += (real / np.maximum(n, 1)[:, None]).sum(0)
    return acc
