"""Make ``import lightcache_core`` work without putting the repo root on sys.path
(the root holds a ``nodes/`` package that would shadow ComfyUI's ``nodes.py``)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPATH = REPO / ".cache" / "pypath"


def _ensure_pypath() -> None:
    PYPATH.mkdir(parents=True, exist_ok=True)
    link = PYPATH / "lightcache_core"
    target = REPO / "lightcache_core"
    if not (link.is_symlink() and os.readlink(link) == str(target)):
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(target, target_is_directory=True)
        except FileExistsError:  # created concurrently by another process
            pass
    if str(PYPATH) not in sys.path:
        sys.path.insert(0, str(PYPATH))


_ensure_pypath()
