"""Core tests import ``lightcache_core`` through the harness's link folder
(the repository root cannot go on sys.path: its ``nodes/`` package would shadow
ComfyUI's ``nodes.py``). tests/conftest.py has already put tests/ on sys.path."""

from harness import corelink  # noqa: F401
