"""lightcache_core must stay host-independent: no ComfyUI imports, only relative
imports inside the package, and only torch/einops/stdlib from outside. The diffusers
adapter (the ``diffusers_adapter`` package) may import diffusers, but only inside functions
(when a cache is applied): importing the core, adapter included, loads neither ComfyUI nor diffusers.
The static checks walk every file under ``lightcache_core``, subpackages included."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from harness.corelink import PYPATH

HOST_MODULES = ("comfy", "nodes", "folder_paths", "comfy_api", "comfy_extras")
OPTIONAL_MODULES = ("diffusers", "transformers")  # the [diffusers] extra; lazily, inside functions only
LAZY_IMPORTERS = {"diffusers_adapter": {"diffusers"}}  # folder under the core -> what its files may import inside a function
CORE = Path(__file__).resolve().parents[2] / "lightcache_core"


def _core_files() -> list[Path]:
    """Every Python file of the core, subpackages included."""
    return sorted(CORE.rglob("*.py"))


def _lazy_allowed(path: Path) -> set[str]:
    """What ``path`` may import inside a function: the union over the folders it lies in."""
    parts = path.relative_to(CORE).parts[:-1]
    return set().union(*(LAZY_IMPORTERS.get(part, set()) for part in parts))


def _import_and_list(tmp_path, module: str, roots: tuple) -> subprocess.CompletedProcess:
    """Import ``module`` in a fresh interpreter (``tmp_path`` and the core's link folder on its path) and fail
    if any module under ``roots`` got loaded."""
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(PYPATH)!r}]\n"
        f"import {module}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {roots!r})\n"
        "assert not bad, bad\n"
        f"print('ok', {module}.__file__)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_importing_core_loads_no_host_module(tmp_path):
    result = _import_and_list(tmp_path, "lightcache_core", HOST_MODULES + OPTIONAL_MODULES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_importing_the_diffusers_adapter_loads_neither_comfy_nor_diffusers(tmp_path):
    result = _import_and_list(tmp_path, "lightcache_core.diffusers_adapter", HOST_MODULES + OPTIONAL_MODULES)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_the_import_check_sees_an_eager_import(tmp_path):
    """Negative control: the same check fails for a module that does import diffusers when imported."""
    pytest.importorskip("diffusers", reason="diffusers not installed: nothing to import eagerly")
    (tmp_path / "eager_adapter.py").write_text("import diffusers.hooks\n")
    result = _import_and_list(tmp_path, "eager_adapter", OPTIONAL_MODULES)
    assert result.returncode != 0 and "'diffusers'" in result.stderr, result.stderr


def _imports(path):
    """(level, module, inside a function) of every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(inner) for inner in ast.walk(node) if inner is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, id(node) in nested
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", id(node) in nested


def test_static_imports_are_allowed():
    allowed_roots = set(sys.stdlib_module_names) | {"torch", "einops", "__future__"}
    files = _core_files()
    assert files and any(p.parent != CORE for p in files), "the walk must reach the subpackages"
    for path in files:
        name = path.relative_to(CORE).as_posix()
        lazy = _lazy_allowed(path)
        depth = len(path.relative_to(CORE).parts) - 1  # 0 for a top-level module
        for level, module, in_function in _imports(path):
            if level > 0:
                assert level <= depth + 1, f"{name}: a relative import (level {level}) leaves lightcache_core"
                continue  # relative import inside the package
            root = module.split(".")[0]
            assert root not in HOST_MODULES, f"{name} imports host module {module}"
            assert root != "lightcache_core", f"{name} must use relative imports, found {module}"
            if root in lazy:
                assert in_function, f"{name} imports {module} at module level; it must do so inside a function"
                continue
            assert root in allowed_roots, f"{name} imports {module}; only torch/einops/stdlib allowed"


def test_the_static_check_sees_a_module_level_diffusers_import():
    """Negative control for the rule above: a module-level import is found and flagged."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "diffusers_adapter.py"
        path.write_text("import torch\nfrom diffusers.hooks import ModelHook\n\ndef f():\n    import diffusers\n")
        found = list(_imports(path))
    assert (0, "diffusers.hooks", False) in found and (0, "diffusers", True) in found


def test_lazy_imports_are_allowed_in_the_whole_adapter_package_only():
    """Every file under ``diffusers_adapter/`` (the package, not one file) may import diffusers lazily; no other."""
    adapter = sorted((CORE / "diffusers_adapter").rglob("*.py"))
    assert adapter and all(_lazy_allowed(p) == {"diffusers"} for p in adapter)
    assert all(_lazy_allowed(p) == set() for p in _core_files() if p not in adapter)


def test_text_grep_for_host_imports():
    for path in _core_files():
        name = path.relative_to(CORE).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                words = stripped.replace(",", " ").split()
                assert not any(w.split(".")[0] in HOST_MODULES for w in words[1:2]), f"{name}:{number}: {line}"
