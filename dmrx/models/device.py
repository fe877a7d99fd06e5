"""Which torch device a model trains or scores on: one rule for every command."""

from __future__ import annotations

import torch

from dmrx.errors import DmrxError


def pick_device(device: str | None) -> torch.device:
    """auto (or None): CUDA when torch sees a GPU, else the CPU. A named CUDA device that torch cannot see is
    an error, never a silent fall back to the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DmrxError(f"--device {device}: no CUDA device is visible to torch")
    return torch.device(device)
