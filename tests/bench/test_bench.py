"""The benchmark scripts' own logic that runs without a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from support import ROOT


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


def test_kernel_breakdown_sorts_gpu_time_by_kind_of_work():
    events = [
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16_bf16f32", "ts": 0, "dur": 60},
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16bf16_bf16f32", "ts": 60, "dur": 40},
        {"ph": "X", "cat": "kernel", "name": "pytorch_flash::flash_fwd_kernel<...>", "ts": 100, "dur": 30},
        {"ph": "X", "cat": "kernel", "name": "triton_per_fused_add_native_layer_norm_3", "ts": 130, "dur": 20},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "ts": 150, "dur": 25},
        {"ph": "X", "cat": "kernel", "name": "void at::native::fused_adam_kernel", "ts": 175, "dur": 10},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 185, "dur": 5},
        {"ph": "X", "cat": "kernel", "name": "elementwise_kernel", "ts": 190, "dur": 10},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # host work is not GPU time
    ]
    out = _throughput().kernel_breakdown(events, top=2)
    assert out["kernel_ms"] == 0.2
    assert out["kernel_kinds"] == {
        "matmul": {"ms": 0.1, "share": 0.5}, "attention": {"ms": 0.03, "share": 0.15},
        "communication": {"ms": 0.025, "share": 0.125}, "compiled (triton)": {"ms": 0.02, "share": 0.1},
        "optimizer": {"ms": 0.01, "share": 0.05}, "other": {"ms": 0.01, "share": 0.05},
        "copies": {"ms": 0.005, "share": 0.025}}
    assert list(out["kernel_kinds"])[0] == "matmul"  # largest first
    assert out["top_kernels"] == [
        {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "kind": "matmul", "ms": 0.1, "calls": 2, "share": 0.5},
        {"name": "pytorch_flash::flash_fwd_kernel<...>", "kind": "attention", "ms": 0.03, "calls": 1, "share": 0.15}]


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


@pytest.mark.parametrize("accumulate", [1, 3])
def test_profile_window_records_the_chosen_optimizer_steps(tmp_path, accumulate):
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    window = _throughput().ProfileWindow(str(tmp_path / "profile"), start_step=3, steps=2, warmup=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=9, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[window],
                         default_root_dir=tmp_path, accumulate_grad_batches=accumulate)
    trainer.fit(BoringModel())
    events = json.loads((tmp_path / "profile" / "trace.json").read_text())["traceEvents"]
    steps = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("Optimizer.step#")]
    assert len(steps) == 2  # optimizer steps 5 and 6 only: 3 and 4 are the profiler's warm-up
    forwards = [e for e in events if e.get("ph") == "X" and "boring_classes.py" in str(e.get("name", ""))
                and str(e["name"]).endswith(": training_step")]  # BoringModel.training_step, from the Python stacks
    assert len(forwards) == 2 * accumulate  # every micro-batch of those two steps, none of the warm-up's
    summary = json.loads((tmp_path / "profile" / "trace_summary.json").read_text())
    assert summary == {"error": "no GPU events in the trace"}  # a CPU run: nothing ran on a GPU


def test_profiled_strategy_cell_profiles_after_its_timed_windows(tmp_path):
    bench = _bench("strategies")
    cell = next(c for c in bench.diagnose_cells() if c.name == "DDP x4 profiled")
    args = bench.argparse.Namespace(source="corpus.txt", tokenizer="gpt2_dir")
    cmd = bench.command(cell, args, tmp_path / "cell")
    timed = (1 + cell.windows) * cell.window
    assert f"--trainer.max_steps={timed + 2 + 2 + 1}" in cmd  # 2 steps of the profiler's warm-up, 2 recorded
    import yaml

    callbacks = yaml.safe_load((tmp_path / "cell" / "callbacks.yaml").read_text())["trainer"]["callbacks"]
    profile = next(c for c in callbacks if c["class_path"] == "bench.throughput.ProfileWindow")
    assert profile["init_args"] == {"folder": str(tmp_path / "cell" / "profile"), "start_step": timed, "steps": 2,
                                    "warmup": 2, "with_stack": True}
    # The sharded mode's profiles leave Python stacks out: they slow the host, which is what those cells measure.
    quiet = next(c for c in bench.sharded_cells(2) if c.name == "ZeRO-2 x2 profiled")
    bench.command(quiet, args, tmp_path / "quiet")
    quiet_callbacks = yaml.safe_load((tmp_path / "quiet" / "callbacks.yaml").read_text())["trainer"]["callbacks"]
    assert next(c for c in quiet_callbacks if "ProfileWindow" in c["class_path"])["init_args"]["with_stack"] is False
    plain = next(c for c in bench.diagnose_cells() if c.name == "DDP x4")
    assert f"--trainer.max_steps={timed}" in bench.command(plain, args, tmp_path / "plain")
    assert "ProfileWindow" not in (tmp_path / "plain" / "callbacks.yaml").read_text()


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


def test_gpu_pool_serves_cells_in_submission_order():
    """A cell waits for every cell submitted before it, so a reference run held alone is not joined by later cells,
    and a 4-GPU cell is not overtaken by the 1-GPU cells queued behind it."""
    import threading
    import time

    bench = _bench("strategies")
    pool = bench.GPUPool(4)
    started: list[tuple[str, list[int]]] = []
    lock = threading.Lock()

    def cell(name: str, k: int, ticket: int) -> None:
        gpus = pool.take(k, ticket)
        with lock:
            started.append((name, gpus))
        time.sleep(0.05)
        pool.give(gpus)

    jobs = [("reference, alone", 4), ("a", 1), ("b", 1), ("c", 1), ("d", 1), ("ddp", 4), ("e", 1)]
    threads = [threading.Thread(target=cell, args=(name, k, pool.ticket())) for name, k in jobs]
    for t in reversed(threads):  # started in reverse: the tickets, not the threads' order, decide
        t.start()
    for t in threads:
        t.join()
    assert [name for name, _ in started] == [name for name, _ in jobs]
    assert started[0][1] == [0, 1, 2, 3] and sorted(g for _, gs in started[1:5] for g in gs) == [0, 1, 2, 3]


def test_host_syncs_groups_the_waits_by_place_and_passes_other_warnings_on(tmp_path, capsys):
    import warnings

    syncs = _throughput().HostSyncs(str(tmp_path / "syncs"), start=0, steps=2)
    shown = []
    syncs._show = lambda *args: shown.append(str(args[0]))

    def wait_here():
        syncs._record(UserWarning("called a synchronizing CUDA operation"), UserWarning, "x.py", 1)

    for _ in range(3):
        wait_here()
    syncs._record(UserWarning("called a synchronizing CUDA operation"), UserWarning, "x.py", 1)  # another place
    syncs._record(UserWarning("Synchronization debug mode is a prototype feature"), UserWarning, "x.py", 1)
    assert shown == ["Synchronization debug mode is a prototype feature"]  # not a wait: shown as usual
    report = json.loads(syncs.write(rank=0).read_text())
    assert report["waits"] == 4 and [p["count"] for p in report["places"]] == [3, 1]
    assert any("wait_here" in frame for frame in report["places"][0]["stack"])
    assert "HOST SYNCS rank 0: 4 waits over 2 batches" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the CPU the callback stays out of the way
        syncs.on_train_batch_start(None, type("M", (), {"device": __import__("torch").device("cpu")})(), None, 0)
    assert syncs._show is not None and syncs._show.__name__ == "<lambda>"


def test_lightning_stop_check_puts_lightnings_own_broadcast_back(tmp_path):
    import pytorch_lightning as pl

    from lit_llm.callbacks.signals import StopAgreement

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    agreement = StopAgreement.install(trainer)
    loop = trainer.fit_loop.epoch_loop
    assert loop._broadcast_sigterm_tensor == agreement.check_at_batch_start
    _throughput().LightningStopCheck().on_fit_start(trainer, None)
    assert loop._broadcast_sigterm_tensor.__func__ is type(loop)._broadcast_sigterm_tensor


def test_every_overlap_cell_parses_through_the_cli(tmp_path, capsys):
    """Each distinct set of options of ``bench/strategies.py overlap`` is a config ``python -m lit_llm.train fit``
    accepts (parsed and printed, not run), and the guard's options reach it."""
    from lit_llm.train import cli

    bench = _bench("strategies")
    args = bench.argparse.Namespace(source="corpus.txt", tokenizer="gpt2_dir")
    # one cell per distinct set of options
    cells = {(tuple(c.extra), c.strategy, c.host_lead, c.launcher): c for c in bench.overlap_cells(4)}
    for i, cell in enumerate(cells.values()):
        cmd = bench.command(cell, args, tmp_path / str(i))
        with pytest.raises(SystemExit) as done:
            cli(cmd[cmd.index("fit"):] + ["--print_config"])
        assert done.value.code in (0, None), cell.name
        printed = capsys.readouterr().out
        if "read before the step" in cell.name:
            assert "check_before_step: true" in printed, cell.name
        elif "NonFiniteGuard" in cell.name:
            assert "lit_llm.callbacks.NonFiniteGuard" in printed and "check_before_step: null" in printed
        assert ("bench.throughput.HostLead" in printed) == cell.host_lead, cell.name
        if cell.launcher == "torchrun":  # torchrun starts the four ranks; Lightning finds them from its variables
            assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
        else:
            assert cmd[1:3] == ["-m", "lit_llm.train"]
    assert sum(c.launcher == "torchrun" for c in cells.values()) == 1
    tree = next(c for c in bench.overlap_cells(4) if "tree" in c.name)
    assert tree.env == {"NCCL_ALGO": "allreduce:tree"}  # plain "Tree" leaves NCCL no algorithm for a broadcast


