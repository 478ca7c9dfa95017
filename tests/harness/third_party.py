"""Third-party node packs that tests load beside LightCache, the way a user has them.

The packs come as tarballs from ``../shared/third_party/`` (see its README). Each is
unpacked once into ``.cache/third_party/<pack>/`` (git-ignored; never committed) and
linked into the ``custom_nodes`` folder that :func:`host.custom_nodes_dir` builds, so
ComfyUI's own loader imports it next to this pack. A pack whose tarball is absent is
simply not linked; tests that need it skip with :func:`skip_reason`'s one line.

With ComfyUI-AnimateDiff-Evolved comes ``lightcache_testing_ade``
(``tests/harness/ade_testing_pack``), a test-only companion that loads our tiny motion
modules through AnimateDiff-Evolved's own classes (see that pack for why).
"""
from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LIGHTCACHE_SHARED", REPO.parent / "shared"))
SOURCE_DIR = SHARED / "third_party"
UNPACKED = REPO / ".cache" / "third_party"

ADE = "ComfyUI-AnimateDiff-Evolved"
ADE_COMPANION = "lightcache_testing_ade"
ADE_COMPANION_SRC = REPO / "tests" / "harness" / "ade_testing_pack"
TARBALLS = {ADE: "ComfyUI-AnimateDiff-Evolved-d8d163c.tar.gz"}
COMPANIONS = {ADE: {ADE_COMPANION: ADE_COMPANION_SRC}}


def tarball(pack: str) -> Path:
    return SOURCE_DIR / TARBALLS[pack]


def skip_reason(pack: str) -> str | None:
    """One line saying why ``pack`` cannot be loaded here, or None when it can."""
    if tarball(pack).is_file() or (UNPACKED / pack / "__init__.py").is_file():
        return None
    return f"{pack} is not on this machine ({tarball(pack)} is absent)"


def unpack(pack: str) -> Path | None:
    """``.cache/third_party/<pack>`` holding the unpacked pack, or None when its tarball is absent.

    Idempotent: an existing unpack is reused; a new one is staged and renamed last,
    so an interrupted unpack is never mistaken for a pack.
    """
    target = UNPACKED / pack
    if (target / "__init__.py").is_file():
        return target
    source = tarball(pack)
    if not source.is_file():
        return None
    staging = UNPACKED / f".staging-{pack}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(source) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, filter="data")
            else:  # Python < 3.11.4: no extraction filters
                tar.extractall(staging)
        roots = [p for p in staging.iterdir() if p.is_dir()]
        root = next((p for p in roots if (p / "__init__.py").is_file()), None)
        if root is None:
            raise RuntimeError(f"{source} holds no node pack folder (no __init__.py at its top level)")
        try:
            root.rename(target)
        except OSError:  # another process finished first
            if not (target / "__init__.py").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def custom_node_links(custom_nodes: Path | None = None) -> dict[str, Path]:
    """``{folder name in custom_nodes: target}`` for every third-party pack present here (and its companions).

    Links left in ``custom_nodes`` by an earlier run for a pack that is no longer here are removed, so
    ComfyUI never tries to import a dangling link.
    """
    links: dict[str, Path] = {}
    for pack in TARBALLS:
        folder = unpack(pack)
        names = {pack: folder, **COMPANIONS.get(pack, {})}
        if folder is not None:
            links.update(names)
        elif custom_nodes is not None:
            for name in names:
                if (custom_nodes / name).is_symlink():
                    (custom_nodes / name).unlink()
    return links
