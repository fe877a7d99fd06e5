"""Import the raw Alimama display-ad click data (Tianchi "Ali_Display_Ad_Click"), the DMR paper's dataset.

Input directory, four comma-separated files with a header row (columns found by name, extra columns ignored):

    raw_sample.csv   user,time_stamp,adgroup_id,pid,nonclk,clk       impressions (~26.6M rows, 8 days)
    ad_feature.csv   adgroup_id,cate_id,campaign_id,customer,brand,price
    user_profile.csv userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,
                     shopping_level,occupation,new_user_class_level
    behavior_log.csv user,time_stamp,btag,cate,brand                  (~723M rows, ~23 GB)

Text is parsed by vectorised numpy code (no pandas): plain comma-separated values without quoting, one row
per line, LF or CRLF line ends; blank lines are skipped. Ids must be non-negative integers of at most 18
digits. Conventions: "NULL" or empty brand/cate -> raw id 0; empty user_profile fields -> 0; users missing
from user_profile get 0 in every profile field; an impression whose adgroup_id is missing from
ad_feature.csv is an error. Any malformed row (field count, an id that does not parse, a label that is
not 0/1, an unknown btag, a negative or non-finite price) raises DmrxError naming the file, the 1-based
line (the header is line 1) and the column; nothing is written then.

Output (train.h5, test.h5 in the output directory; both appear only if the whole import succeeds):
- an example per impression: user = raw user id, label = clk;
  profile cms_segid, cms_group_id, final_gender_code, age_level, pvalue_level, shopping_level, occupation,
  new_user_class_level; target item (= adgroup_id), cate (cate_id), brand, campaign (campaign_id),
  customer; context pid; dense price = log1p(price).
- pid strings (e.g. "430548_1007") map to ids 1..K in the sorted order of the distinct strings seen in
  raw_sample.csv (the real data has two: 430539_1007 -> 1, 430548_1007 -> 2); the vocabulary is stored
  as the JSON attribute "pid_vocab" of both files.
- history = the user's behaviours strictly before the impression time (stable for ties: behaviours with
  equal timestamps keep their file order); behaviour fields btag (pv, cart, fav, buy -> 1, 2, 3, 4), cate,
  brand; no item id. Each user's sequence is stored once per file and impressions reference it with
  end = searchsorted(times, impression_time, "left"). With max_len > 0 a file stores only the behaviours
  that some history of at most max_len items can see; max_len = 0 stores whole prefixes.
- days are Beijing-time (UTC+8) calendar days: train = impressions of the first 7 days counted from the
  earliest impression's day (and before the last day), test = impressions of the last day; impressions in
  between (only when the data spans more than 8 days) are dropped and counted in the summary.
- examples are ordered by user bucket (a hash of the user id), then user, then time.

Method (external sort, two passes over the data):
1. ad_feature.csv and user_profile.csv are loaded into sorted numpy tables (about 48 bytes per ad and
   72 bytes per profile: ~120 MB for the real data).
2. raw_sample.csv is read in chunks; impressions are joined to their ad row and appended, partitioned by a
   hash of the user id, to B bucket files in a temporary directory; per-user last impression times are
   kept (16 bytes per impression user).
3. behavior_log.csv is read in chunks; behaviours of users without impressions or not before the user's
   last impression are dropped, the rest appended to the same B buckets (17 bytes per behaviour on disk:
   ~10 GB of temporary disk for the real data, in --tmp, default the output directory).
4. bucket by bucket: sort by (user, time), compute every impression's end, append sequences and examples
   to both output files.

Memory bound: peak RSS ~= 45 MB (interpreter, numpy, h5py) + the tables of steps 1-2 (48 B x ads +
72 B x profiles + 16 B x impression users: ~135 MB for the real data) + max(~450 B x chunk_rows while a
chunk is parsed, ~100 B x the behaviour rows of the largest bucket in step 4). Buckets are sized for
4 x chunk_rows behaviour rows each (B is estimated from behavior_log.csv's size), so the last term is
~450 B x chunk_rows: ~240 MB with the default chunk_rows = 2**19, ~60 MB with 2**17. It does not grow
with the length of behavior_log.csv. Caveats: B is fixed before step 3, so a bucket of unusually heavy
users can exceed its share (one user's whole history must fit in memory), and the output Writer keeps
8 B per stored sequence. Measured by benchmarks/alimama_import.py: 213 MiB peak (baseline 41 MiB) for
3M behaviours + 300k impressions with the default chunk_rows, 147 MiB with chunk_rows 2**18, and
246 MiB for 6M behaviours (same users): the bound holds as the log grows.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dmrx.data.format import Writer
from dmrx.errors import DmrxError

FILES = {
    "raw_sample": ("raw_sample.csv", ("user", "time_stamp", "adgroup_id", "pid", "clk")),
    "ad_feature": ("ad_feature.csv", ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price")),
    "user_profile": (
        "user_profile.csv",
        (
            "userid",
            "cms_segid",
            "cms_group_id",
            "final_gender_code",
            "age_level",
            "pvalue_level",
            "shopping_level",
            "occupation",
            "new_user_class_level",
        ),
    ),
    "behavior_log": ("behavior_log.csv", ("user", "time_stamp", "btag", "cate", "brand")),
}
PROFILE_FIELDS = FILES["user_profile"][1][1:]
BTAGS = {b"pv": 1, b"cart": 2, b"fav": 3, b"buy": 4}
TRAIN_DAYS = 7
DAY_OFFSET = 8 * 3600  # Beijing time, UTC+8
_MAX_DIGITS = 18
_I32 = np.iinfo(np.int32)
_BAD = 255
_DIGIT = np.full(256, _BAD, np.uint8)  # byte -> digit value; separators count as a leading 0
_DIGIT[48:58] = np.arange(10)
_DIGIT[[10, 44]] = 0

_IMP = np.dtype([("user", "<i8"), ("ts", "<i8"), ("ad", "<i4"), ("pid", "<i4"), ("clk", "i1")])
_BEH = np.dtype([("user", "<i4"), ("ts", "<i4"), ("cate", "<i4"), ("brand", "<i4"), ("btag", "i1")])


# ---- vectorised text parsing ----------------------------------------------------------------------------
class _Block:
    """A block of whole lines of a comma-separated file, split into fields without copying the text."""

    def __init__(self, path: Path, text: bytes, columns: dict[str, int], first_line: int):
        self.path, self.columns = path, columns
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")
        self.buf = buf = np.frombuffer(text, np.uint8)
        ncols = self.ncols = columns["__ncols__"]
        nl = np.flatnonzero(buf == 10)
        starts = np.empty_like(nl)
        starts[:1] = 0
        starts[1:] = nl[:-1] + 1
        nonblank = nl > starts
        dpos = np.flatnonzero(buf == 44)
        count = np.diff(np.searchsorted(dpos, nl), prepend=0)
        bad = nonblank & (count != ncols - 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise DmrxError(
                f"{path}: line {first_line + i}: expected {ncols} comma-separated fields, found {int(count[i]) + 1}"
            )
        keep = np.flatnonzero(nonblank)
        self.first_line = first_line
        self.keep = keep
        self.n = len(keep)
        self._line_start = starts[keep]
        self._line_end = nl[keep]
        self._delims = dpos.reshape(-1, ncols - 1) if ncols > 1 else np.zeros((self.n, 0), np.int64)

    def line(self, row: int) -> int:
        return self.first_line + int(self.keep[row])

    def _span(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        k = self.columns[name]
        start = self._line_start if k == 0 else self._delims[:, k - 1] + 1
        end = self._line_end if k == self.ncols - 1 else self._delims[:, k]
        return start, end

    def text(self, name: str, row: int) -> str:
        s, e = self._span(name)
        return bytes(self.buf[s[row] : e[row]]).decode("utf-8", "replace")

    def fail(self, name: str, row: int, what: str) -> DmrxError:
        value = self.text(name, row)
        shown = repr(value[:40]) if value else "empty value"
        return DmrxError(f"{self.path}: line {self.line(row)}, column {name}: {shown} {what}")

    def ints(self, name: str, missing: int | None = None) -> np.ndarray:
        """Non-negative integer ids; with `missing` set, empty fields and "NULL" give that value."""
        s, e = self._span(name)
        width = e - s
        n = len(s)
        top = int(width.max()) if n else 0
        if top > _MAX_DIGITS:
            row = int(np.argmax(width > _MAX_DIGITS))
            raise self.fail(name, row, f"is not an integer id of at most {_MAX_DIGITS} digits")
        buf = self.buf
        # right-aligned digit positions; those left of a field read the separator before it (a leading 0)
        val = np.zeros(n, np.int64)
        worst = np.zeros(n, np.uint8)
        before = s - 1  # -1 for the block's first field: its last byte, a newline
        for k in range(top):
            c = _DIGIT[buf[np.maximum(e - (top - k), before)]]
            np.maximum(worst, c, out=worst)
            val *= 10
            val += c
        bad = worst == _BAD
        empty = width == 0
        if missing is not None:
            val[empty] = missing
            rows = np.flatnonzero(bad)
            null = rows[self._null(s[rows], width[rows])]
            val[null] = missing
            bad[null] = False
        else:
            bad |= empty
        if bad.any():
            row = int(np.argmax(bad))
            raise self.fail(name, row, "is not a non-negative integer id")
        return val

    def _null(self, s: np.ndarray, width: np.ndarray) -> np.ndarray:
        out = width == 4
        for k, ch in enumerate(b"NULL"):
            out &= self.buf[np.minimum(s + k, len(self.buf) - 1)] == ch
        return out

    def tokens(self, name: str, max_width: int = 64) -> np.ndarray:
        """Fields as a fixed-width bytes array (dtype S<w>)."""
        s, e = self._span(name)
        width = e - s
        top = int(width.max()) if len(s) else 0
        if top > max_width:
            raise self.fail(name, int(np.argmax(width > max_width)), f"is longer than {max_width} characters")
        top = max(top, 1)
        cols = np.arange(top)
        valid = cols[None, :] < width[:, None]
        idx = np.where(valid, s[:, None] + cols, 0)
        mat = np.where(valid, self.buf[idx], np.uint8(0)).astype(np.uint8)
        return np.ascontiguousarray(mat).view(f"S{top}").ravel()

    def floats(self, name: str) -> np.ndarray:
        tok = self.tokens(name, 40)
        try:
            val = tok.astype(np.float64)
        except ValueError:
            for row, t in enumerate(tok.tolist()):
                try:
                    float(t)
                except ValueError:
                    raise self.fail(name, row, "is not a number") from None
            raise
        bad = ~np.isfinite(val)
        if bad.any():
            raise self.fail(name, int(np.argmax(bad)), "is not a finite number")
        return val


def _header(path: Path, required: tuple[str, ...]) -> tuple[dict[str, int], int]:
    with open(path, "rb") as f:
        first = f.readline()
    if not first.strip():
        raise DmrxError(f"{path}: empty file (expected a header row: {','.join(required)})")
    try:
        names = [c.strip() for c in first.decode("utf-8-sig").rstrip("\r\n").split(",")]
    except UnicodeDecodeError:
        raise DmrxError(f"{path}: line 1: the header is not UTF-8 text") from None
    missing = [c for c in required if c not in names]
    if missing:
        raise DmrxError(
            f"{path}: line 1: missing column(s) {', '.join(missing)} (the header has: {','.join(names)[:200]})"
        )
    columns = {c: names.index(c) for c in required}
    columns["__ncols__"] = len(names)
    return columns, len(first)


def _blocks(path: Path, required: tuple[str, ...], chunk_rows: int) -> Iterator[_Block]:
    """Blocks of about chunk_rows whole lines each (after the header), parsed into fields."""
    columns, header_len = _header(path, required)
    line = 2
    with open(path, "rb") as f:
        f.seek(header_len)
        pending = f.read(1 << 16)
        per_line = len(pending) / max(pending.count(b"\n"), 1)
        block_bytes = max(1 << 12, int(per_line * chunk_rows))
        while True:
            data = f.read(max(block_bytes - len(pending), 1 << 12))
            if not data:  # end of file: the rest, which may lack its final newline
                if pending:
                    yield _Block(path, pending if pending.endswith(b"\n") else pending + b"\n", columns, line)
                return
            pending += data
            cut = pending.rfind(b"\n")
            if cut < 0:  # one line longer than a block: read on
                continue
            text, pending = pending[: cut + 1], pending[cut + 1 :]
            yield _Block(path, text, columns, line)
            line += text.count(b"\n")


# ---- tables ---------------------------------------------------------------------------------------------
def _sorted_unique(path: Path, ids: np.ndarray, lines: np.ndarray, column: str) -> np.ndarray:
    """The stable order that sorts ids; raises on a duplicate, naming its later line."""
    order = np.argsort(ids, kind="stable")
    s = ids[order]
    dup = s[1:] == s[:-1]
    if dup.any():
        i = int(np.argmax(dup))
        earlier, later = sorted((int(lines[order[i]]), int(lines[order[i + 1]])))
        raise DmrxError(f"{path}: line {later}, column {column}: {s[i]} appears again (first on line {earlier})")
    return order


def _load_ads(path: Path, chunk_rows: int) -> dict[str, np.ndarray]:
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("id", "cate", "campaign", "customer", "brand", "price", "line")
    }
    for b in _blocks(path, FILES["ad_feature"][1], chunk_rows):
        cols["id"].append(b.ints("adgroup_id"))
        cols["cate"].append(b.ints("cate_id", missing=0))
        cols["campaign"].append(b.ints("campaign_id"))
        cols["customer"].append(b.ints("customer"))
        cols["brand"].append(b.ints("brand", missing=0))
        price = b.floats("price")
        if (price < 0).any():
            raise b.fail("price", int(np.argmax(price < 0)), "is negative")
        cols["price"].append(price)
        cols["line"].append(b.first_line + b.keep)
    if not sum(len(v) for v in cols["id"]):
        raise DmrxError(f"{path}: no data rows (only a header)")
    table = {k: np.concatenate(v) for k, v in cols.items()}
    order = _sorted_unique(path, table["id"], table["line"], "adgroup_id")
    return {k: v[order] for k, v in table.items() if k != "line"}


def _load_profiles(path: Path, chunk_rows: int) -> dict[str, np.ndarray]:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("id", "line", *PROFILE_FIELDS)}
    for b in _blocks(path, FILES["user_profile"][1], chunk_rows):
        cols["id"].append(b.ints("userid"))
        for f in PROFILE_FIELDS:
            cols[f].append(b.ints(f, missing=0))
        cols["line"].append(b.first_line + b.keep)
    if not sum(len(v) for v in cols["id"]):
        raise DmrxError(f"{path}: no data rows (only a header)")
    table = {k: np.concatenate(v) for k, v in cols.items()}
    order = _sorted_unique(path, table["id"], table["line"], "userid")
    return {k: v[order] for k, v in table.items() if k != "line"}


def _find(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in sorted keys, found) for each value."""
    if not len(keys):
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return pos, keys[pos] == values


