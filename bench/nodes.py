"""Scenario 6: many nodes. Other benchmarks of the project (peers, registries, the
snapshotter, a soak run) live in their own modules of ``bench/``, each exposing

    run(quick: bool, outdir: pathlib.Path) -> dict

The suite calls every one of them that exists on this commit, by name, and reports the
others as "not present", so a module joins the suite the moment it is merged.
"""

from __future__ import annotations

import importlib
import importlib.util
import traceback
from pathlib import Path
from typing import Any

from bench.harness import log

MODULES = ("peers_bench", "registry_bench", "snapshotter_bench", "soak")


def run_all(quick: bool, outdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in MODULES:
        if importlib.util.find_spec(f"bench.{name}") is None:
            out[name] = {"status": f"not present: bench/{name}.py is not on this commit"}
            continue
        log(f"nodes: bench/{name}.py")
        sub = outdir / name
        sub.mkdir(parents=True, exist_ok=True)
        try:
            module = importlib.import_module(f"bench.{name}")
            out[name] = {"status": "ok", "result": module.run(quick=quick, outdir=sub)}
        except Exception as exc:  # noqa: BLE001 (a module's failure is reported, the suite goes on)
            traceback.print_exc()
            out[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
    return out
