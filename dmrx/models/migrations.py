"""Saved run configs from older dmrx versions, brought to the current layout.

A run's config.json records `config_version`. `migrate` applies the numbered steps from the run's version
to CONFIG_VERSION in order; each step makes the config say what the run was trained with, where the
current code would otherwise build a different model (a new option's default, a changed meaning).
Add a step, and raise CONFIG_VERSION, whenever the code stops building a saved config's model as before.
"""

from __future__ import annotations

import copy

from dmrx.errors import DmrxError

CONFIG_VERSION = 3


def _v1_to_v2(saved: dict) -> None:
    # Version 1 (no config_version recorded) may predate these options; a run without them was trained
    # without the MLP-input product and batch norm, and with its embedding tables at the dense lr.
    saved["model"].setdefault("target_product", False)
    saved["model"].setdefault("mlp_batchnorm", False)
    saved.setdefault("train", {}).setdefault("sparse_lr", 0.0)


def _v2_to_v3(saved: dict) -> None:
    # The DIN scorer (DMR's attention "din", the DIN baseline) was an 80-40 MLP whatever attn_hidden said;
    # it now follows attn_hidden.
    model = saved["model"]
    if "din" in (model.get("model", "dmr"), model.get("attention", "additive")):
        model["attn_hidden"] = 80


STEPS = {1: _v1_to_v2, 2: _v2_to_v3}  # STEPS[v] takes a version-v config to version v + 1


def migrate(saved: dict) -> dict:
    """A run's saved config.json contents at CONFIG_VERSION (a new dict; `saved` is left as it is)."""
    out = copy.deepcopy(saved)
    version = out.get("config_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DmrxError(f"config_version {version!r} is not a version number")
    if version > CONFIG_VERSION:
        raise DmrxError(
            f"config_version {version} is newer than this dmrx reads ({CONFIG_VERSION}): upgrade dmrx to load this run"
        )
    if "model" not in out:
        raise DmrxError("the saved config has no 'model' section")
    for v in range(version, CONFIG_VERSION):
        STEPS[v](out)
    out["config_version"] = CONFIG_VERSION
    return out
