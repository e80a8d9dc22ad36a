"""Numerical faults: a NaN/Inf loss or gradient norm stops (or skips) the step before the optimizer applies it."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from faults import GUARD, build, fit, write_pydoc_corpus

from lit_llm.callbacks.guard import NonFiniteGuard
from lit_llm.errors import ConfigError, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30,000 characters of CPython's docs: more than the shared 4,000, for runs of more steps per epoch."""
    return write_pydoc_corpus(tmp_path_factory.mktemp("corpus"), 30_000)


def nan_loss_at(c: object, steps: set[int]) -> None:
    """Make the training loss NaN at the given optimizer steps (0-based ``global_step``)."""
    task = c.model
    loss = task.loss

    def poisoned(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = loss(inputs, targets)
        return value * float("nan") if task.training and task.trainer.global_step in steps else value

    task.loss = poisoned


class Snapshot(pl.Callback):
    """Copies of the weights and the optimizer state at the start of ``step`` and at its end."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict | None = None
        self.after: dict | None = None

    def _state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return {"model": copy.deepcopy(pl_module.state_dict()),
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
                "lr": trainer.optimizers[0].param_groups[0]["lr"]}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = self._state(trainer, pl_module)


class InfGrad(pl.Callback):
    """Set one gradient entry to ``inf`` (or scale all gradients) at ``step``, after backward."""

    def __init__(self, step: int, scale: float | None = None) -> None:
        self.step, self.scale = step, scale

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != self.step:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if self.scale is None:
            grads[0].view(-1)[0] = float("inf")
        else:
            for g in grads:
                g.mul_(self.scale)


def same_state(a: dict, b: dict) -> bool:
    def eq(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return eq(a, b)


def test_nan_loss_stops_before_the_optimizer_step(corpus, tmp_path, in_repo_root):
    c = build(corpus, tmp_path, "--trainer.max_steps=10", f"--trainer.callbacks+={GUARD}")
    nan_loss_at(c, {5})
    snap = Snapshot(5)
    with pytest.raises(NonFiniteLossError) as info:
        fit(c, snap)
    message = str(info.value)
    assert "loss=nan" in message and "optimizer step 5" in message and "rank 0 of 1" in message
    assert str(tmp_path / "last.ckpt") in message  # the last good checkpoint
    # The weights and the optimizer are exactly those before the bad step.
    assert snap.before is not None
    now = {"model": c.model.state_dict(), "optimizer": c.trainer.optimizers[0].state_dict(),
           "lr": c.trainer.optimizers[0].param_groups[0]["lr"]}
    assert same_state(snap.before, now)
    # Nothing was saved after the fault: the newest checkpoint is from step 4.
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_nothing_saved_after_a_fault_even_with_save_on_exception(corpus, tmp_path, in_repo_root):
    c = build(corpus, tmp_path, "--trainer.max_steps=10", f"--trainer.callbacks+={GUARD}")
    c.trainer.checkpoint_callback.save_on_exception = True
    nan_loss_at(c, {3})
    with pytest.raises(NonFiniteLossError, match="optimizer step 3"):
        fit(c)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt", "step=000002.ckpt"]


def test_non_finite_grad_norm_with_finite_loss_stops(corpus, tmp_path, in_repo_root):
    c = build(corpus, tmp_path, "--trainer.max_steps=10", f"--trainer.callbacks+={GUARD}")
    snap = Snapshot(1)
    with pytest.raises(NonFiniteLossError) as info:
        fit(c, InfGrad(1), snap)
    message = str(info.value)
    assert "gradient norm=inf with a finite loss" in message and "optimizer step 1" in message
    assert "none saved yet" in message
    assert same_state(snap.before["model"], c.model.state_dict())
    assert not list(tmp_path.glob("*.ckpt"))


def test_skip_policy_skips_the_step_and_counts_it(corpus, tmp_path, in_repo_root):
    guard = '{"class_path": "' + GUARD + '", "init_args": {"policy": "skip", "max_consecutive_skips": 3}}'
    c = build(corpus, tmp_path, "--trainer.max_steps=6", f"--trainer.callbacks+={guard}")
    nan_loss_at(c, {3})
    snap = Snapshot(3)
    with pytest.warns(UserWarning, match="skipped optimizer step 3"):
        fit(c, snap)
    assert c.trainer.global_step == 6 and c.trainer.state.finished
    # The skipped step changed nothing: weights, AdamW moments and step counts, learning rate.
    assert snap.before is not None and snap.after is not None
    assert same_state(snap.before, snap.after)
    scheduler = c.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 5  # 6 optimizer steps, one skipped
    assert all(math.isfinite(p.detach().sum().item()) for p in c.model.parameters())
    guard = next(cb for cb in c.trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert (guard.skipped_steps, guard.consecutive_skips) == (1, 0)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    state = next(v for k, v in saved.items() if "NonFiniteGuard" in k)
    assert state == {"skipped_steps": 1, "consecutive_skips": 0}


def test_consecutive_skips_stop(corpus, tmp_path, in_repo_root):
    guard = '{"class_path": "' + GUARD + '", "init_args": {"policy": "skip", "max_consecutive_skips": 3}}'
    c = build(corpus, tmp_path, "--trainer.max_steps=10", f"--trainer.callbacks+={guard}")
    nan_loss_at(c, set(range(2, 10)))
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(NonFiniteLossError) as info:
        fit(c)
    message = str(info.value)
    assert "optimizer step 4" in message and "3 consecutive steps were skipped" in message
    assert str(tmp_path / "last.ckpt") in message


def test_huge_gradient_is_clipped_and_its_norm_logged(corpus, tmp_path, in_repo_root):
    c = build(corpus, tmp_path, "--trainer.max_steps=4", f"--trainer.callbacks+={GUARD}")
    seen: dict[str, float] = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # just after step 2
                seen["logged"] = float(trainer.callback_metrics["train/grad_norm"])

    def after_step(optimizer, args, kwargs):
        if c.trainer.global_step == 2:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            seen["applied"] = float(torch.nn.utils.get_total_norm(grads))

    class Hook(pl.Callback):  # the optimizer exists once fit starts
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(after_step)

    fit(c, Hook(), InfGrad(2, scale=1e6), Record())
    clip = c.model.optim.gradient_clip
    assert seen["logged"] > 1e3 * clip  # the pre-clip norm is what is logged
    assert seen["applied"] <= clip * (1 + 1e-4)  # ... and the optimizer saw the clipped gradients


LATE_GUARD = '{"class_path": "' + GUARD + '", "init_args": {"check_before_step": false}}'


@pytest.mark.parametrize("bad_step, newest", [(5, 4), (6, 6)])
def test_a_verdict_read_a_step_later_stops_before_anything_after_the_fault_is_saved(corpus, tmp_path, in_repo_root,
                                                                                    bad_step, newest):
    """``check_before_step: false`` (the default for ``policy: stop`` on a GPU): the faulty step is applied, and the
    run stops at the save right after it (step 5: the save at 6) or at the next step's check (step 6), naming the
    faulty step; no checkpoint holds weights from that step on."""
    c = build(corpus, tmp_path, "--trainer.max_steps=10", f"--trainer.callbacks+={LATE_GUARD}")
    nan_loss_at(c, {bad_step})
    snap = Snapshot(bad_step)
    with pytest.raises(NonFiniteLossError) as info:
        fit(c, snap)
    message = str(info.value)
    assert f"loss=nan at optimizer step {bad_step} on rank 0 of 1" in message
    assert "check_before_step: false" in message and f"nothing was saved after step {bad_step - 1}" in message
    assert str(tmp_path / "last.ckpt") in message
    assert snap.after is not None  # the step was applied: it is read a step later
    assert not all(math.isfinite(p.detach().sum().item()) for p in c.model.parameters())
    saved = sorted(p.name for p in tmp_path.glob("step=*.ckpt"))
    assert saved == [f"step={s:06d}.ckpt" for s in range(2, newest + 1, 2)]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == newest


def test_a_verdict_read_a_step_later_names_a_non_finite_gradient(corpus, tmp_path, in_repo_root):
    c = build(corpus, tmp_path, "--trainer.max_steps=10", f"--trainer.callbacks+={LATE_GUARD}")
    with pytest.raises(NonFiniteLossError, match="gradient norm=inf with a finite loss at optimizer step 1 on rank 0"):
        fit(c, InfGrad(1))
    assert not list(tmp_path.glob("*.ckpt"))


def test_a_fault_in_the_last_step_does_not_end_the_run_quietly(corpus, tmp_path, in_repo_root):
    """No step and no save follow the last step: its verdict is read when training ends."""
    c = build(corpus, tmp_path, "--trainer.max_steps=6", "--trainer.enable_checkpointing=false",
              f"--trainer.callbacks=[{LATE_GUARD}]")
    nan_loss_at(c, {5})
    with pytest.raises(NonFiniteLossError, match="loss=nan at optimizer step 5"):
        c.trainer.fit(c.model, datamodule=c.datamodule)
    assert c.trainer.global_step == 6


def test_finite_steps_with_the_verdict_read_a_step_later_train_as_with_it_read_before(corpus, tmp_path, in_repo_root):
    weights = []
    for name, guard in (("before", GUARD), ("late", LATE_GUARD)):
        c = build(corpus, tmp_path / name, "--trainer.max_steps=4", "--seed_everything=7",
                  f"--trainer.callbacks+={guard}")
        fit(c)
        assert c.trainer.global_step == 4
        weights.append(c.model.state_dict())
    assert same_state(*weights)


def test_when_the_verdict_is_read():
    gpu, cpu = (type("M", (), {"device": torch.device(kind)})() for kind in ("cuda", "cpu"))
    assert NonFiniteGuard().reads_before_step(gpu) is False  # stop on a GPU: a step later, no wait
    assert NonFiniteGuard().reads_before_step(cpu) is True  # nothing to wait for on the CPU
    assert NonFiniteGuard(policy="skip").reads_before_step(gpu) is True  # a skip is decided before the step
    assert NonFiniteGuard(check_before_step=True).reads_before_step(gpu) is True
    assert NonFiniteGuard(check_before_step=False).reads_before_step(cpu) is False


def test_bad_guard_settings_are_config_errors():
    with pytest.raises(ConfigError, match="policy"):
        NonFiniteGuard(policy="ignore")
    with pytest.raises(ConfigError, match="max_consecutive_skips"):
        NonFiniteGuard(max_consecutive_skips=0)
    with pytest.raises(ConfigError, match="policy='skip' needs check_before_step=true"):
        NonFiniteGuard(policy="skip", check_before_step=False)


DDP_SCRIPT = '''
import sys
import torch
sys.path.insert(0, {here!r})
from faults import build
from lit_llm.errors import NonFiniteLossError

root, corpus, init_args = sys.argv[1:4]
guard = '{{"class_path": "lit_llm.callbacks.guard.NonFiniteGuard", "init_args": ' + init_args + '}}'
c = build(corpus, root, "--trainer.max_steps=6", "--trainer.devices=2", "--trainer.strategy=ddp",
          "--trainer.callbacks+=" + guard)
task = c.model
loss = task.loss

def poisoned(inputs, targets):  # NaN loss on rank 1 only, at step 3
    value = loss(inputs, targets)
    t = task.trainer
    return value * float("nan") if task.training and t.global_rank == 1 and t.global_step == 3 else value

task.loss = poisoned
try:
    c.trainer.fit(c.model, datamodule=c.datamodule)
except NonFiniteLossError as err:
    print(f"RANK{{c.trainer.global_rank}} STOPPED {{err}}", flush=True)
    sys.exit(3)
total = sum(float(p.detach().double().sum()) for p in task.parameters())
sched = c.trainer.lr_scheduler_configs[0].scheduler
print(f"RANK{{c.trainer.global_rank}} DONE step={{c.trainer.global_step}} sched={{sched.last_epoch}} sum={{total!r}}",
      flush=True)
'''


@pytest.mark.slow  # ~30 s each: two processes start and import torch
@pytest.mark.distributed
@pytest.mark.parametrize("policy", ["stop", "skip", "stop late"])
def test_ddp_fault_on_one_rank(policy, corpus, tmp_path):
    """2 CPU processes (gloo), NaN loss on rank 1 only: both ranks stop (or skip) the same step; nothing hangs. With
    ``stop late`` the verdict is read a step later (``check_before_step: false``): both ranks stop at the next
    step's check, naming step 3."""
    import subprocess
    import sys

    script = tmp_path / "ddp_fault.py"
    script.write_text(DDP_SCRIPT.format(here=str(Path(__file__).parent)))
    from faults import subprocess_env  # the repository importable (also without an installed package), no ranks

    init_args = {"policy": policy.split()[0], **({"check_before_step": False} if "late" in policy else {})}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(corpus), json.dumps(init_args)],
                          cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    if policy.startswith("stop"):
        assert proc.returncode != 0, out
        for rank in (0, 1):
            assert f"RANK{rank} STOPPED" in out and "optimizer step 3" in out, out
        assert "loss=nan at optimizer step 3 on rank 1 of 2" in out
        assert ("check_before_step: false" in out) == (policy == "stop late")
    else:
        assert proc.returncode == 0, out
        done = dict(re.findall(r"RANK(\d) DONE (step=6 sched=5 sum=[-\d.e]+)", out))
        assert sorted(done) == ["0", "1"], out
        assert done["0"] == done["1"]  # both finished 6 steps, 5 scheduler steps, and agree on the weights


