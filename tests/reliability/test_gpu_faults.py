"""Process and numerical faults on 2 GPUs under NCCL, through ``python -m lit_llm.train``: the CUDA paths of what
tests/reliability/test_ddp.py and test_numerical.py check over gloo on the CPU (the ranks' SIGTERM agreement read
from pinned memory behind a CUDA event, the guard's verdict read a step later, DeepSpeed's engine applying a
non-finite step).

    python -m pytest -m gpu tests/reliability/test_gpu_faults.py -v
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from faults import fit_args, losses_by_batch, read_losses, train

from lit_llm.callbacks.signals import REQUEUE_EXIT_CODE

pytestmark = [
    pytest.mark.gpu, pytest.mark.distributed,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

GPU = ["--trainer.accelerator=gpu", "--trainer.devices=2", "--trainer.deterministic=false"]
DDP = [*GPU, "--trainer.strategy=lit_ddp"]
EVERY_2_STEPS = {"filename": "step={step:06d}", "auto_insert_metric_name": False, "every_n_train_steps": 2,
                 "save_top_k": -1}
GUARD = {"class_path": "lit_llm.callbacks.NonFiniteGuard"}  # as shipped: policy stop, its verdict read a step later


def log(folder) -> dict:
    return {"class_path": "faults.LossLog", "init_args": {"folder": str(folder)}}


def test_sigterm_on_rank_1_stops_both_ranks_at_the_same_step_under_nccl(corpus, tmp_path):
    """Rank 1 alone receives SIGTERM between the micro-batches of step 6 and tells no one: the next batch start's
    all-reduce carries it, both ranks finish step 6, save last.ckpt once and exit with the requeue code; resumed, each
    rank trains on exactly the batches the uninterrupted run trained on after step 6.

    The losses are not compared here: the run is not deterministic on the GPU (``deterministic: false``), and the
    resumed run's losses drifted from the uninterrupted run's by 1.6e-4 in one run on 2 H200s and by more than 2e-3
    in another, so a tolerance would test the kernels' summation order, not the resume. test_ddp.py checks the resumed
    losses, weights and optimizer state bit for bit over gloo on the CPU."""
    sigterm = {"class_path": "faults.SigtermAt", "init_args": {"step": 5, "mid_step": True, "rank": 1}}
    accumulate = "--trainer.accumulate_grad_batches=2"
    proc = train(fit_args(tmp_path, corpus, 12, [log(tmp_path / "first"), sigterm], *DDP, accumulate), timeout=400)
    out = proc.stdout + proc.stderr
    assert "SIGTERM sent at step 5 batch" in out
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-4000:]
    ends = [read_losses(tmp_path / "first", rank)[-1] for rank in (0, 1)]
    assert ends[0]["step"] == ends[1]["step"] == 6 and ends[0]["batch_idx"] == ends[1]["batch_idx"]
    assert f"SIGTERM: stopping after optimizer step 6; saved {tmp_path / 'last.ckpt'}" in out
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6

    ref = tmp_path / "reference"
    for root, extra in ((ref, []), (tmp_path, ["--ckpt_path=auto"])):
        proc = train(fit_args(root, corpus, 12, [log(root / "log")], *DDP, accumulate, *extra), timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for rank in (0, 1):
        expected = losses_by_batch(read_losses(ref / "log", rank))
        resumed = losses_by_batch(read_losses(tmp_path / "log", rank))
        first = losses_by_batch(read_losses(tmp_path / "first", rank))
        assert sorted(resumed) == sorted(set(expected) - set(first))
        assert [window for _, window in resumed.values()] == [expected[key][1] for key in resumed]  # in order
        assert all(math.isfinite(float.fromhex(loss)) for loss, _ in resumed.values())


def test_a_nan_loss_on_rank_1_stops_both_ranks_one_step_later_under_nccl(corpus, tmp_path):
    """``NonFiniteGuard`` as shipped (``policy: stop``, its verdict read a step later on a GPU): a NaN loss on rank 1 at
    step 3 stops both ranks, naming step 3; no checkpoint after step 2 is written (one every 2 steps)."""
    nan = {"class_path": "faults.NanLossAt", "init_args": {"step": 3, "rank": 1}}
    proc = train(fit_args(tmp_path, corpus, 10, [nan, GUARD], *DDP, checkpoint=EVERY_2_STEPS), timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "NaN loss on rank 1 at step 3" in out
    assert "loss=nan at optimizer step 3 on rank 1 of 2" in out and "check_before_step: false" in out, out[-4000:]
    assert "non-finite loss on another rank at optimizer step 3 on rank 0 of 2" in out
    assert sorted(p.name for p in tmp_path.glob("step=*.ckpt")) == ["step=000002.ckpt"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed")
def test_a_non_finite_gradient_deepspeed_applied_stops_the_run_before_it_is_saved(corpus, tmp_path):
    """ZeRO-2 (its bf16 overflow check off, as lit_deepspeed_zero2 ships): an infinite gradient with a finite loss at
    step 3 is applied by the engine; the guard reads the engine's gradient norm and stops the run at the save after it
    (step 4), so the newest checkpoint is step 2's."""
    inf = {"class_path": "faults.InfGradAt", "init_args": {"step": 3}}
    proc = train(fit_args(tmp_path, corpus, 10, [inf, GUARD], *GPU, "--trainer.strategy=lit_deepspeed_zero2",
                          "--trainer.precision=bf16-mixed", checkpoint=EVERY_2_STEPS), timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "inf gradient at step 3" in out
    assert "non-finite gradient norm at optimizer step 3" in out and "DeepSpeed" in out, out[-4000:]
    assert sorted(p.name for p in tmp_path.glob("step=*.ckpt")) == ["step=000002.ckpt"]
