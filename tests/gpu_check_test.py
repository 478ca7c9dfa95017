"""CI runs ``make gpu-check DRY=1``: the GPU check script, at tiny size on the CPU, end to end."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_gpu_check_dry_run(comfy_host, tmp_path):
    import gpu_check

    rc = gpu_check.main(["--dry", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().startswith("## make gpu-check DRY=1")
    rows = payload["rows"]
    errors = [(r["config"], r.get("error") or r.get("trace_error")) for r in rows if "error" in r or "trace_error" in r]
    assert rc == 0 and not errors, errors
    by_phase = {}
    for r in rows:
        by_phase.setdefault(r["phase"], []).append(r)
    assert [r["config"] for r in by_phase["sampler"]] == gpu_check.SAMPLER_CONFIGS
    assert len(by_phase["block"]) == 1 and [r["config"] for r in by_phase["decode"]] == [
        "VAE Decode", "VAE Decode (Tiled)", "Sliced VAE Decode"]
    for r in by_phase["sampler"] + by_phase["block"]:
        # every measured peak sits next to memplan's trace of the same configuration, and they agree
        assert r["peak_above_start_bytes"] > 0 and r["traced_peak_above_start_bytes"] > 0
        assert 0.8 <= r["measured_vs_traced_above_start"] <= 1.25, r
    lightcache = [r for r in by_phase["sampler"] if r["config"].startswith("LightCache")]
    assert all(r["store"]["stores"] >= 1 and r["store"]["puts"] > 0 for r in lightcache)
    assert by_phase["decode"][2]["max_abs_vs_vae_decode"] <= 1e-5  # Sliced VAE Decode is exact
    assert "skipped" in payload["cuda_tests"]["summary"]  # no GPU here: the CUDA tests skip
