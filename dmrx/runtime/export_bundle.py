"""The export directory (`dmrx export`'s output): everything inference needs, verified, without the run.

    EXPORT/
      manifest.json          format "dmrx-export", version, "files" {relative path: sha256}, "artifacts"
                             {relative path: graph, precision, io, ...}, "source" {weights_sha256, ...},
                             "input_names" {batch key: graph input name}, "precisions", gates, quality
      model.json             the settings inference needs: max_len, match_field, which networks exist,
                             the rows of every embedding table
      schema.json            the feature spec: fields, which table each reads, dense standardisation
      vocab.safetensors      per table "vocab.<table>": the sorted raw ids (raw id ids[i] is index i + 1)
      *.onnx, engines/       the graphs and TensorRT plans
      v_out.safetensors      V' and the match field's raw ids

Every path is relative to the directory, so it can be copied anywhere; loading checks every file's hash.
docs/export.md spells out the contract a program in any language follows to use it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import load_file, save_file

from dmrx.artifacts import manifests
from dmrx.artifacts.atomic import write_json
from dmrx.data.features import Encoder, FeatureSpec
from dmrx.data.vocab import Vocab
from dmrx.errors import DmrxError

FORMAT = "dmrx-export"
VERSION = 3  # 3: the candidate_scorer takes candidates in slots (dmrx.runtime.graphs); 2: one per user_row
READS = (2, 3)
SPLIT_GRAPHS = ("user_encoder", "candidate_scorer")
INFERENCE_FILES = {
    "model.json": "the model's inference settings",
    "schema.json": "the feature spec",
    "vocab.safetensors": "per table, the sorted raw ids (raw id ids[i] is index i + 1; unknown is 0)",
}


def model_settings(model) -> dict:
    """What inference needs to know of a DMR model besides its graphs."""
    cfg = model.cfg
    return {
        "arch": cfg.model,
        "max_len": int(cfg.max_len),
        "match_field": cfg.match_field,
        "use_u2i": bool(cfg.use_u2i),
        "use_i2i": bool(cfg.use_i2i),
        "table_rows": {t: int(e.num_embeddings) for t, e in model.tables.items()},
    }


def write_inference_files(root: Path, spec: FeatureSpec, vocabs: dict[str, Vocab], settings: dict) -> None:
    write_json(root / "model.json", settings)
    write_json(root / "schema.json", spec.to_json())
    save_file({f"vocab.{t}": v.ids for t, v in vocabs.items()}, str(root / "vocab.safetensors"))


def is_export(path: str | os.PathLike) -> bool:
    """Whether path is a directory whose manifest says it is an export (not checked further)."""
    try:
        return manifests.read(path, FORMAT, READS) is not None
    except DmrxError:
        return False


def read(path: str | os.PathLike) -> dict:
    """The export's manifest, format and version checked; files are checked as they are used (check_file)."""
    return manifests.read(path, FORMAT, READS, missing=" (make one with `dmrx export`)")


def check_file(path: str | os.PathLike, manifest: dict, name: str) -> Path:
    """EXPORT/name after checking its hash against the manifest."""
    return manifests.check_file(path, manifest, name, hint="; export the run again")


def graph_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def engine_name(graph: str, precision: str) -> str:
    return f"engines/{graph}.{precision}.plan"


@dataclass
class ExportBundle:
    """A loaded export: what scoring and user encoding need, in the same terms as a run's Bundle."""

    path: Path
    manifest: dict
    settings: dict
    spec: FeatureSpec
    vocabs: dict[str, Vocab]

    @property
    def weights_hash(self) -> str:
        return self.manifest["source"]["weights_sha256"]

    @property
    def max_len(self) -> int:
        return int(self.settings["max_len"])

    @property
    def candidate_slots(self) -> bool:
        """Whether the candidate_scorer takes slots of g > 1 candidates per user_row entry."""
        return int(self.manifest["version"]) >= 3

    @property
    def use_u2i(self) -> bool:
        return bool(self.settings["use_u2i"])

    def encoder(self) -> Encoder:
        return Encoder(self.spec, self.vocabs)

    def split_graphs(self, precision: str) -> dict[str, Path] | None:
        """The user_encoder and candidate_scorer files at `precision` (verified at load), or None."""
        return self._files({g: graph_name(g, precision) for g in SPLIT_GRAPHS})

    def engines(self, precision: str) -> dict[str, Path] | None:
        """The TensorRT plans at `precision` (verified at load), or None."""
        return self._files({g: engine_name(g, precision) for g in SPLIT_GRAPHS})

    def _files(self, names: dict[str, str]) -> dict[str, Path] | None:
        if not all(n in self.manifest["files"] for n in names.values()):
            return None
        return {g: self.path / n for g, n in names.items()}


def load(path: str | os.PathLike) -> ExportBundle:
    """The export at path, every file's hash checked; its vocabularies checked against its graphs."""
    path = Path(path)
    manifest = manifests.verify(
        path, FORMAT, READS, missing=" (make one with `dmrx export`)", hint="; export the run again"
    )
    for name in INFERENCE_FILES:
        if name not in manifest["files"]:
            raise DmrxError(f"{path / manifests.MANIFEST}: lists no {name}; export the run again")
    try:
        settings = json.loads((path / "model.json").read_text())
        spec = FeatureSpec.from_json(json.loads((path / "schema.json").read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise DmrxError(f"{path}: damaged model.json or schema.json ({e.__class__.__name__})") from None
    try:
        tensors = load_file(str(path / "vocab.safetensors"))
        vocabs = {k[len("vocab.") :]: Vocab(v) for k, v in tensors.items() if k.startswith("vocab.")}
    except (OSError, ValueError) as e:
        raise DmrxError(f"{path / 'vocab.safetensors'}: unreadable ({str(e).splitlines()[0][:200]})") from None
    rows = settings.get("table_rows", {})
    for table in set(rows) | set(vocabs) | set(spec.tables):
        have = len(vocabs[table]) if table in vocabs else None
        if have != rows.get(table) or table not in spec.tables:
            raise DmrxError(
                f"{path / 'vocab.safetensors'}: table {table!r} has {have} rows, the graphs "
                f"{rows.get(table)} (the vocabularies do not belong to these graphs; export the run again)"
            )
    return ExportBundle(path, manifest, settings, spec, vocabs)
