"""Reading an export directory (`dmrx export`'s output): its manifest, verified, and the files it lists.

    EXPORT/manifest.json   format "dmrx-export", version, "files" {relative path: sha256}, "artifacts"
                           {relative path: graph, precision, io, ...}, "source" {weights_sha256, ...},
                           "input_names" {batch key: graph input name}, "precisions", gates, quality

Paths in the manifest are relative to the export directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from dmrx.artifacts import manifests
from dmrx.errors import DmrxError

FORMAT = "dmrx-export"
VERSION = 2  # 2: hashes in the shared "files" table (version 1 kept them in each "artifacts" entry)
SPLIT_GRAPHS = ("user_encoder", "candidate_scorer")


def is_export(path: str | os.PathLike) -> bool:
    """Whether path is a directory whose manifest says it is an export (not checked further)."""
    try:
        return manifests.read(path, FORMAT, (1, VERSION)) is not None
    except DmrxError:
        return False


def read(path: str | os.PathLike) -> dict:
    """The export's manifest, format and version checked; files are checked as they are used (check_file)."""
    manifest = manifests.read(path, FORMAT, (1, VERSION), missing=" (make one with `dmrx export`)")
    if manifest["version"] == 1:
        manifest["files"] = {name: a["sha256"] for name, a in manifest.get("artifacts", {}).items() if "sha256" in a}
    return manifest


def check_file(path: str | os.PathLike, manifest: dict, name: str) -> Path:
    """EXPORT/name after checking its hash against the manifest."""
    return manifests.check_file(path, manifest, name, hint="; export the run again")


def graph_name(graph: str, precision: str) -> str:
    return f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"


def engine_name(graph: str, precision: str) -> str:
    return f"engines/{graph}.{precision}.plan"


def split_graphs(path: str | os.PathLike, manifest: dict, precision: str) -> dict[str, Path] | None:
    """The user_encoder and candidate_scorer files at `precision`, verified; None when the export has none."""
    names = {g: graph_name(g, precision) for g in SPLIT_GRAPHS}
    if not all(n in manifest["files"] for n in names.values()):
        return None
    return {g: check_file(path, manifest, n) for g, n in names.items()}


def engines(path: str | os.PathLike, manifest: dict, precision: str) -> dict[str, Path] | None:
    """The TensorRT plans at `precision`, verified; None when the export has none."""
    names = {g: engine_name(g, precision) for g in SPLIT_GRAPHS}
    if not all(n in manifest["files"] for n in names.values()):
        return None
    return {g: check_file(path, manifest, n) for g, n in names.items()}
