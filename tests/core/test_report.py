"""Run and decode reports."""

import json
import math

from lightcache_core import CacheStats, DecodeReport, EvalRecord, RunReport, format_bytes


def make_report():
    report = RunReport(node="LightCacheMix", mode="mix", total_steps=4, schedule=[0, 2])
    for step in range(4):
        for branch in ("cond", "uncond"):
            if step in (0, 2):
                report.add(step, 10.0 - step, branch, "compute", "full", 0.5)
            elif branch == "cond":
                report.add(EvalRecord(step, 10.0 - step, branch, "reuse", "step"))
            else:
                report.add(step=step, sigma=10.0 - step, branch=branch, decision="reuse", granularity="cfg")
    return report


def test_counts_and_speedup():
    report = make_report()
    assert report.computed_count() == 4
    assert report.reused_count() == 4
    assert report.reused_by_granularity() == {"step": 2, "cfg": 2}
    # 8 evaluations cost 4*1.0 + 2*0.0 + 2*0.5 = 5.0
    assert math.isclose(report.estimated_speedup(), 8 / 5.0)


def test_timeline_codes():
    report = make_report()
    cells = report.timeline()
    assert len(cells) == 8
    assert cells[0] == {"step": 0, "branch": "cond", "g": "C"}
    assert [c["g"] for c in cells] == ["C", "C", "S", "G", "C", "C", "S", "G"]
    assert report.timeline_strings() == {"cond": "CSCS", "uncond": "CGCG"}
    block = RunReport("n", "deepcache", 2)
    block.add(0, 1.0, "batch", "reuse", "block")
    block.add(1, 0.5, "batch", "reuse", "deepcache")
    assert [c["g"] for c in block.timeline()] == ["B", "D"]


def test_text_and_json():
    report = make_report()
    stats = CacheStats(entries=2, host_bytes=12 * 2**20, peak_device_bytes=0).as_dict()
    report.cache_stats = stats
    report.notes.append("hello")
    text = report.to_text()
    first = text.splitlines()[0]
    assert first.startswith("LightCache mix: 4 steps, 8 evaluations; computed 4, reused 4")
    assert "est. speedup 1.60x" in first
    assert "cache: 2 entries, 12.0 MiB on host, peak 0 B on the compute device" in first
    assert "note: hello" in text and "CSCS" in text
    data = json.loads(report.to_json())
    assert data["computed"] == 4 and data["reused_by_granularity"] == {"step": 2, "cfg": 2}
    assert data["schedule"] == [0, 2] and len(data["records"]) == 8 and len(data["timeline"]) == 8


def test_edge_cases():
    empty = RunReport("n", "off", 0)
    assert empty.estimated_speedup() == 1.0
    assert empty.to_text().startswith("LightCache off: 0 steps, 0 evaluations")
    all_step = RunReport("n", "step", 1)
    all_step.add(0, 1.0, "cond", "reuse", "step")
    assert math.isinf(all_step.estimated_speedup())
    assert json.loads(all_step.to_json())["estimated_speedup"] is None


def test_decode_report_and_bytes():
    decode = DecodeReport(slices=4, frames_per_slice=8, peak_bytes=3 * 2**30 // 2, seconds=3.4, path="sliced")
    assert "4 slices x 8 frames" in decode.to_text() and "1.5 GiB" in decode.to_text()
    assert decode.to_dict()["notes"] == []
    assert format_bytes(0) == "0 B" and format_bytes(1536) == "1.5 KiB" and format_bytes(5 * 2**20) == "5.0 MiB"
