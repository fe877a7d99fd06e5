"""Shared test assets, created by the tests themselves: tiny synthetic data and a tiny trained run.

Test tiers: unit tests (the rest) run in seconds; `integration` tests (marked here, automatically: any test
that uses the tiny data, and so trains, exports or scores for real, and every CLI test) run whole
pipelines at toy size; `slow` ones (marked in their modules) run them at a size where quality means
something. `pytest -m "not slow"` is the default tier; `-m "not integration and not slow"` the unit tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Test models are tiny: one thread avoids the synchronisation overhead that dominates their steps.
    Restored after each test, since the CPU scoring backend sets its own thread count."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cpu_tier(request, monkeypatch):
    """Tests not marked `gpu` mean the CPU: on a machine with a GPU, device auto-selection would otherwise
    train and score on CUDA (bf16 autocast, no int8, no C kernel, no bitwise determinism) and change what
    they check. This is a fake at the CUDA boundary: torch is told no GPU is visible, in this process and in
    the processes tests start (CUDA_VISIBLE_DEVICES). The tests also name device="cpu" where it matters."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    yield


REPO = Path(__file__).resolve().parents[1]
CLI_MODULES = ("test_cli", "test_score_cli")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tiny_data" in item.fixturenames or item.module.__name__.split(".")[-1].startswith(CLI_MODULES):
            item.add_marker(pytest.mark.integration)


SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A dataset under ../shared/data, or skip the test when this checkout has none."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """train/valid/test/candidates.h5 from the synthetic generator at toy size (300 users)."""
    from dmrx.data.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("tiny_data")
    generate(
        out,
        SyntheticConfig(
            users=300,
            items=1000,
            cates=30,
            brands=100,
            mean_len=20,
            max_len=60,
            impressions_per_user=10,
            candidates_per_user=5,
            seed=7,
        ),
    )
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A complete run bundle trained for a few dozen steps on tiny_data (small model, fast)."""
    from dmrx.models.dmr import DMRConfig
    from dmrx.training.trainer import TrainConfig, train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(
        tiny_data / "train.h5",
        tiny_data / "valid.h5",
        run,
        # with the user id (off by default) so its encoding, scoring and export stay covered
        DMRConfig(embed_dim=8, attn_hidden=16, mlp=(32, 16), num_negatives=50, max_len=20, use_user_id=True),
        TrainConfig(epochs=1, batch_size=64, max_steps=30, log_every=10, device="cpu"),
    )
    return run


@pytest.fixture(scope="session")
def copied_export(tiny_run, tmp_path_factory) -> Path:
    """An FP32 + INT8 export of tiny_run, moved to a directory far from the run (which it must not need)."""
    from dmrx.export.pipeline import ExportOptions, export_run

    made = tmp_path_factory.mktemp("made") / "export"
    calib = tmp_path_factory.mktemp("calib")
    export_run(tiny_run, ExportOptions(out=made, int8=True, gate=False, timing=False, calib_rows=512, cache_dir=calib))
    far = tmp_path_factory.mktemp("edge-box") / "bundle"
    shutil.move(made, far)
    return far
