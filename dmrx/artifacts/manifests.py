"""Manifests: what makes a directory of files one verifiable artifact.

Every artifact directory dmrx writes (a run, a training checkpoint, an export, a retrieval index) holds a
`manifest.json`, written last, with

    {"format": "<kind>", "version": N, "files": {"<relative path>": "<sha256>", ...}, ...kind-specific fields}

Paths are relative to the directory, so an artifact can be moved or copied anywhere. Loading checks the
format and version and every listed file's hash, and names the file at fault in a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from dmrx.artifacts.atomic import write_json
from dmrx.errors import DmrxError

MANIFEST = "manifest.json"


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(root: str | os.PathLike, kind: str, version: int, files: Iterable[str], **fields) -> dict:
    """Hash `files` (paths relative to root) and write root/manifest.json last; return the manifest."""
    root = Path(root)
    manifest = {
        **fields,
        "format": kind,
        "version": version,
        "files": {name: sha256(root / name) for name in sorted(files)},
    }
    write_json(root / MANIFEST, manifest)
    return manifest


def read(root: str | os.PathLike, kind: str, versions: Iterable[int], missing: str = "") -> dict:
    """root/manifest.json after checking its format and version (not the files: see `verify`).

    missing: what to tell the user when there is no manifest (how to make one).
    """
    root = Path(root)
    path = root / MANIFEST
    noun = kind.removeprefix("dmrx-")
    if not root.is_dir():
        raise DmrxError(f"{root}: no such {noun} directory")
    if not path.is_file():
        raise DmrxError(f"{root}: not a complete {noun}, {MANIFEST} is missing{missing}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DmrxError(f"{path}: damaged {noun} manifest (not valid JSON)") from None
    except OSError as e:
        raise DmrxError(f"{path}: unreadable ({e.strerror or e.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DmrxError(f"{path}: not a dmrx {noun} manifest (format {found!r})")
    versions = tuple(versions)
    if manifest.get("version") not in versions:
        raise DmrxError(
            f"{path}: {noun} format version {manifest.get('version')!r} is not supported (this dmrx "
            f"reads version {', '.join(map(str, versions))}){missing}"
        )
    if not isinstance(manifest.setdefault("files", {}), dict):
        raise DmrxError(f"{path}: damaged manifest ('files' is not a table)")
    return manifest


def check_file(root: str | os.PathLike, manifest: dict, name: str, hint: str = "") -> Path:
    """root/name, after checking it is listed in the manifest and its hash matches."""
    root = Path(root)
    path = root / name
    digest = manifest["files"].get(name)
    if digest is None:
        raise DmrxError(f"{root / MANIFEST}: lists no {name}{hint}")
    if not path.is_file():
        raise DmrxError(
            f"{path}: missing from the {manifest['format'].removeprefix('dmrx-')} (listed in {MANIFEST}){hint}"
        )
    if sha256(path) != digest:
        raise DmrxError(f"{path}: damaged, its sha256 does not match {MANIFEST}{hint}")
    return path


def verify(root: str | os.PathLike, kind: str, versions: Iterable[int], missing: str = "", hint: str = "") -> dict:
    """The manifest, after checking its format, version and every listed file's hash."""
    manifest = read(root, kind, versions, missing)
    for name in manifest["files"]:
        check_file(root, manifest, name, hint)
    return manifest
