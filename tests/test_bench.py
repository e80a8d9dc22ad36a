"""The benchmark scripts' own logic that runs without a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import ROOT


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _throughput():
    return _bench("throughput")


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


def test_strategy_scaling_is_against_the_one_gpu_cell_of_the_same_shape():
    bench = _bench("strategies")
    cells = {c.name: c for c in bench.tune_cells()}

    def result(name: str, tokens: float | None) -> dict:
        r = {"cell": bench.asdict(cells[name])}
        if tokens is not None:
            r["tokens_per_sec_per_device"] = tokens
        return r

    results = [result("1 GPU", 500.0), result("DDP x4", 450.0), result("FSDP2 x4", None),
               result("1 GPU 64x8", 560.0), result("DDP x4 64x8", 546.0)]
    bench.add_scaling(results)
    assert results[1]["scaling_efficiency"] == 450.0 / 500.0
    assert results[4]["scaling_efficiency"] == 546.0 / 560.0  # not against the batch-32 reference
    assert "scaling_efficiency" not in results[2]  # failed cells get none
    only_accumulated = [result("DDP x4", 450.0), result("1 GPU 64x8", 560.0)]
    bench.add_scaling(only_accumulated)
    assert "scaling_efficiency" not in only_accumulated[0]  # no reference of its shape


def test_strategy_cell_command_carries_its_accumulation_and_strategy(tmp_path):
    bench = _bench("strategies")
    cell = next(c for c in bench.tune_cells() if c.name == "DDP x4 64x8")
    args = bench.argparse.Namespace(source="corpus.txt", tokenizer="gpt2_dir")
    cmd = bench.command(cell, args, tmp_path / "cell")
    assert cmd[1:3] == ["-m", "lit_llm.train"]
    assert "--trainer.accumulate_grad_batches=8" in cmd and "--data.init_args.batch_size=64" in cmd
    assert "--trainer.strategy=lit_ddp" in cmd and "--trainer.devices=4" in cmd
    assert "lit_llm.callbacks.Throughput" in (tmp_path / "cell" / "callbacks.yaml").read_text()


def test_trainer_config_copy_sets_the_throughput_window(tmp_path):
    bench = _throughput()
    out = bench.config_with_window(ROOT / "configs/pretrain/gpt2-124m.yaml", 7, tmp_path / "run" / "config.yaml")
    import yaml

    data = yaml.safe_load(out.read_text())
    windows = [c["init_args"]["window"] for c in data["trainer"]["callbacks"]
               if c["class_path"] == "lit_llm.callbacks.Throughput"]
    assert windows == [7]
    original = yaml.safe_load((ROOT / "configs/pretrain/gpt2-124m.yaml").read_text())
    assert len(data["trainer"]["callbacks"]) == len(original["trainer"]["callbacks"])  # nothing else changed
    assert data["model"] == original["model"] and data["data"] == original["data"]
    bare = tmp_path / "bare.yaml"
    bare.write_text("trainer:\n  max_steps: 3\n")
    added = yaml.safe_load(bench.config_with_window(bare, 4, tmp_path / "bare_out.yaml").read_text())
    assert added["trainer"]["callbacks"] == [{"class_path": "lit_llm.callbacks.Throughput", "init_args": {"window": 4}}]
