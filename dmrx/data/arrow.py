"""Candidates as Arrow columns: the Parquet layout that `dmrx score`, Ray Data and Spark read alike.

One row per candidate, raw ids as in a dmrx data file; a column name is the batch key with "__" for "/"
(`target__item`), since Spark SQL and many Parquet tools treat "/" badly (names with "/" are accepted too):

    user            integer        raw user id
    target__<f>     integer        the candidate's fields (target__item, target__cate, ...)
    profile__<f>    integer        user-profile fields
    context__<f>    integer        context fields
    dense__<f>      float or int   continuous fields
    hist__<f>       list<integer>  the user's visible history of behaviour field f, oldest first, most recent
                                   last; every behaviour field of a row has the same length
    label           int8           optional, ignored by scoring
    row             int64          written by `dmrx data parquet`: the row in the source .h5, ignored by scoring

Other columns are ignored (an engine can keep them beside the score). Rows of one user that arrive
together share one history encoding, so write the candidates grouped by user (`dmrx data parquet` keeps
the .h5 file's order, which is grouped).

`check_schema` validates a schema against a model's feature spec before anything runs (one line naming the
column); `to_columns` turns a record batch or table into the numpy batch `dmrx.scoring.Scorer` reads, with
the histories as right-aligned [B, T] arrays built without a Python loop per row and each run of rows with
one history marked as sharing its encoding; `write_parquet` converts a
dmrx candidate file into this layout. pyarrow is an optional dependency (the `ray` and `spark` extras).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dmrx.artifacts.atomic import atomic_file
from dmrx.data.features import FeatureSpec, batch_key, flat_name
from dmrx.data.reader import DataFile
from dmrx.errors import DmrxError

PARQUET_SUFFIXES = (".parquet", ".pq")


def pyarrow_modules():
    """(pyarrow, pyarrow.compute, pyarrow.parquet), or a DmrxError saying how to install them."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DmrxError(
            "Parquet and Arrow candidates need pyarrow: pip install pyarrow (or dmrx[ray] / dmrx[spark])"
        ) from None
    return pa, pc, pq


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether path names a Parquet file (by its suffix, or by the magic bytes a Parquet file starts with)."""
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _kind(t) -> str:
    """int | float | list<int> | list<other> | other, for a pyarrow DataType."""
    pa, _, _ = pyarrow_modules()
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list<int>" if pa.types.is_integer(t.value_type) else "list<other>"
    return "other"


def check_schema(schema, spec: FeatureSpec, where: str) -> dict[str, str]:
    """The column of every batch key the model reads ({"target/item": "target__item", "hist/item": ...}),
    after checking that each is present with a usable type; `where` names the data in the error."""
    names = list(schema.names)
    by_key = {}
    for name in names:
        by_key.setdefault(batch_key(name), name)
    expect = {k: ("float", "int") if k.startswith("dense/") else ("int",) for k in spec.batch_keys()}
    expect.update({f"hist/{f}": ("list<int>",) for f in spec.behaviors})
    missing = [flat_name(k) for k in expect if k not in by_key]
    if missing:
        raise DmrxError(
            f"{where}: lacks column(s) {', '.join(missing)}, which the model reads "
            f"(columns: {', '.join(names) or 'none'})"
        )
    what = {"int": "integer ids", "float": "numbers", "list<int>": "a list of integer ids per row (list<int64>)"}
    columns = {}
    for key, kinds in expect.items():
        name = by_key[key]
        t = schema.field(name).type
        if _kind(t) not in kinds:
            raise DmrxError(f"{where}: column {name} has type {t}; it must hold {what[kinds[0]]}")
        columns[key] = name
    return columns


def _no_nulls(arr, name: str, where: str) -> None:
    if arr.null_count:
        row = int(np.argmax(np.asarray(arr.is_null())))
        raise DmrxError(f"{where}: column {name} row {row}: null")


def _placement(lens: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the kept elements of lists of these lengths go when right-aligned in a [B, T] array: (positions in
    the flattened [B, T] array, positions in the flattened list values). Each row keeps its last T elements."""
    take = np.minimum(lens, T)
    first = np.cumsum(take) - take  # where each row's kept elements start among all kept elements
    n = np.arange(int(take.sum()))
    dest = n + np.repeat(np.arange(len(lens)) * T + T - take - first, take)
    src = n + np.repeat(np.cumsum(lens) - take - first, take)
    return dest, src


