"""The prompt runner executes the same graph in process and through a real `main.py --cpu` server."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from harness import graphs
from harness.graphs import out
from harness.runner import ServerRunner


def _graph():
    prompt, ids = graphs.wan_t2v(width=32, height=32, length=5, steps=2)
    save = str(len(prompt) + 1)
    prompt[save] = {"class_type": "SaveImage", "inputs": {"images": out(ids["decode"]), "filename_prefix": "runner_modes"}}
    return prompt, save


def _images(ui: dict, save: str, output_dir) -> list[np.ndarray]:
    return [np.asarray(Image.open(output_dir / img.get("subfolder", "") / img["filename"])) for img in ui[save]["images"]]


@pytest.mark.slow
def test_same_graph_in_process_and_through_server(runner, models_dir, tmp_path):
    import folder_paths

    prompt, save = _graph()
    local = runner.run(prompt)
    local_images = _images(local.ui, save, __import__("pathlib").Path(folder_paths.get_output_directory()))
    with ServerRunner(models_dir, tmp_path / "server") as server:
        remote = server.run(prompt)
        remote_images = _images(remote.ui, save, tmp_path / "server" / "output")
        log = server.log()
        # The bundled workflows are discovered as templates (Workflow -> Browse Templates).
        import json
        import urllib.request

        templates = json.load(urllib.request.urlopen(f"{server.url}/workflow_templates", timeout=30))
        thumb = urllib.request.urlopen(f"{server.url}/api/workflow_templates/lightcache/lightcache_wan21_t2v_1.3B.jpg", timeout=30)
    assert "lightcache_wan21_t2v_1.3B" in templates.get("lightcache", [])
    assert thumb.status == 200
    assert "lightcache" in log.lower()
    custom_node_lines = log.split("Import times for custom nodes")[-1].splitlines()
    assert not [line for line in custom_node_lines if "lightcache" in line and "IMPORT FAILED" in line]
    assert len(local_images) == len(remote_images) == 5
    for a, b in zip(local_images, remote_images):
        assert np.array_equal(a, b)
    assert set(remote.node_seconds) >= {k for k in prompt if prompt[k]["class_type"] in ("KSampler", "VAEDecode")}
