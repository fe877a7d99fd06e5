"""The feature spec: which fields a model reads, which embedding table each uses, and their vocabularies.

Tables are shared by declaration, FuxiCTR style: a behaviour field and the target field of the same name
(hist/item and target/item) look up one table, so the history and the target live in one space. A spec
is built once from the training file, saved with the model and used to encode every later file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dmrx.data.reader import DataFile
from dmrx.data.vocab import Vocab
from dmrx.errors import DmrxError


def flat_name(key: str) -> str:
    """A batch key with "/" written "__" (hist/item -> hist__item): the name it takes where "/" is not a
    valid or comfortable character (ONNX graph inputs, TensorRT bindings, Parquet and Spark columns)."""
    return key.replace("/", "__")


def batch_key(name: str) -> str:
    """The batch key of a flat name (inverse of flat_name)."""
    return name.replace("__", "/")


@dataclass
class FeatureSpec:
    behaviors: list[str]  # history fields, in the order their embeddings are concatenated into e_t
    target: list[str]
    profile: list[str]
    context: list[str]
    dense: list[str]
    match_field: str  # the field V' is indexed by (and the auxiliary task predicts)
    use_user_id: bool
    tables: dict[str, list[str]] = field(default_factory=dict)  # table name -> batch keys that use it
    dense_mean: dict[str, float] = field(default_factory=dict)
    dense_std: dict[str, float] = field(default_factory=dict)

    def table_of(self) -> dict[str, str]:
        return {key: table for table, keys in self.tables.items() for key in keys}

    def batch_keys(self) -> list[str]:
        """Example columns the model reads from a file (histories come through `behaviors`)."""
        keys = [f"target/{f}" for f in self.target] + [f"profile/{f}" for f in self.profile]
        return keys + [f"context/{f}" for f in self.context] + [f"dense/{f}" for f in self.dense] + ["user"]

    def profile_keys(self) -> list[str]:
        """Batch keys of x_p. The user id is encoded per batch into "user_index", so "user" stays raw."""
        return [f"profile/{f}" for f in self.profile] + ["user_index"] * self.use_user_id

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> FeatureSpec:
        return cls(**d)


def declare(fields, match_field: str, use_user_id: bool) -> FeatureSpec:
    """The default declaration for a data file's fields: same-named behaviour/target fields share a table."""
    if match_field not in fields.behaviors or match_field not in fields.target:
        raise DmrxError(
            f"match field {match_field!r} must be both a behaviour and a target field; behaviour "
            f"fields are {list(fields.behaviors)}, target fields {list(fields.target)} "
            f"(use match_field = 'cate' for data whose behaviours carry no item id)"
        )
    tables: dict[str, list[str]] = {}
    for f in fields.behaviors:
        tables.setdefault(f, []).append(f"hist/{f}")
    for f in fields.target:
        tables.setdefault(f, []).append(f"target/{f}")
    for group in ("profile", "context"):
        for f in getattr(fields, group):
            tables[f"{group}_{f}"] = [f"{group}/{f}"]
    if use_user_id:
        tables["user"] = ["user_index"]
    return FeatureSpec(
        behaviors=list(fields.behaviors),
        target=list(fields.target),
        profile=list(fields.profile),
        context=list(fields.context),
        dense=list(fields.dense),
        match_field=match_field,
        use_user_id=use_user_id,
        tables=tables,
    )