class FakeEngine:
    """Stands in for DeepSpeed's engine on a CPU run: its ``get_global_grad_norm`` (the norm of the step it has just
    applied) is infinite for the given optimizer steps."""

    def __init__(self, trainer: pl.Trainer, bad_steps: set[int]) -> None:
        self.trainer, self.bad_steps, self.calls = trainer, bad_steps, 0

    def get_global_grad_norm(self) -> torch.Tensor:
        self.calls += 1
        applied = self.trainer.global_step - 1
        return torch.tensor(float("inf") if applied in self.bad_steps else 1.0)


@pytest.mark.parametrize("bad_step, newest", [(3, 2), (4, 4)])
def test_a_non_finite_step_deepspeed_applied_stops_before_anything_is_saved(corpus, tmp_path, in_repo_root, bad_step,
                                                                             newest):
    """Under DeepSpeed the engine applies the step before its gradient norm is known (lit_llm turns its bf16 overflow
    check off). A non-finite norm then stops the run at the next save (step 3: the save after it, at step 4) or the
    next step's check (step 4), and no checkpoint holds weights from that step on."""
    c = build(corpus, tmp_path, "--trainer.max_steps=10", f"--trainer.callbacks+={GUARD}")
    engine = FakeEngine(c.trainer, {bad_step})
    c.trainer.strategy.deepspeed_engine = engine
    with pytest.raises(NonFiniteLossError) as info:
        fit(c)
    message = str(info.value)
    assert f"non-finite gradient norm at optimizer step {bad_step}" in message and "DeepSpeed" in message
    assert str(tmp_path / "last.ckpt") in message and "check_grad_overflow=true" in message
    saved = sorted(p.name for p in tmp_path.glob("step=*.ckpt"))
    assert saved == [f"step={s:06d}.ckpt" for s in range(2, newest + 1, 2)]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == newest
    assert engine.calls == bad_step + 1  # read once per applied step, without waiting for the GPU there


