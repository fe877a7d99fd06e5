"""Import a flat table with delimiter-joined history columns (the FuxiCTR layout): one row, one example.

A CSV file (or Parquet, when pyarrow is installed: chosen by the suffix .parquet/.pq) with a header row,
e.g. ``user_id,item_id,cate_id,hist_item_id,hist_cate_id,label`` where ``hist_item_id`` holds
``"12^7^31"``: the row's history, oldest first, joined by ``sep``. Columns map to dmrx fields:

- user: one column of ids (default ``user_id``); label: one column of 0/1 (default ``label``; 0.0/1.0 are
  accepted; ``label=None`` writes an unlabelled file);
- target and history: ``{field: column}``. By default every pair of columns ``X_id`` and ``hist_X_id``
  in the header gives the target field X and the behaviour field X (item_id + hist_item_id -> item). All
  history columns of a row must hold the same number of elements; an empty cell is an empty history;
- profile, context: categorical columns kept under their own names; dense: float columns.

Values: ids are non-negative decimal integers of at most 18 digits. An empty cell in a target, profile or
context column is stored as raw id 0 ("unknown"); an empty user, label or dense cell is an error. Columns
named in ``hashed`` may hold any string: a non-empty value maps to a stable id, the first 62 bits of its
BLAKE2b digest (at least 1), the same in every file, so train and test agree; empty stays 0. Any malformed
row (field count, an id or number that does not parse, a label other than 0/1, history columns of
different lengths) raises DmrxError naming the file, the 1-based line (the header is line 1; for Parquet
the 1-based data row) and the column; the output is then not written. Blank lines are skipped.

Each row gets its own sequence unless rows share one for free: when consecutive rows (within a chunk of
``chunk_rows``) belong to the same user and a row's history is a prefix of the next row's history in
every field, the row references the next row's sequence with a shorter ``end`` instead of storing a copy
(a vectorised check, O(history elements)). The examples keep the file's row order.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dmrx.data.format import Writer
from dmrx.errors import DmrxError

_MAX_DIGITS = 18
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_mapping(text: str | None, what: str) -> dict[str, str] | None:
    """'item=item_id,cate=cate_id' -> {"item": "item_id", "cate": "cate_id"}; a bare 'col' maps col -> col."""
    if text is None:
        return None
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        field, eq, column = part.partition("=")
        field, column = field.strip(), (column.strip() if eq else field.strip())
        if not _NAME.match(field):
            raise DmrxError(f"{what}: {field!r} is not a valid field name (letters, digits, _)")
        if not column:
            raise DmrxError(f"{what}: field {field} names no column")
        if field in out:
            raise DmrxError(f"{what}: field {field} is given twice")
        out[field] = column
    if not out:
        raise DmrxError(f"{what}: no field given")
    return out


def default_pairs(header: list[str]) -> dict[str, tuple[str, str]]:
    """{X: ("X_id", "hist_X_id")} for every such pair of columns in the header."""
    cols = set(header)
    out = {}
    for c in header:
        m = re.fullmatch(r"hist_(.+)_id", c)
        if m and f"{m.group(1)}_id" in cols and _NAME.match(m.group(1)):
            out[m.group(1)] = (f"{m.group(1)}_id", c)
    return out


# ---- sources: chunks of {column: list of str} plus the line (or row) number of each row -------------------
def _csv_chunks(path: Path, f, delimiter: str, chunk_rows: int) -> tuple[list[str], Iterator]:
    """The header and a generator of chunks of an open CSV file."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # long history cells
    reader = csv.reader(f, delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as e:
        raise DmrxError(f"{path}: line 1: cannot read the header ({e})") from None
    if not header:
        raise DmrxError(f"{path}: empty file (expected a header row)")
    header = [h.strip() for h in header]

    def chunks():
        ncols = len(header)
        rows: list[list[str]] = []
        lines: list[int] = []
        while True:
            try:
                row = next(reader, None)
            except csv.Error as e:
                raise DmrxError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
            except UnicodeDecodeError as e:
                raise DmrxError(f"{path}: after line {reader.line_num}: not UTF-8 text ({e.reason})") from None
            if row is None or len(rows) == chunk_rows:
                if rows:
                    yield {c: [r[j] for r in rows] for j, c in enumerate(header)}, np.array(lines)
                rows, lines = [], []
                if row is None:
                    return
            if not row:
                continue
            if len(row) != ncols:
                raise DmrxError(
                    f"{path}: line {reader.line_num}: expected {ncols} fields "
                    f"(delimiter {delimiter!r}), found {len(row)}"
                )
            rows.append(row)
            lines.append(reader.line_num)

    return header, chunks()


def _parquet_chunks(path: Path, sep: str, chunk_rows: int, columns: list[str] | None = None):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DmrxError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DmrxError(f"{path}: not a readable Parquet file ({e.__class__.__name__}: {e})") from None
    header = list(pf.schema_arrow.names)

    def text(v) -> str:
        if v is None:
            return ""
        if isinstance(v, list):
            return sep.join(text(x) for x in v)
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    def chunks(needed: list[str]):
        row = 1
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=needed):
            cols = {c: [text(v) for v in batch.column(c).to_pylist()] for c in needed}
            yield cols, np.arange(row, row + batch.num_rows)
            row += batch.num_rows

    return header, chunks