def fit(
    spec: FeatureSpec, data: DataFile, min_count: int = 1, chunk_rows: int = 1 << 20
) -> tuple[dict[str, Vocab], np.ndarray]:
    """Vocabularies of every table from the training file (streamed), dense-field statistics (stored in
    the spec), and the counts of the match field over the behaviours (the negative sampler's distribution,
    indexed like the match table)."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    counts: dict[str, tuple[np.ndarray, np.ndarray]] = {t: empty for t in spec.tables}
    table_of = spec.table_of()

    def add(table: str, values: np.ndarray) -> None:
        uniq, cnt = np.unique(values, return_counts=True)
        ids = np.concatenate([counts[table][0], uniq])
        merged, inverse = np.unique(ids, return_inverse=True)
        counts[table] = merged, np.bincount(inverse, np.concatenate([counts[table][1], cnt])).astype(np.int64)

    dense_sum = {f: 0.0 for f in spec.dense}
    dense_sq = {f: 0.0 for f in spec.dense}
    for start in range(0, data.n_rows, chunk_rows):
        cols = data.read_columns(start, min(start + chunk_rows, data.n_rows), spec.batch_keys())
        if spec.use_user_id:
            cols["user_index"] = cols["user"]
        for key, values in cols.items():
            if key == "user":
                continue
            if key.startswith("dense/"):
                dense_sum[key[6:]] += float(values.sum(dtype=np.float64))
                dense_sq[key[6:]] += float(np.square(values, dtype=np.float64).sum())
            else:
                add(table_of[key], values)
    match_raw = []
    for f in spec.behaviors:
        for start in range(0, data.n_behaviors, chunk_rows):
            values = data._read(f"behaviors/{f}", slice(start, start + chunk_rows)).astype(np.int64)
            add(table_of[f"hist/{f}"], values)
            if f == spec.match_field:
                match_raw.append(np.unique(values, return_counts=True))
    vocabs = {t: Vocab(ids[cnt >= min_count]) for t, (ids, cnt) in counts.items()}
    n = max(data.n_rows, 1)
    for f in spec.dense:
        mean = dense_sum[f] / n
        spec.dense_mean[f] = mean
        spec.dense_std[f] = max(float(np.sqrt(max(dense_sq[f] / n - mean * mean, 0.0))), 1e-6)
    match_vocab = vocabs[table_of[f"hist/{spec.match_field}"]]
    sampler = np.zeros(len(match_vocab), np.float64)
    for uniq, cnt in match_raw:
        np.add.at(sampler, match_vocab.encode(uniq), cnt)
    sampler[0] = 0.0  # never sample padding / unknown
    return vocabs, sampler


class Encoder:
    """Raw ids -> table indices for the reader's per-chunk hook; dense fields are standardised."""

    def __init__(self, spec: FeatureSpec, vocabs: dict[str, Vocab]):
        self.spec = spec
        self.vocabs = vocabs
        self.table_of = spec.table_of()

    def __call__(self, key: str, values: np.ndarray) -> np.ndarray:
        table = self.table_of.get(key)
        return self.vocabs[table].encode(values) if table is not None else values

    def finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-batch steps after the reader's per-chunk encoding: the user-id index, standardised dense."""
        if self.spec.use_user_id:
            batch["user_index"] = self.vocabs["user"].encode(batch["user"])
        for f in self.spec.dense:
            key = f"dense/{f}"
            batch[key] = ((batch[key] - self.spec.dense_mean[f]) / self.spec.dense_std[f]).astype(np.float32)
        return batch

    def check_file(self, data: DataFile) -> None:
        """The file must carry every field the model reads."""
        have = set(data.fields.example_keys()) | {f"hist/{f}" for f in data.fields.behaviors}
        need = set(self.spec.batch_keys()) | {f"hist/{f}" for f in self.spec.behaviors}
        missing = sorted(need - have)
        if missing:
            where = ", ".join(
                m.replace("hist/", "behaviors/") if m.startswith("hist/") else f"examples/{m}" for m in missing
            )
            raise DmrxError(f"{data.path}: lacks {where}, which the model was trained with")

    def unknown_counts(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        """Per field, how many ids in this (encoded) batch mapped to the unknown index."""
        out = {}
        for key in self.spec.batch_keys() + ["user_index"] * self.spec.use_user_id:
            if key in self.table_of:
                out[key] = int((batch[key] == 0).sum())
        return out