def test_finite_steps_deepspeed_applied_train_on(corpus, tmp_path, in_repo_root):
    c = build(corpus, tmp_path, "--trainer.max_steps=5", f"--trainer.callbacks+={GUARD}")
    engine = FakeEngine(c.trainer, set())
    c.trainer.strategy.deepspeed_engine = engine
    fit(c)
    assert c.trainer.global_step == 5 and engine.calls == 5


@pytest.mark.parametrize("accumulate", [1, 2])
def test_deepspeeds_gradient_norm_is_logged_once_per_optimizer_step(corpus, tmp_path, in_repo_root, monkeypatch,
                                                                    accumulate):
    """DeepSpeed clips inside its engine, so Lightning's clipping hook (where the other strategies log
    ``train/grad_norm``) does not run: the task logs the norm the engine computed for each step instead."""
    import lit_llm.tasks.base as base

    c = build(corpus, tmp_path, "--trainer.max_steps=4", f"--trainer.accumulate_grad_batches={accumulate}")
    monkeypatch.setattr(base, "is_deepspeed", lambda strategy: True)  # the task sees a DeepSpeed run

    class Engine:
        calls = 0

        def get_global_grad_norm(self) -> torch.Tensor:
            Engine.calls += 1
            return torch.tensor(10.0 + Engine.calls)  # the norm of the step just applied (step 1: 11.0)

    c.trainer.strategy.deepspeed_engine = Engine()
    logged: list[tuple[int, float]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if "train/grad_norm" in trainer.callback_metrics:
                logged.append((trainer.global_step, float(trainer.callback_metrics["train/grad_norm"])))

    fit(c, Record())
    assert Engine.calls == 4  # once per optimizer step, not per micro-batch
    assert len(logged) == 4 * accumulate - (accumulate - 1)  # every batch end from the first step's on
    assert sorted(set(logged)) == [(s, 10.0 + s) for s in range(1, 5)]  # each step's own norm, from its end on
