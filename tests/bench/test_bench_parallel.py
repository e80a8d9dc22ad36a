"""``bench/parallel.py``'s own logic that runs without a GPU: its cells and the figures derived from their results."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT


def _parallel():
    spec = importlib.util.spec_from_file_location("bench_parallel", ROOT / "bench" / "parallel.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [4, 8])
def test_speed_cells_give_every_gpu_the_same_tokens_per_step(n):
    bench = _parallel()
    cells = bench.speed_cells(n)
    per_gpu = set()
    for cell in cells:
        replica = {"lit_ddp": 1, "lit_fsdp": 1, "lit_tp_fsdp": 2}.get(cell.strategy, n)  # TP and pipeline: all n
        per_gpu.add(cell.batch / replica)
    assert per_gpu == {8.0}
    assert {c.name for c in cells} >= {f"XL pipeline GPipe x{n}", f"XL pipeline 1F1B x{n}", f"XL TP+FSDP x{n} eager"}


def test_bubble_and_parity_figures(tmp_path):
    bench = _parallel()
    cells = bench.parity_cells(4, tmp_path)
    written = {("1_GPU", 0): [3.0, 2.0], ("TP_x2", 0): [3.0, 2.5],
               # 2-D: ranks 0 and 2 hold the two pairs, each half of the batch; the global loss is their mean.
               ("TP+FSDP_x4", 0): [3.0, 2.0], ("TP+FSDP_x4", 2): [3.0, 3.0]}
    for (folder, rank), values in written.items():
        (tmp_path / "parity" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "parity" / folder / f"losses.rank{rank}.json").write_text(json.dumps(values))
    results = [{"cell": {"name": c.name}} for c in cells]
    bench.add_parity(results, cells)
    by_name = {r["cell"]["name"]: r for r in results}
    assert by_name["parity TP x2"]["max_loss_diff_vs_1gpu"] == pytest.approx(0.5)
    assert by_name["parity TP+FSDP x4"]["max_loss_diff_vs_1gpu"] == pytest.approx(0.5)
    bubble = [{"cell": {"name": "bubble 1 GPU m=8", "accumulate": 8}, "tokens_per_sec_per_device": 100.0},
              {"cell": {"name": "bubble 1f1b x4 m=8", "accumulate": 1}, "tokens_per_sec_per_device": 70.0}]
    bench.add_bubble(bubble, 4)
    assert bubble[1]["bubble_theory"] == pytest.approx(3 / 11)
    assert bubble[1]["bubble_measured"] == pytest.approx(0.3)