def test_a_cell_with_an_unknown_launcher_is_refused(tmp_path):
    bench = _bench("strategies")
    args = bench.argparse.Namespace(source="corpus.txt", tokenizer="gpt2_dir")
    cell = bench.batch32("DDP x2", 2, "lit_ddp", launcher="mpirun")
    with pytest.raises(ValueError, match="launcher must be 'lightning' or 'torchrun'"):
        bench.command(cell, args, tmp_path)


def test_host_lead_reports_how_far_the_host_runs_ahead_and_each_phases_time(monkeypatch):
    """``HostLead.summary`` from recorded marks: the GPU reaches each point ``lead`` ms after the host passed it, and
    the host's and the GPU's time since the point before (a batch's start counts from the previous batch's end)."""
    import torch

    class Event:  # a CUDA event that the GPU reached ``ms`` after the reference event
        def __init__(self, ms: float) -> None:
            self.ms = ms

        def elapsed_time(self, other: Event) -> float:
            return other.ms - self.ms

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    lead = _throughput().HostLead("unused", start_step=0, steps=4, skip=1)
    host_at = [0, 5, 10, 11, 12]  # ms into each 60 ms batch when the host passes each point
    gpu_at = [0, 20, 58, 58, 60]  # the GPU, 40 ms behind at the batch's start
    lead.h0, lead.e0 = 0.0, Event(0.0)
    lead.marks = [(b, point, (60 * b + host_at[i]) / 1e3, Event(60 * b + 40 + gpu_at[i]))
                  for b in range(4) for i, point in enumerate(lead.POINTS)]
    points = lead.summary()["points"]
    assert [points[p]["lead_ms_mean"] for p in lead.POINTS] == [40, 55, 88, 87, 88]
    assert [points[p]["host_ms_since_previous"] for p in lead.POINTS] == [48, 5, 5, 1, 1]
    assert [points[p]["gpu_ms_since_previous"] for p in lead.POINTS] == [0, 20, 38, 0, 2]
    assert lead.summary()["batches"] == 3