# ---- value conversion -------------------------------------------------------------------------------------
class _Chunk:
    def __init__(self, path: Path, lines: np.ndarray, unit: str):
        self.path, self.lines, self.unit = path, lines, unit

    def fail(self, row: int, column: str, value: str, what: str) -> DmrxError:
        shown = repr(value[:40]) if value else "empty value"
        return DmrxError(f"{self.path}: {self.unit} {int(self.lines[row])}, column {column}: {shown} {what}")


def _hash_ids(values: np.ndarray) -> np.ndarray:
    if not len(values):
        return np.zeros(0, np.int64)
    uniq, inv = np.unique(values, return_inverse=True)
    ids = np.array([hash_id(u) for u in uniq.tolist()], np.int64)
    return ids[inv.ravel()]


def hash_id(value: str) -> int:
    """The stable id of a string value: 0 for "", else the first 62 bits of BLAKE2b-64 (at least 1)."""
    if not value:
        return 0
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return max(1, int.from_bytes(digest, "little") >> 2)


_ID_HELP = f"is not a non-negative integer id of at most {_MAX_DIGITS} digits (hash string columns with --hash)"


def _first_bad(tokens: list[str], empty_ok: bool) -> int:
    for i, t in enumerate(tokens):
        if not ((t.isascii() and t.isdigit() and len(t) <= _MAX_DIGITS) or (empty_ok and not t)):
            return i
    return -1


def _parse_ids(joined: str, sep: str, n: int, empty_ok: bool) -> tuple[np.ndarray, int]:
    """n decimal ids joined by sep -> (int64 values, index of the first bad value, or -1; -2 when the
    text does not hold n values). Empty values give 0 when empty_ok. Vectorised over the text's bytes."""
    out = np.zeros(n, np.int64)
    if not n:
        return out, -1
    if len(sep) != 1 or not sep.isascii():
        joined, sep = joined.replace(sep, "\x1f"), "\x1f"
    sb = ord(sep)
    buf = np.frombuffer(joined.encode("utf-8") + sep.encode(), np.uint8)  # non-ASCII bytes are bad digits
    ends = np.flatnonzero(buf == sb)
    if len(ends) != n:
        return out, -2
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    width = ends - starts
    lut = np.full(256, 255, np.uint8)  # digit values; the separator before a value reads as a leading 0
    lut[48:58] = np.arange(10)
    lut[sb] = 0
    top = min(int(width.max()), _MAX_DIGITS + 1)
    worst = np.zeros(n, np.uint8)
    before = starts - 1  # -1 for the first value: the appended separator at the end
    for k in range(top):
        c = lut[buf[np.maximum(ends - (top - k), before)]]
        np.maximum(worst, c, out=worst)
        out *= 10
        out += c
    bad = (worst == 255) | (width > _MAX_DIGITS)
    if not empty_ok:
        bad |= width == 0
    return out, (int(np.argmax(bad)) if bad.any() else -1)


def _ids(ch: _Chunk, column: str, values: list[str], empty_ok: bool, hashed: bool) -> np.ndarray:
    """A column of decimal ids (or of strings to hash) -> int64."""
    if hashed:
        arr = np.array(values, dtype=str) if values else np.zeros(0, "U1")
        if not empty_ok and len(arr) and (arr == "").any():
            i = int(np.argmax(arr == ""))
            raise ch.fail(i, column, "", "is not an id")
        return _hash_ids(arr)
    out, bad = _parse_ids("\n".join(values), "\n", len(values), empty_ok)
    if bad == -2:  # a quoted value holds a newline
        bad = _first_bad(values, empty_ok)
    if bad >= 0:
        raise ch.fail(bad, column, values[bad], _ID_HELP)
    return out


def _floats(ch: _Chunk, column: str, values: list[str]) -> np.ndarray:
    arr = np.array(values, dtype=str) if values else np.zeros(0, "U1")
    try:
        out = arr.astype(np.float64)
    except ValueError:
        for i, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise ch.fail(i, column, v, "is not a number") from None
        raise
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise ch.fail(i, column, values[i], "is not a finite number")
    return out


