"""A calibration data reader that streams rows of any dmrx data file into an ONNX graph's feeds.

The file is read with the model's own encoder (raw ids -> table indices, dense fields standardised), so
calibration sees exactly what inference sees. Rows are a seeded shuffle of the file (chunk order and rows
within a chunk), so a file sorted by user or time still gives a spread sample; reading stops after
`rows`. For the candidate_scorer graph, a user_encoder session (FP32) turns each batch's histories into
the user-side tensors that graph reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from dmrx.data.features import Encoder
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError
from dmrx.runtime.graphs import GraphSpec, candidate_feeds, to_feeds

MIN_ROWS = 64  # fewer rows than this calibrate nothing worth trusting


def check_calibration_file(path: str | os.PathLike, encoder: Encoder, rows: int, min_rows: int = MIN_ROWS) -> int:
    """Validate a calibration file against the model's schema; return the rows that will be read."""
    if rows < min_rows:
        raise DmrxError(f"--calib-rows {rows} is too few: calibration needs at least {min_rows} rows")
    with DataFile(path) as data:
        encoder.check_file(data)
        if data.n_rows < min_rows:
            raise DmrxError(f"{path}: {data.n_rows} rows, too few to calibrate on (at least {min_rows} needed)")
        return min(rows, data.n_rows)


class DataFileReader(CalibrationDataReader):
    """Feeds for `graph` from the first `rows` rows of a seeded shuffle of `path`."""

    def __init__(
        self,
        path: str | os.PathLike,
        encoder: Encoder,
        gs: GraphSpec,
        graph: str = "ranking",
        rows: int = 2048,
        batch_size: int = 256,
        seed: int = 0,
        user_session=None,
    ):
        if graph == "candidate_scorer" and user_session is None:
            raise ValueError("the candidate_scorer graph is calibrated through a user_encoder session")
        self.path, self.encoder, self.gs, self.graph = Path(path), encoder, gs, graph
        # every batch has the same number of rows: onnxruntime's histogram calibrators (entropy, percentile)
        # stack each tensor's batches into one array and fail on unequal shapes
        self.rows, self.batch_size, self.seed, self.user_session = rows, min(batch_size, rows), seed, user_session
        self.rows_read = 0
        self._it = None

    def _batches(self):
        keys = ["seq", "end", "user"] + [k for k in self.encoder.spec.batch_keys() if k != "user"]
        with DataFile(self.path) as data:
            self.encoder.check_file(data)
            for batch in data.batches(
                self.batch_size,
                self.gs.max_len,
                shuffle=True,
                seed=self.seed,
                encoder=self.encoder,
                keys=keys,
                behavior_fields=self.encoder.spec.behaviors,
            ):
                if self.rows_read + self.batch_size > self.rows:
                    return
                if len(batch["user"]) < self.batch_size:  # a chunk's last batch: skip it, keep shapes equal
                    continue
                batch = self.encoder.finish(batch)
                self.rows_read += len(batch["user"])
                yield self.feeds(batch)

    def feeds(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.graph != "candidate_scorer":
            return to_feeds(batch, self.gs, self.graph)
        outs = self.user_session.run(None, to_feeds(batch, self.gs, "user_encoder"))
        user = dict(zip(self.gs.user_outputs, outs, strict=False))
        return candidate_feeds(user, np.arange(len(batch["user"]), dtype=np.int64), batch, self.gs)

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it, self.rows_read = None, 0
