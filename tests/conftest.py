"""Shared pytest set-up: the real ComfyUI host, tiny fixtures and the prompt runner.

The host boots once per session, in process, through ComfyUI's own custom-node
loader (see harness/host.py); core unit tests under tests/core never touch it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from harness import host  # noqa: E402

MODELS_DIR = Path(os.environ.get("LIGHTCACHE_MODELS_DIR", host.CACHE / "models"))


def pytest_report_header(config):
    overlay = host.overlay_path()
    return [f"LightCache host: ComfyUI {host.host_name() if not os.environ.get('COMFYUI_PATH') else '(COMFYUI_PATH)'} "
            f"at {host.comfyui_path()}" + (f", packages overlay {overlay}" if overlay else "")]


@pytest.fixture(scope="session")
def comfy_host():
    """ComfyUI booted in this process with LightCache and the test pack loaded."""
    booted = host.boot(MODELS_DIR)
    from harness import fixtures

    fixtures.ensure_fixtures(MODELS_DIR)
    return booted


@pytest.fixture(scope="session")
def runner(comfy_host):
    """An in-process prompt runner (``execution.PromptExecutor``)."""
    from harness.runner import InProcessRunner

    return InProcessRunner(comfy_host)


@pytest.fixture(scope="session")
def models_dir(comfy_host) -> Path:
    return MODELS_DIR
