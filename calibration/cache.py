"""A reusable cache of measured activation ranges, keyed so that anything that changes them misses.

The key hashes the source weights' sha256 (new weights -> new key: a retrained model never reuses stale
ranges), the FP32 graph's sha256, the calibration method, the data file's identity (resolved path, size,
modification time) and the number of rows. The ranges themselves are onnxruntime's TensorsData JSON,
which `quantize_static(calibration_cache_path=...)` reads and writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_VERSION = 1


def cache_key(
    weights_hash: str, graph_hash: str, method: str, data_path: str | os.PathLike, rows: int, graph: str
) -> str:
    p = Path(data_path).resolve()
    st = p.stat()
    ident = {
        "v": CACHE_VERSION,
        "weights": weights_hash,
        "graph_sha256": graph_hash,
        "graph": graph,
        "method": method,
        "data": str(p),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "rows": rows,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


class RangeCache:
    """One JSON file of ranges per key under `root`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            path.unlink(missing_ok=True)  # a damaged entry is a miss, and goes
            return False
        return True

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