def _bucket_of(user: np.ndarray, n_buckets: int) -> np.ndarray:
    h = (user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    # small unsigned ints: numpy's stable argsort radix-sorts them
    return (h % np.uint64(n_buckets)).astype(np.uint16 if n_buckets <= 1 << 16 else np.int64)


def _append_buckets(tmp: Path, prefix: str, rec: np.ndarray, bucket: np.ndarray, n_buckets: int) -> None:
    order = np.argsort(bucket, kind="stable")
    rec, bucket = rec[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange(n_buckets + 1))
    for k in np.flatnonzero(np.diff(bounds)).tolist():
        with open(tmp / f"{prefix}{k}.bin", "ab") as f:
            rec[bounds[k] : bounds[k + 1]].tofile(f)


def _read_bucket(tmp: Path, prefix: str, k: int, dtype: np.dtype) -> np.ndarray:
    p = tmp / f"{prefix}{k}.bin"
    return np.fromfile(p, dtype=dtype) if p.exists() else np.zeros(0, dtype)


def _day(ts: np.ndarray | int):
    return (ts + DAY_OFFSET) // 86400


# ---- the import -----------------------------------------------------------------------------------------
def import_alimama(
    src_dir: str | Path,
    out_dir: str | Path = ".",
    chunk_rows: int = 1 << 19,
    max_len: int = 50,
    tmp_dir: str | Path | None = None,
    progress=None,
) -> dict:
    """Write train.h5 and test.h5 into out_dir from the raw files in src_dir; return a summary.

    progress: optional callable(str) told which step runs.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if chunk_rows < 1:
        raise DmrxError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if max_len < 0:
        raise DmrxError(f"max_len must be >= 0, got {max_len}")
    if not src_dir.is_dir():
        raise DmrxError(f"{src_dir}: no such directory")
    paths = {k: src_dir / name for k, (name, _) in FILES.items()}
    for p in paths.values():
        if not p.is_file():
            raise DmrxError(f"{p}: no such file")
    for k, (_, required) in FILES.items():
        _header(paths[k], required)  # fail on a missing column before any long pass
    say = progress or (lambda msg: None)

    say("reading ad_feature.csv")
    ads = _load_ads(paths["ad_feature"], chunk_rows)
    say("reading user_profile.csv")
    profiles = _load_profiles(paths["user_profile"], chunk_rows)

    # buckets sized for ~4 chunks of behaviour rows each, estimated from the file size
    with open(paths["behavior_log"], "rb") as f:
        f.readline()
        sample = f.read(1 << 16)
    per_line = len(sample) / max(sample.count(b"\n"), 1) if sample else 32.0
    est_rows = paths["behavior_log"].stat().st_size / max(per_line, 1.0)
    n_buckets = max(1, math.ceil(est_rows / (4 * chunk_rows)))

    tmp_root = Path(tmp_dir) if tmp_dir is not None else out_dir
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dmrx-alimama-", dir=tmp_root) as tmp_name:
        tmp = Path(tmp_name)
        say("reading raw_sample.csv")
        imp_info = _scan_impressions(paths["raw_sample"], ads, chunk_rows, tmp, n_buckets)
        say("reading behavior_log.csv")
        beh_info = _scan_behaviors(paths["behavior_log"], imp_info, chunk_rows, tmp, n_buckets)
        say("writing train.h5 and test.h5")
        summary = _write(out_dir, tmp, n_buckets, ads, profiles, imp_info, max_len)
    summary.update(
        {
            "behaviors_read": beh_info["read"],
            "behaviors_kept": beh_info["kept"],
            "ads": int(len(ads["id"])),
            "profiles": int(len(profiles["id"])),
            "impression_users": int(len(imp_info["users"])),
            "buckets": n_buckets,
            "chunk_rows": chunk_rows,
            "max_len": max_len,
        }
    )
    return summary


def _scan_impressions(path: Path, ads: dict, chunk_rows: int, tmp: Path, n_buckets: int) -> dict:
    users = np.zeros(0, np.int64)  # sorted users with impressions, and each one's last impression time
    last = np.zeros(0, np.int64)
    pid_code: dict[bytes, int] = {}
    t_min, t_max, n = None, None, 0
    for b in _blocks(path, FILES["raw_sample"][1], chunk_rows):
        if not b.n:
            continue
        user = b.ints("user")
        ts = b.ints("time_stamp")
        adgroup = b.ints("adgroup_id")
        clk = b.ints("clk")
        if (clk > 1).any():
            raise b.fail("clk", int(np.argmax(clk > 1)), "is not a 0/1 label")
        ad_pos, found = _find(ads["id"], adgroup)
        if not found.all():
            raise b.fail("adgroup_id", int(np.argmax(~found)), "is not in ad_feature.csv")
        tok = b.tokens("pid")
        if (tok == b"").any():
            raise b.fail("pid", int(np.argmax(tok == b"")), "is not a pid")
        uniq, inv = np.unique(tok, return_inverse=True)
        codes = np.array([pid_code.setdefault(u, len(pid_code)) for u in uniq.tolist()], np.int32)

        u_chunk, first = np.unique(user, return_inverse=True)
        m_chunk = np.full(len(u_chunk), np.iinfo(np.int64).min)
        np.maximum.at(m_chunk, first, ts)
        merged_u = np.concatenate([users, u_chunk])
        merged_m = np.concatenate([last, m_chunk])
        users, idx = np.unique(merged_u, return_inverse=True)
        last = np.full(len(users), np.iinfo(np.int64).min)
        np.maximum.at(last, idx, merged_m)

        t_min = int(ts.min()) if t_min is None else min(t_min, int(ts.min()))
        t_max = int(ts.max()) if t_max is None else max(t_max, int(ts.max()))
        rec = np.empty(b.n, _IMP)
        rec["user"], rec["ts"], rec["ad"], rec["pid"], rec["clk"] = user, ts, ad_pos, codes[inv.ravel()], clk
        _append_buckets(tmp, "imp", rec, _bucket_of(user, n_buckets), n_buckets)
        n += b.n
    if not n:
        raise DmrxError(f"{path}: no data rows (only a header)")
    if t_max - t_min > _I32.max:
        raise DmrxError(
            f"{path}: impressions span more than 68 years (time_stamp {t_min}..{t_max}): "
            f"time_stamp must be Unix seconds"
        )
    day0, last_day = _day(t_min), _day(t_max)
    if last_day == day0:
        raise DmrxError(
            f"{path}: every impression falls on one day (Beijing time): need training days and a later test day"
        )
    # pid strings -> 1..K in sorted order
    vocab = sorted(pid_code)
    remap = np.zeros(len(pid_code), np.int64)
    for rank, s in enumerate(vocab, 1):
        remap[pid_code[s]] = rank
    return {
        "rows": n,
        "users": users,
        "last": last,
        "t0": t_min,
        "day0": day0,
        "last_day": last_day,
        "train_end_day": min(day0 + TRAIN_DAYS, last_day),
        "pid_remap": remap,
        "pid_vocab": [s.decode("utf-8", "replace") for s in vocab],
    }


def _scan_behaviors(path: Path, imp: dict, chunk_rows: int, tmp: Path, n_buckets: int) -> dict:
    users, last, t0 = imp["users"], imp["last"], imp["t0"]
    read = kept = 0
    for b in _blocks(path, FILES["behavior_log"][1], chunk_rows):
        if not b.n:
            continue
        user = b.ints("user")
        ts = b.ints("time_stamp")
        cate = b.ints("cate", missing=0)
        brand = b.ints("brand", missing=0)
        tok = b.tokens("btag", 8)
        btag = np.zeros(b.n, np.int8)
        for name, code in BTAGS.items():
            btag[tok == name] = code
        if (btag == 0).any():
            raise b.fail("btag", int(np.argmax(btag == 0)), "is not a btag (pv, cart, fav or buy)")
        pos, found = _find(users, user)
        keep = found & (ts < last[pos])
        for name, v in (("cate", cate), ("brand", brand)):
            big = keep & (v > _I32.max)
            if big.any():
                raise b.fail(
                    name, int(np.argmax(big)), f"is larger than {_I32.max}, the largest id this importer handles"
                )
        idx = np.flatnonzero(keep)
        rec = np.empty(len(idx), _BEH)
        rec["user"] = pos[idx]
        rec["ts"] = np.clip(ts[idx] - t0, _I32.min, _I32.max)
        rec["cate"], rec["brand"], rec["btag"] = cate[idx], brand[idx], btag[idx]
        _append_buckets(tmp, "beh", rec, _bucket_of(user[idx], n_buckets), n_buckets)
        read += b.n
        kept += len(idx)
    if not read:
        raise DmrxError(f"{path}: no data rows (only a header)")
    return {"read": read, "kept": kept}


def _write(out_dir: Path, tmp: Path, n_buckets: int, ads: dict, profiles: dict, imp: dict, max_len: int) -> dict:
    users, t0 = imp["users"], imp["t0"]
    splits = {"train": lambda day: day < imp["train_end_day"], "test": lambda day: day == imp["last_day"]}
    rows = dict.fromkeys(splits, 0)
    attrs = {
        "source": "alimama raw (Tianchi Ali_Display_Ad_Click)",
        "max_len": max_len,
        "pid_vocab": json.dumps(imp["pid_vocab"]),
        "first_day_utc8": int(imp["day0"]),
        "brand_cate_unknown": "raw id 0 means NULL/unknown brand or cate",
    }
    dropped = 0
    with contextlib.ExitStack() as stack:
        writers = {
            s: stack.enter_context(Writer(out_dir / f"{s}.h5", ["btag", "cate", "brand"], attrs={**attrs, "split": s}))
            for s in splits
        }
        for k in range(n_buckets):
            im = _read_bucket(tmp, "imp", k, _IMP)
            if not len(im):
                continue
            be = _read_bucket(tmp, "beh", k, _BEH)
            iu = np.searchsorted(users, im["user"])
            its = im["ts"] - t0
            # (user, time) as one int64 key: user index < 2**31, time offset in int32; stable sorts keep the
            # file order of ties
            ikey = (iu << 32) + (its - _I32.min)
            order = np.argsort(ikey, kind="stable")
            im, iu, ikey = im[order], iu[order], ikey[order]
            bkey = (be["user"].astype(np.int64) << 32) + (be["ts"].astype(np.int64) - _I32.min)
            border = np.argsort(bkey, kind="stable")
            bkey = bkey[border]
            user_start = np.searchsorted(bkey, iu << 32, "left")
            end = np.searchsorted(bkey, ikey, "left") - user_start
            del bkey, ikey
            day = _day(im["ts"])
            used = np.zeros(len(im), bool)
            for split, in_split in splits.items():
                sel = np.flatnonzero(in_split(day))
                used[sel] = True
                if not len(sel):
                    continue
                rows[split] += len(sel)
                _write_split(
                    writers[split],
                    im[sel],
                    iu[sel],
                    end[sel],
                    user_start[sel],
                    be,
                    border,
                    ads,
                    profiles,
                    imp["pid_remap"],
                    max_len,
                )
            dropped += int((~used).sum())
    return {
        "rows": {f"{s}.h5": n for s, n in rows.items()},
        "impressions": imp["rows"],
        "impressions_dropped": dropped,
        "days": int(imp["last_day"] - imp["day0"] + 1),
        "pid_vocab": imp["pid_vocab"],
    }


def _write_split(
    w: Writer,
    im: np.ndarray,
    iu: np.ndarray,
    end: np.ndarray,
    user_start: np.ndarray,
    be: np.ndarray,
    border: np.ndarray,
    ads: dict,
    profiles: dict,
    pid_remap: np.ndarray,
    max_len: int,
) -> None:
    """Append one bucket's examples of one split (rows sorted by user, time) and their sequences."""
    _, first, counts = np.unique(iu, return_index=True, return_counts=True)
    hi = np.maximum.reduceat(end, first)
    lo = np.zeros(len(first), np.int64)
    if max_len:
        lo = np.maximum(np.minimum.reduceat(end, first) - max_len, 0)
    seq_len = hi - lo
    base = user_start[first] + lo
    flat = np.repeat(base - (np.cumsum(seq_len) - seq_len), seq_len) + np.arange(int(seq_len.sum()))
    src = border[flat]
    del flat
    first_seq = w.add_sequences(seq_len, btag=be["btag"][src], cate=be["cate"][src], brand=be["brand"][src])
    del src
    ad = im["ad"]
    ppos, pfound = _find(profiles["id"], im["user"])
    w.add_examples(
        seq=first_seq + np.repeat(np.arange(len(first)), counts),
        end=end - np.repeat(lo, counts),
        user=im["user"],
        label=im["clk"],
        profile={f: np.where(pfound, profiles[f][ppos], 0) for f in PROFILE_FIELDS},
        target={
            "item": ads["id"][ad],
            "cate": ads["cate"][ad],
            "brand": ads["brand"][ad],
            "campaign": ads["campaign"][ad],
            "customer": ads["customer"][ad],
        },
        context={"pid": pid_remap[im["pid"]]},
        dense={"price": np.log1p(ads["price"][ad])},
    )
