"""The benchmark scripts' own logic that runs without a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import ROOT


def _throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_trace_summary_measures_gpu_idle_gaps_and_names_the_host_work(tmp_path):
    events = [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 5, "dur": 10},  # overlaps a: busy 0-15
        {"ph": "X", "cat": "gpu_memcpy", "name": "c", "ts": 115, "dur": 5},  # a 100 us gap before it
        {"ph": "X", "cat": "kernel", "name": "d", "ts": 125, "dur": 75},  # a 5 us gap before it
        {"ph": "X", "cat": "python_function", "name": "outer", "ts": 0, "dur": 200},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 14, "dur": 100},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = _throughput().trace_summary(path, top=2)
    assert summary["span_ms"] == 0.2 and summary["gaps"] == 2
    assert summary["gpu_busy"] == (15 + 5 + 75) / 200
    assert summary["idle_fraction_in_gaps"] == {">10us": 0.5, ">100us": 0.0, ">1000us": 0.0}
    worst = summary["worst_gaps"][0]
    assert worst["gap_us"] == 100 and worst["host"] == ["aten::item", "outer"]  # innermost first


def test_trace_summary_without_gpu_events_says_so(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]))
    assert _throughput().trace_summary(path) == {"error": "no GPU events in the trace"}
