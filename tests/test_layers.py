"""The architecture as a test: imports point down the layers, never up or sideways.

    cli                                   the Typer app
    export                                ONNX graphs, FP16/INT8, TensorRT engines, gates
    calibration                           INT8 calibration data and ranges
    integrations                          scoring and retrieval on Ray and Spark
    training | scoring | retrieval        the jobs (independent of each other)
    evaluation                            metrics, the inference loop over a file, the report
    models                                DMR, the baselines, the run bundle
    runtime                               loading and running an export bundle (no torch)
    data                                  the data format, features and vocabularies
    artifacts | (small shared modules)         atomic writes, manifests
    errors

The core (`dmrx/`) never imports `export`, `calibration` or `cli`, so inference needs none of them.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"dmrx": "dmrx", "cli": "dmrx.cli", "export": "dmrx.export", "calibration": "dmrx.calibration"}
LAYERS = [
    {"dmrx", "dmrx.__version__", "dmrx.errors"},
    {"dmrx.artifacts", "dmrx.progress", "dmrx.choices", "dmrx.options"},
    {"dmrx.data"},
    {"dmrx.runtime"},
    {"dmrx.models"},
    {"dmrx.evaluation"},
    {"dmrx.training", "dmrx.scoring", "dmrx.retrieval"},
    {"dmrx.integrations"},
    {"dmrx.calibration"},
    {"dmrx.export"},
    {"dmrx.cli"},
    {"dmrx.__main__"},  # `python -m dmrx`
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """The layer unit of a module: dmrx.scoring.files -> dmrx.scoring."""
    return ".".join(module.split(".")[:2])


def _imports():
    """(file, importing unit, imported module) for every dmrx import in the installed packages' sources."""
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            module = ".".join([package, *[p for p in rel.parts if p != "__init__"]])
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dmrx":
                    targets = [f"dmrx.{a.name}" for a in node.names] if node.module == "dmrx" else [node.module]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names if a.name.split(".")[0] == "dmrx"]
                else:
                    continue
                for target in targets:
                    yield path.relative_to(REPO), _unit(module), target


def test_every_unit_has_a_layer():
    units = {u for _, u, _ in _imports()} | {_unit(t) for _, _, t in _imports()}
    assert units <= set(LAYER), f"give these a layer in tests/test_layers.py: {sorted(units - set(LAYER))}"


def test_imports_point_down():
    wrong = []
    for path, src, target in _imports():
        dst = _unit(target)
        if dst != src and LAYER.get(dst, -1) >= LAYER.get(src, -1):
            wrong.append(f"{path}: {src} (layer {LAYER.get(src)}) imports {target} (layer {LAYER.get(dst)})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("upper", ["dmrx.export", "dmrx.calibration", "dmrx.cli"])
def test_core_never_imports(upper):
    core = [
        (p, t)
        for p, src, t in _imports()
        if str(p).startswith("dmrx/") and src != "dmrx.__main__" and _unit(t) == upper
    ]
    assert not core, core
