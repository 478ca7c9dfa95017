"""Wan 2.2 two-expert runs: the bundled workflow (KSamplerAdvanced x2, LightCache Model Patch on each expert)
on two DIFFERENT tiny Wan fixtures, through ComfyUI's executor.

High-noise expert: the random-weight tiny Wan (dim 256); low-noise expert: the trained tiny Wan. Each stage
must run its own cache (its own schedule, warm-up and last-step rules), nothing cached in one stage may be
read in the other, and the cached two-stage run must stay close to the uncached two-stage run.
"""
from __future__ import annotations

import sys

import pytest
import torch

from harness import fixtures, workflow

NAME = "lightcache_wan22_t2v_a14b_two_stage.json"
STEPS = 20


def _psnr(a, b):
    mse = float(((a.float() - b.float()) ** 2).mean())
    rng = float(b.max() - b.min())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(rng * rng / mse)).item()


def _dit_cache():
    return next(m for n, m in sys.modules.items() if n.endswith("nodes.dit_cache") and hasattr(m, "DitRun"))


def _prompt(mode: str):
    api = workflow.adapt_for_fixtures(workflow.ui_to_api(workflow.load(NAME)), "trained_wan_two_stage",
                                      steps=STEPS, width=128, height=128, length=17)
    patches = [k for k, v in api.items() if v["class_type"] == "LightCacheModelPatch"]
    for k in patches:
        api[k]["inputs"]["cache_mode"] = mode
    # the latent the second stage hands to the decoder; the decoder itself is not what this test measures
    for k in [k for k, v in api.items() if v["class_type"] in ("SlicedVAEDecode", "SaveAnimatedWEBP", "VAELoader")]:
        del api[k]
    stages = sorted((k for k, v in api.items() if v["class_type"] == "KSamplerAdvanced"), key=int)
    return api, stages


@pytest.fixture(scope="module")
def uncached(runner, models_dir):
    fixtures.ensure_fixtures(models_dir, which=(fixtures.WAN_T2V_LARGE,))
    api, stages = _prompt("off")
    return runner.run(api).output(stages[-1])["samples"]


def test_two_stage_run_caches_each_stage_on_its_own(runner, uncached, monkeypatch):
    dc = _dit_cache()
    runs, starts = [], []
    original_init, original_finish = dc.DitRun.__init__, dc.DitRun.finish

    def tracking_init(self, *args, **kwargs):
        # when a stage starts, every earlier stage's caches must already be gone
        starts.append([sum(len(s) for s in r.engine.stores.values()) for r in runs])
        original_init(self, *args, **kwargs)
        runs.append(self)

    monkeypatch.setattr(dc.DitRun, "__init__", tracking_init)
    api, stages = _prompt("auto")
    res = runner.run(api)
    cached = res.output(stages[-1])["samples"]
    assert len(runs) == 2, "one run per stage"
    assert starts[1] == [0], "the high-noise stage's cache was still alive when the low-noise stage started"
    half = STEPS // 2
    for run in runs:
        assert run.clock.total_steps == half  # the stage's own schedule
        report = run.report
        assert any("one stage" in n for n in report.notes), report.notes
        timeline = report.timeline_strings()["cond"]
        assert timeline.startswith("CCC") and timeline.endswith("C"), timeline  # warm-up and last step in-stage
    assert any(r.report.reused_count() > 0 for r in runs)
    for k in stages:
        assert any("LightCache" in t for t in res.progress_texts(k)), f"no report under stage {k}"
    psnr = _psnr(cached, uncached)
    print(f"two-stage cached vs uncached: {psnr:.2f} dB")
    assert psnr >= 30.0, [r.report.to_text() for r in runs]