def test_packing_bench_runs_on_cpu_and_writes_its_json(tmp_path):
    """The packing benchmark's single command, shrunk to a tiny model and three timed steps on the CPU."""
    out = tmp_path / "packing.json"
    report = _bench("packing").main(["--device", "cpu", "--model", "tiny", "--examples", "120", "--max-length", "256",
                                     "--rows", "2", "--steps", "3", "--warmup", "1", "--workers", "0",
                                     "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["data"]["examples"] == 120 and 50 < report["data"]["mean_tokens"] < 62  # the book's mean is 56
    padded, packed = report["results"]["padded"], report["results"]["packed"]
    assert padded["unit"] == "examples" and packed["unit"] == "rows" and packed["mean_width"] == 256
    assert packed["slots_holding_tokens"] > padded["slots_holding_tokens"]
    assert abs(packed["batches_per_epoch"] - padded["batches_per_epoch"]) <= 1  # same examples per step, on average
    for r in (padded, packed):
        assert r["timed_steps"] == 3 and not r["epoch_measured"]
        assert r["slot_tokens_per_s"] >= r["example_tokens_per_s"] >= r["trained_tokens_per_s"] > 0
    assert set(report["vs_padded"]) == {"packed"}


def test_packing_bench_lengths_follow_the_books_records():
    bench = _bench("packing")
    lengths = bench.builtin_lengths(5_000)
    totals = sorted(t for _, t in lengths)
    assert 54 < sum(totals) / len(totals) < 58 and 35 <= totals[0] and totals[-1] <= 115
    assert all(35 <= p < t for p, t in lengths)
    assert lengths == bench.builtin_lengths(5_000)  # seeded
