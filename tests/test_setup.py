"""tests/setup.sh on a Debian machine whose python3 is Debian's own: from a clean copy of
the tree, with only the system's directories on PATH (as on a fresh Debian 12, where that
python3 refuses `pip install` outside a virtual environment), it makes the tree's .venv,
installs lazyfs into it and links `lazyfs` onto PATH; run again, it has nothing to do."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists("/usr/bin/python3") and shutil.which("dpkg-query")
                            and shutil.which("git") and os.geteuid() == 0),
                       reason="needs root on Debian (dpkg-query, /usr/bin/python3) and git"),
]


def copy_tree(dest: Path) -> None:
    """The tree as a fresh clone of it would be, uncommitted changes included: the files git
    tracks or would track, none of what it ignores (.venv, stamps, generated stubs)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if not src.exists():  # deleted but not yet committed
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name, follow_symlinks=False)


def setup(tree: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # without the test extras (pytest, mypy, matplotlib, ...): the package and what it runs on
    return subprocess.run(["bash", "tests/setup.sh", "--no-test-deps"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=240)


def test_setup_installs_into_a_venv_with_debians_python(tmp_path):
    tree, bin_dir = tmp_path / "tree", tmp_path / "bin"
    copy_tree(tree)
    env = {**os.environ, "PATH": SYSTEM_PATH, "LAZYFS_BIN_DIR": str(bin_dir)}
    env.pop("VIRTUAL_ENV", None)

    done = setup(tree, env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    cfg = (tree / ".venv" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in cfg, cfg

    link = bin_dir / "lazyfs"
    assert os.readlink(link) == str(tree / ".venv" / "bin" / "lazyfs")
    helped = subprocess.run(["lazyfs", "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, env={**env, "PATH": f"{bin_dir}:{SYSTEM_PATH}"})
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: lazyfs")
    # the command runs this copy's code, on the environment's python
    where = subprocess.run([str(tree / ".venv" / "bin" / "python"), "-c",
                            "import lazyfs, pyfuse3; print(lazyfs.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert where.stdout.strip() == str(tree / "lazyfs" / "__init__.py"), where.stderr

    again = setup(tree, env)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