def _labels(ch: _Chunk, column: str, values: list[str]) -> np.ndarray:
    arr = np.array(values, dtype=str) if values else np.zeros(0, "U1")
    lab = np.full(len(arr), -1, np.int8)
    lab[(arr == "1") | (arr == "1.0")] = 1
    lab[(arr == "0") | (arr == "0.0")] = 0
    if (lab < 0).any():
        i = int(np.argmax(lab < 0))
        raise ch.fail(i, column, values[i], "is not a 0/1 label")
    return lab


def _histories(
    ch: _Chunk, history: dict[str, str], cols: dict[str, list[str]], sep: str, hashed: set[str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(length per row, flat ids per field) of the rows' histories."""
    lengths = None
    flat = {}
    for field, column in history.items():
        values = cols[column]
        n = np.array([v.count(sep) + 1 if v else 0 for v in values], np.int64)
        if lengths is None:
            lengths, first_col = n, column
        elif (n != lengths).any():
            i = int(np.argmax(n != lengths))
            raise DmrxError(
                f"{ch.path}: {ch.unit} {int(ch.lines[i])}: history column {column} has {n[i]} "
                f"elements, {first_col} has {lengths[i]}"
            )
        joined = sep.join(v for v in values if v)
        total = int(lengths.sum())
        if column in hashed:
            tokens = np.array(joined.split(sep) if total else [], dtype=str)
            ids, bad = _hash_ids(tokens), (int(np.argmax(tokens == "")) if (tokens == "").any() else -1)
        else:
            ids, bad = _parse_ids(joined, sep, total, empty_ok=False)
            if bad == -2:
                bad = _first_bad(joined.split(sep), empty_ok=False)
        if bad >= 0:
            row = int(np.searchsorted(np.cumsum(lengths), bad, "right"))
            raise ch.fail(row, column, joined.split(sep)[bad], "is not an id" if column in hashed else _ID_HELP)
        flat[field] = ids
    return lengths, flat


def _share(user: np.ndarray, lengths: np.ndarray, flat: dict[str, np.ndarray]) -> np.ndarray:
    """owner[i]: the row whose stored sequence row i uses (i itself, or a later row that extends it)."""
    n = len(user)
    share = np.zeros(n, bool)
    if n > 1:
        i = np.flatnonzero((user[:-1] == user[1:]) & (lengths[:-1] <= lengths[1:]))
        if len(i):
            off = np.cumsum(lengths) - lengths
            m = lengths[i]
            total = int(m.sum())
            pair = np.repeat(np.arange(len(i)), m)
            step = np.arange(total) - np.repeat(np.cumsum(m) - m, m)
            a, b = off[i][pair] + step, off[i + 1][pair] + step
            mismatch = np.zeros(len(i), np.int64)
            for values in flat.values():
                differs = values[a] != values[b]
                mismatch += np.bincount(pair, weights=differs, minlength=len(i)).astype(np.int64)
            share[i[mismatch == 0]] = True
    # the owner of i is the first j >= i that does not pass its sequence on
    idx = np.where(share, n, np.arange(n))
    return np.minimum.accumulate(idx[::-1])[::-1]


# ---- the import -------------------------------------------------------------------------------------------
def import_csv(
    path: str | Path,
    out: str | Path,
    *,
    user: str = "user_id",
    label: str | None = "label",
    target: dict[str, str] | None = None,
    history: dict[str, str] | None = None,
    sep: str = "^",
    profile: list[str] | dict[str, str] | None = None,
    context: list[str] | dict[str, str] | None = None,
    dense: list[str] | dict[str, str] | None = None,
    delimiter: str = ",",
    hashed: list[str] | None = None,
    chunk_rows: int = 1 << 16,
) -> dict:
    """Write `out` (one dmrx data file) from the table at `path`; return a summary."""
    path, out = Path(path), Path(out)
    if not path.is_file():
        raise DmrxError(f"{path}: no such file")
    if len(delimiter) != 1:
        raise DmrxError(f"the delimiter must be one character, got {delimiter!r}")
    if not sep:
        raise DmrxError("the history separator must not be empty")
    if sep == delimiter:
        raise DmrxError(f"the history separator {sep!r} must differ from the delimiter")
    if chunk_rows < 1:
        raise DmrxError(f"chunk_rows must be >= 1, got {chunk_rows}")
    parquet = path.suffix.lower() in (".parquet", ".pq")
    chunks = make = None
    with contextlib.ExitStack() as stack:
        if parquet:
            header, make = _parquet_chunks(path, sep, chunk_rows)
            unit = "row"
        else:
            f = stack.enter_context(open(path, newline="", encoding="utf-8-sig"))
            header, chunks = _csv_chunks(path, f, delimiter, chunk_rows)
            stack.callback(chunks.close)
            unit = "line"
        summary = _import(
            path,
            out,
            header,
            unit,
            chunks,
            make,
            user=user,
            label=label,
            target=target,
            history=history,
            sep=sep,
            profile=profile,
            context=context,
            dense=dense,
            hashed=hashed,
        )
    return summary


def _import(
    path: Path,
    out: Path,
    header: list[str],
    unit: str,
    chunks,
    make,
    *,
    user,
    label,
    target,
    history,
    sep,
    profile,
    context,
    dense,
    hashed,
) -> dict:
    parquet = make is not None
    pairs = default_pairs(header)
    if history is None:
        if not pairs:
            raise DmrxError(
                f"{path}: no history columns: the header has no X_id/hist_X_id pair; pass "
                f"--history field=column,... (and --target)"
            )
        history = {f: h for f, (_, h) in pairs.items()}
    if target is None:
        if not pairs:
            raise DmrxError(
                f"{path}: no target columns: the header has no X_id/hist_X_id pair; pass --target field=column,..."
            )
        target = {f: t for f, (t, _) in pairs.items()}
    groups = {
        g: ({c: c for c in v} if isinstance(v, list) else dict(v or {}))
        for g, v in (("profile", profile), ("context", context), ("dense", dense))
    }
    for g, fields in groups.items():
        for f in fields:
            if not _NAME.match(f):
                raise DmrxError(f"--{g}: {f!r} is not a valid field name (letters, digits, _)")
    hashed_set = set(hashed or [])
    needed = (
        [user]
        + ([label] if label else [])
        + list(target.values())
        + list(history.values())
        + [c for fields in groups.values() for c in fields.values()]
    )
    missing = sorted({c for c in needed + sorted(hashed_set) if c not in header})
    if missing:
        where = "the schema" if parquet else "line 1"
        raise DmrxError(
            f"{path}: {where}: missing column(s) {', '.join(missing)} (the header has: {','.join(header)[:200]})"
        )
    bad_hash = hashed_set & set(groups["dense"].values())
    if bad_hash or (label and label in hashed_set):
        raise DmrxError(
            f"--hash: column {sorted(bad_hash or {label})[0]} is numeric (a label or dense column) and cannot be hashed"
        )
    if parquet:
        chunks = make(list(dict.fromkeys(needed)))

    rows = n_seq = n_beh = 0
    attrs = {"source": f"table {path.name}", "history_sep": sep, "hashed_columns": ",".join(sorted(hashed_set))}
    with Writer(out, list(history), attrs=attrs) as w:
        for cols, lines in chunks:
            ch = _Chunk(path, lines, unit)
            uid = _ids(ch, user, cols[user], empty_ok=False, hashed=user in hashed_set)
            lengths, flat = _histories(ch, history, cols, sep, hashed_set)
            owner = _share(uid, lengths, flat)
            keep = owner == np.arange(len(owner))
            starts = np.cumsum(lengths) - lengths
            sel = np.repeat(starts[keep] - (np.cumsum(lengths[keep]) - lengths[keep]), lengths[keep]) + np.arange(
                int(lengths[keep].sum())
            )
            first = w.add_sequences(lengths[keep], **{f: v[sel] for f, v in flat.items()})
            seq_of = np.cumsum(keep) - 1
            w.add_examples(
                seq=first + seq_of[owner],
                end=lengths,
                user=uid,
                label=_labels(ch, label, cols[label]) if label else None,
                target={f: _ids(ch, c, cols[c], True, c in hashed_set) for f, c in target.items()},
                profile={f: _ids(ch, c, cols[c], True, c in hashed_set) for f, c in groups["profile"].items()} or None,
                context={f: _ids(ch, c, cols[c], True, c in hashed_set) for f, c in groups["context"].items()} or None,
                dense={f: _floats(ch, c, cols[c]) for f, c in groups["dense"].items()} or None,
            )
            rows += len(uid)
            n_seq += int(keep.sum())
            n_beh += int(lengths[keep].sum())
        if not rows:
            raise DmrxError(f"{path}: no data rows (only a header)")
    return {
        "out": str(out),
        "rows": rows,
        "sequences": n_seq,
        "behaviors": n_beh,
        "history": history,
        "target": target,
        **{g: v for g, v in groups.items() if v},
        "labelled": bool(label),
        "hashed": sorted(hashed_set),
    }
