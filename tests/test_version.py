"""One version source: dmrx.__version__, which the package metadata and `dmrx --version` both read."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import dmrx
from dmrx.cli.app import app


def test_dmrx_version_option_prints_the_package_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"dmrx {dmrx.__version__}"


def test_the_package_metadata_takes_its_version_from_dmrx():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dmrx.__version__"}
