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
    target = REPO / "lightcache_core"
    if not (link.is_symlink() and link.resolve() == target.resolve()):
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(target, target_is_directory=True)
        except FileExistsError:  # made at the same moment by a parallel process
            pass
    if str(PYPATH) not in sys.path:
        sys.path.insert(0, str(PYPATH))
    return PYPATH


ensure()
