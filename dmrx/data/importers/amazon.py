"""Import Amazon review sequences in the S3-Rec layout (`NAME.txt` + `NAME_item2attributes.json`).

Input (github.com/RUCAIBox/CIKM2020-S3Rec, data/):
- `NAME.txt`: one user per line, ``user_id item_1 ... item_n``, items in time order, integer ids >= 0.
  Blank lines are skipped; a user id may appear on one line only.
- `NAME_item2attributes.json`: ``{"item_id": [attr_id, ...]}``: the brand first (when the item has one),
  then sub-categories, all in one shared id space.

Field recovery (the rule of the data's SOURCE notes): cate = the item's last attribute (its leaf category);
brand = its first attribute when that id never appears in a non-first position anywhere in the json, else
unknown. An item whose only attribute is a brand has an unknown cate; an item absent from the json has both
unknown. **Unknown cate or brand is stored as raw id 0** (attribute ids in S3-Rec data start at 1, so 0
never collides with a real attribute; the model's vocabulary treats 0 as one more id).

Protocol (DIN/DIEN "Amazon" style, leave-last-out): for a user with items s[0..n-1], the last item s[n-1]
is the test positive (history s[:n-1]), s[n-2] the validation positive, and s[i] for 1 <= i <= n-3 are the
training positives (history s[:i], never empty). Users with fewer than 2 items give no example, users with
2 items only a test example. Every positive gets one negative (label 0) with the same history and a target
drawn uniformly from the items of NAME.txt the user never interacted with, by vectorised rejection sampling
with numpy's default generator seeded by ``[seed, split]`` (split 0 train, 1 valid, 2 test): the output is
a function of the input and the seed. Examples are ordered by user (file order), then position, positive
then its negative.

Output: train.h5, valid.h5, test.h5. Each user's sequence is stored once per file and its examples
reference it with ``end`` = the number of visible behaviours. Behaviour fields item, cate, brand; target
fields item, cate, brand; user = the raw user id; label 1/0; no profile, context or dense fields. With
``max_len`` > 0 a file stores, per user, only the behaviours that a history of at most ``max_len`` items
can see (the reader truncates histories to its own max_len at read time; reading these files with a larger
max_len shows at most ``max_len`` items); ``max_len`` = 0 stores every user's whole prefix.

All three files are written together and appear only if all of them succeed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from dmrx.data.format import Writer
from dmrx.errors import DmrxError

SPLITS = ("train", "valid", "test")
UNKNOWN = 0  # raw id stored for an unknown cate or brand


def _read_sequences(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids [U], sequence lengths [U], flat item ids [nnz]) in file order."""
    if not path.is_file():
        raise DmrxError(f"{path}: no such file")
    users: list[int] = []
    lengths: list[int] = []
    tokens: list[str] = []
    first_line: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DmrxError(f"{path}: not a UTF-8 text file (byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        for k, tok in enumerate(parts):
            if not (tok.isascii() and tok.isdigit()):
                what = "user id" if k == 0 else f"item {k}"
                raise DmrxError(
                    f"{path}: line {lineno}, field {k + 1} ({what}): {tok[:40]!r} is not a non-negative integer id"
                )
        if len(parts) < 2:
            raise DmrxError(
                f"{path}: line {lineno}: user {parts[0]} has no items (expected 'user_id item_1 ... item_n')"
            )
        if len(tok := max(parts, key=len)) > 18:
            raise DmrxError(f"{path}: line {lineno}: id {tok[:40]} is too large (more than 18 digits)")
        if parts[0] in first_line:
            raise DmrxError(
                f"{path}: line {lineno}: user {parts[0]} appears again (first on line {first_line[parts[0]]})"
            )
        first_line[parts[0]] = lineno
        users.append(int(parts[0]))
        lengths.append(len(parts) - 1)
        tokens += parts[1:]
    if not users:
        raise DmrxError(f"{path}: no users (the file is empty)")
    items = np.array(tokens, dtype=np.int64) if tokens else np.zeros(0, np.int64)
    return np.array(users, np.int64), np.array(lengths, np.int64), items


def _read_attributes(path: Path) -> dict[int, list[int]]:
    if not path.is_file():
        raise DmrxError(f"{path}: no such file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DmrxError(f"{path}: not a UTF-8 text file (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DmrxError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise DmrxError(f'{path}: expected a JSON object {{"item_id": [attr_id, ...]}}, got {type(raw).__name__}')
    attrs: dict[int, list[int]] = {}
    for key, values in raw.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 18:
            raise DmrxError(f"{path}: item key {key[:40]!r} is not a non-negative integer id")
        if not isinstance(values, list) or not all(type(v) is int and 0 <= v < 1 << 62 for v in values):
            raise DmrxError(
                f"{path}: item {key}: expected a list of non-negative integer attribute ids, "
                f"got {json.dumps(values)[:60]}"
            )
        attrs[int(key)] = values
    return attrs


def item_fields(attrs: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted item ids, cate, brand) by the recovery rule of the module docstring."""
    non_first = {a for values in attrs.values() for a in values[1:]}
    ids = np.array(sorted(attrs), dtype=np.int64)
    cate = np.full(len(ids), UNKNOWN, np.int64)
    brand = np.full(len(ids), UNKNOWN, np.int64)
    for i, item in enumerate(ids.tolist()):
        values = attrs[item]
        if not values:
            continue
        is_brand = values[0] not in non_first
        if is_brand:
            brand[i] = values[0]
        if len(values) > 1 or not is_brand:
            cate[i] = values[-1]
    return ids, cate, brand


def _lookup(keys: np.ndarray, table: np.ndarray, items: np.ndarray) -> np.ndarray:
    """table[position of item in sorted keys], UNKNOWN for items not in keys."""
    if not len(keys):
        return np.full(len(items), UNKNOWN, np.int64)
    pos = np.minimum(np.searchsorted(keys, items), len(keys) - 1)
    return np.where(keys[pos] == items, table[pos], UNKNOWN)


def _negatives(rng: np.random.Generator, row_user: np.ndarray, inter_keys: np.ndarray, n_items: int) -> np.ndarray:
    """For each row, an item index in [0, n_items) the row's user never interacted with.

    inter_keys: sorted user_index * n_items + item_index of every interaction.
    """
    out = np.empty(len(row_user), np.int64)
    todo = np.arange(len(row_user))
    while len(todo):
        cand = rng.integers(0, n_items, len(todo))
        key = row_user[todo] * n_items + cand
        pos = np.minimum(np.searchsorted(inter_keys, key), len(inter_keys) - 1)
        hit = inter_keys[pos] == key
        out[todo[~hit]] = cand[~hit]
        todo = todo[hit]
    return out


def import_amazon(src_dir: str | Path, name: str, out_dir: str | Path = ".", seed: int = 0, max_len: int = 50) -> dict:
    """Write train.h5, valid.h5 and test.h5 into out_dir; return a summary (rows per file, counts)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if max_len < 0:
        raise DmrxError(f"max_len must be >= 0, got {max_len}")
    if not src_dir.is_dir():
        raise DmrxError(f"{src_dir}: no such directory")
    seq_path = src_dir / f"{name}.txt"
    attr_path = src_dir / f"{name}_item2attributes.json"
    users, lengths, items = _read_sequences(seq_path)
    attrs = _read_attributes(attr_path)

    attr_ids, attr_cate, attr_brand = item_fields(attrs)
    cate = _lookup(attr_ids, attr_cate, items)
    brand = _lookup(attr_ids, attr_brand, items)

    # item universe for negatives: the items of NAME.txt; interactions as sorted (user, item) keys
    universe, item_index = np.unique(items, return_inverse=True)
    n_users, n_items = len(users), len(universe)
    user_of = np.repeat(np.arange(n_users), lengths)
    inter_keys = np.unique(user_of * n_items + item_index)
    distinct = np.bincount(inter_keys // n_items, minlength=n_users)
    full = distinct >= n_items
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    # positions per split: (user index, end) with the target at flat row starts[u] + end
    n = lengths
    per_split = {
        "train": np.maximum(n - 3, 0),  # ends 1..n-3
        "valid": (n >= 3).astype(np.int64),  # end n-2
        "test": (n >= 2).astype(np.int64),  # end n-1
    }
    summary = {
        "users": int(n_users),
        "items": int(n_items),
        "interactions": int(len(items)),
        "seed": seed,
        "max_len": max_len,
        "rows": {},
    }
    files = {}
    for k, split in enumerate(SPLITS):
        count = per_split[split]
        ex_user = np.repeat(np.arange(n_users), count)
        if split == "train":
            first = np.concatenate([[0], np.cumsum(count)[:-1]])
            end = np.arange(len(ex_user)) - first[ex_user] + 1
        else:
            end = n[ex_user] - (2 if split == "valid" else 1)
        if full[ex_user].any():
            u = int(ex_user[np.argmax(full[ex_user])])
            raise DmrxError(f"{seq_path}: user {users[u]} interacted with every item: no negative can be drawn for it")
        rng = np.random.default_rng([seed, k])
        neg = universe[_negatives(rng, ex_user, inter_keys, n_items)]
        pos = items[starts[ex_user] + end]

        # stored sequences: per user the window [lo, hi) that histories of <= max_len items can see
        has = np.bincount(ex_user, minlength=n_users) > 0
        hi = np.zeros(n_users, np.int64)
        np.maximum.at(hi, ex_user, end)
        lo_end = np.full(n_users, np.iinfo(np.int64).max)
        np.minimum.at(lo_end, ex_user, end)
        lo = np.maximum(lo_end - max_len, 0) if max_len > 0 else np.zeros(n_users, np.int64)
        lo = np.where(has, lo, 0)
        seq_users = np.flatnonzero(has)
        seq_len = hi[seq_users] - lo[seq_users]
        seq_index = np.full(n_users, -1)
        seq_index[seq_users] = np.arange(len(seq_users))
        flat = np.repeat(starts[seq_users] + lo[seq_users] - np.cumsum(seq_len) + seq_len, seq_len) + np.arange(
            int(seq_len.sum())
        )

        # interleave each positive with its negative
        def pair(a, b):
            return np.stack([a, b], axis=1).ravel()

        target = pair(pos, neg)
        files[split] = {
            "lengths": seq_len,
            "behaviors": {"item": items[flat], "cate": cate[flat], "brand": brand[flat]},
            "examples": {
                "seq": np.repeat(seq_index[ex_user], 2),
                "end": np.repeat(end - lo[ex_user], 2),
                "user": np.repeat(users[ex_user], 2),
                "label": np.tile(np.array([1, 0], np.int8), len(ex_user)),
                "target": {
                    "item": target,
                    "cate": _lookup(attr_ids, attr_cate, target),
                    "brand": _lookup(attr_ids, attr_brand, target),
                },
            },
        }
        summary["rows"][f"{split}.h5"] = int(2 * len(ex_user))

    attrs_out = {
        "source": f"amazon S3-Rec {name}",
        "seed": seed,
        "max_len": max_len,
        "unknown_id": "cate/brand raw id 0 means unknown",
    }
    with contextlib.ExitStack() as stack:
        for split in SPLITS:
            f = files[split]
            w = stack.enter_context(
                Writer(out_dir / f"{split}.h5", ["item", "cate", "brand"], attrs={**attrs_out, "split": split})
            )
            w.add_sequences(f["lengths"], **f["behaviors"])
            w.add_examples(**f["examples"])
    return summary
