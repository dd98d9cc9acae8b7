"""The code is held to ruff's rules (pyproject.toml's [tool.ruff]), including the ASYNC
rules that flag blocking calls inside ``async def``."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import ROOT


@pytest.mark.skipif(not shutil.which("ruff"), reason="needs ruff (pip install -e '.[test]')")
def test_ruff_finds_nothing():
    done = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
