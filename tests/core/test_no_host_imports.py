"""lightcache_core must stay host-independent: no ComfyUI imports, only relative
imports inside the package, and only torch/einops/stdlib from outside."""

import ast
import subprocess
import sys
from pathlib import Path

from harness.corelink import PYPATH

HOST_MODULES = ("comfy", "nodes", "folder_paths", "comfy_api", "comfy_extras")
CORE = Path(__file__).resolve().parents[2] / "lightcache_core"


def test_importing_core_loads_no_host_module(tmp_path):
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(PYPATH)!r})\n"
        "import lightcache_core\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HOST_MODULES!r})\n"
        "assert not bad, bad\n"
        "print('ok', lightcache_core.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def test_static_imports_are_allowed():
    allowed_roots = set(sys.stdlib_module_names) | {"torch", "einops", "__future__"}
    files = sorted(CORE.glob("*.py"))
    assert files
    for path in files:
        for level, module in _imports(path):
            if level > 0:
                continue  # relative import inside the package
            root = module.split(".")[0]
            assert root not in HOST_MODULES, f"{path.name} imports host module {module}"
            assert root != "lightcache_core", f"{path.name} must use relative imports, found {module}"
            assert root in allowed_roots, f"{path.name} imports {module}; only torch/einops/stdlib allowed"


def test_text_grep_for_host_imports():
    for path in sorted(CORE.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                words = stripped.replace(",", " ").split()
                assert not any(w.split(".")[0] in HOST_MODULES for w in words[1:2]), f"{path.name}:{number}: {line}"
