"""The fixed sets of names a user chooses from, each written once.

The library validates against the tuples; the CLI offers the Enums derived from them, so a bad choice is
refused by the command line parser before any work starts. This module imports nothing heavy: the CLI
builds its options from it without loading torch.
"""

from __future__ import annotations

import enum


class Choice(str, enum.Enum):
    """One name from a fixed set: equal to its str value, and printed as that value."""

    def __str__(self) -> str:
        return self.value


def choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    """A Choice Enum whose members are `values` (member name = value)."""
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


ARCHS = ("dmr", "lr", "widedeep", "pnn", "din", "dien")  # DMR and the baselines one trainer serves
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")  # scoring
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # scoring
ENCODER_BACKENDS = ("torch", "onnxruntime")  # the retrieval user encoder
SEARCH_METHODS = ("exact", "int8", "hnsw")
ANN_KINDS = ("none", "hnsw")
CALIB_METHODS = ("minmax", "entropy", "percentile")
ENGINES = ("tensorrt",)

Arch = choice("Arch", ARCHS)
Device = choice("Device", DEVICES)
Backend = choice("Backend", BACKENDS)
Precision = choice("Precision", PRECISIONS)
EncoderBackend = choice("EncoderBackend", ENCODER_BACKENDS)
SearchMethod = choice("SearchMethod", SEARCH_METHODS)
AnnKind = choice("AnnKind", ANN_KINDS)
CalibMethod = choice("CalibMethod", CALIB_METHODS)
Engine = choice("Engine", ENGINES)
