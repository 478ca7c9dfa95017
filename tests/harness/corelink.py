"""Make ``import lightcache_core`` work for tests, the demo and the benchmarks.

The repository root cannot go on ``sys.path``: its ``nodes/`` package would
shadow ComfyUI's ``nodes.py``. Instead a folder under ``.cache/pypath`` holds a
link to ``lightcache_core`` alone. Importing this module sets that up.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPATH = REPO / ".cache" / "pypath"


def ensure() -> Path:
    PYPATH.mkdir(parents=True, exist_ok=True)
    link = PYPATH / "lightcache_core"
    if not link.is_symlink():
        if link.exists():
            link.unlink()
        link.symlink_to(REPO / "lightcache_core", target_is_directory=True)
    if str(PYPATH) not in sys.path:
        sys.path.insert(0, str(PYPATH))
    return PYPATH


ensure()
