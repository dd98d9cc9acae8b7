"""The code is held to ruff's rules (pyproject.toml's [tool.ruff]), including the ASYNC
rules that flag blocking calls inside ``async def``, to mypy's type checks
(pyproject.toml's [tool.mypy]: the packages, less the generated gRPC stubs), and to the
order of the packages (pyproject.toml's [tool.importlinter], checked by import-linter)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.skipif(not shutil.which("ruff"), reason="needs ruff (pip install -e '.[test]')")
def test_ruff_finds_nothing():
    done = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="needs mypy (pip install -e '.[test]')")
@pytest.mark.timeout(700)  # its subprocess may take 600 s
def test_mypy_finds_nothing():
    # this interpreter's mypy, so that it sees the packages the tests run with; no cache
    # written into the tree
    done = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", "/dev/null"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(not shutil.which("lint-imports"), reason="needs import-linter (pip install -e '.[test]')")
def test_imports_keep_the_order_of_the_packages():
    # no cache written into the tree
    done = subprocess.run(["lint-imports", "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