def _lists(arr, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A list<int> column -> (its lengths [B], its flattened values as int64)."""
    _, pc, _ = pyarrow_modules()
    _no_nulls(arr, name, where)
    flat = pc.list_flatten(arr)
    _no_nulls(flat, f"{name} (an element)", where)
    return np.asarray(pc.list_value_length(arr), np.int64), np.asarray(flat).astype(np.int64, copy=False)


def to_columns(batch, columns: dict[str, str], max_len: int, where: str = "batch") -> dict[str, np.ndarray]:
    """A pyarrow RecordBatch or Table -> the numpy batch Scorer.score_batch reads: example columns [B],
    "hist/<f>" [B, max_len], "hist_len" [B], and "seq"/"end" marking runs of rows with one history (see
    history_runs). `columns` comes from check_schema."""
    cols: dict[str, np.ndarray] = {}
    lengths, first, placement = None, None, None
    for key, name in columns.items():
        arr = batch.column(name)
        if not key.startswith("hist/"):
            _no_nulls(arr, name, where)
            cols[key] = np.asarray(arr)
            continue
        lens, values = _lists(arr, name, where)
        if lengths is None:  # every behaviour field has the same lengths, so one placement serves them all
            lengths, first, placement = lens, name, _placement(lens, max_len)
        elif not np.array_equal(lens, lengths):
            row = int(np.argmax(lens != lengths))
            raise DmrxError(
                f"{where}: column {name} row {row}: history length {lens[row]} differs from {first}'s {lengths[row]}"
            )
        out = np.zeros((len(lens), max_len), np.int64)
        out.reshape(-1)[placement[0]] = values[placement[1]]
        cols[key] = out
    cols["hist_len"] = np.minimum(lengths, max_len) if lengths is not None else np.zeros(batch.num_rows, np.int64)
    cols["seq"], cols["end"] = history_runs([cols[k] for k in columns if k.startswith("hist/")], cols["hist_len"])
    return cols


def history_runs(hist: list[np.ndarray], hist_len: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seq, end) columns for Scorer.prepare that give each run of consecutive rows with identical histories
    one id (end is 0). A user's candidates arrive together, so their rows form one run: comparing each row
    with the one before is a linear pass, where grouping identical rows anywhere in the batch sorts
    [B, fields x T] arrays."""
    B = len(hist_len)
    new = np.ones(B, bool)
    if B > 1:
        new[1:] = hist_len[1:] != hist_len[:-1]
        for h in hist:
            new[1:] |= (h[1:] != h[:-1]).any(axis=1)
    return np.cumsum(new) - 1, np.zeros(B, np.int64)


def _list_column(hist: np.ndarray, length: np.ndarray):
    """[B, T] right-aligned ids with their lengths -> a list<int64> Arrow array (oldest first)."""
    pa, _, _ = pyarrow_modules()
    T = hist.shape[1]
    keep = np.arange(T)[None, :] >= (T - length)[:, None]
    offsets = np.concatenate([[0], np.cumsum(length)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(hist[keep].astype(np.int64)))


def write_parquet(
    candidates: str | os.PathLike, out: str | os.PathLike, max_len: int = 0, row_group_rows: int = 1 << 16
) -> dict:
    """Convert a dmrx data file (candidates, or any other) into the Parquet layout above, atomically.

    max_len: keep each history's most recent max_len behaviours (0: the whole visible history). Rows keep
    the file's order; `row` holds each row's position in it.
    """
    pa, _, pq = pyarrow_modules()
    candidates, out = Path(candidates), Path(out)
    if max_len < 0:
        raise DmrxError(f"--max-len must be >= 0, got {max_len}")
    with DataFile(candidates) as data:
        fields = data.fields
        keys = [k for k in fields.example_keys() if k not in ("seq", "end", "prob")]
        cap = max_len
        if cap == 0:  # the longest visible history in the file
            ends = data.read_columns(0, data.n_rows, ["end"])["end"] if data.n_rows else np.zeros(0, np.int64)
            cap = max(1, int(ends.max()) if len(ends) else 1)
        # bounded memory: a batch's [rows, cap] histories stay near 32 MB per field
        rows = max(1, min(row_group_rows, (1 << 22) // cap))
        types = {k: pa.float32() if k.startswith("dense/") else pa.int8() if k == "label" else pa.int64() for k in keys}
        fields_pa = [pa.field("row", pa.int64())] + [pa.field(flat_name(k), types[k]) for k in keys]
        fields_pa += [pa.field(f"hist__{f}", pa.list_(pa.int64())) for f in fields.behaviors]
        schema = pa.schema(fields_pa)
        n = 0
        with atomic_file(out) as tmp:
            with pq.ParquetWriter(tmp, schema) as writer:
                if data.n_rows == 0:
                    writer.write_table(schema.empty_table())
                for batch in data.batches(rows, cap, keys=keys, chunk_rows=rows):
                    B = len(batch["user"])
                    arrays = [pa.array(np.arange(n, n + B, dtype=np.int64))]
                    arrays += [pa.array(np.asarray(batch[k]).astype(types[k].to_pandas_dtype())) for k in keys]
                    length = np.asarray(batch["hist_len"], np.int64)
                    arrays += [_list_column(np.asarray(batch[f"hist/{f}"]), length) for f in fields.behaviors]
                    writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=row_group_rows)
                    n += B
    return {"input": str(candidates), "output": str(out), "rows": n, "max_len": cap, "columns": schema.names}
