"""Data parallelism is exact: DDP over 2 CPU processes (gloo) trains like one process at the same global batch.

Every run goes through ``python -m lit_llm.train fit --config configs/pretrain/quickstart.yaml`` with
``--trainer.strategy=lit_ddp`` (the preset: a DDPStrategy with bucket views), which picks gloo on
the CPU by itself (Lightning takes the backend of the device,
``torch.distributed.Backend.default_device_backend_map["cpu"] == "gloo"``), which ``run.rank<r>.json`` records.

Why the two should agree to float rounding: ``ResumableSampler`` gives rank ``r`` the positions ``r, r + 2, ...`` of
the epoch's permutation, so rank ``r``'s batch ``k`` of ``B`` windows is the even (``r = 0``) or odd (``r = 1``)
positions of ``permutation[2Bk : 2B(k+1)]``, which is exactly the single process's batch ``k`` of ``2B`` windows.
Every pretraining window has ``context_length`` targets and none is ignored, so the mean of the two ranks' mean
losses is the mean over the ``2B`` windows, and DDP's averaged gradient is the single process's gradient. With
accumulation, step ``k`` takes micro-batches ``2k`` and ``2k + 1`` on every rank: again the same ``4B`` windows.

The five runs (three of two processes) start together in one module fixture and share the two cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from ddp_helpers import QUICKSTART, read_batches, recorder, start_training, step_losses, step_windows

pytestmark = pytest.mark.distributed

B = 4  # windows per rank and micro-batch; the single process takes 2 * B
STEPS = 4
TOLERANCE = 1e-5
# A hung job (a collective that one rank never joins) would otherwise wait for gloo's 30-minute timeout.
DEADLINE_S = 180

TINY = [
    "--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32", "--model.init_args.model.n_heads=2",
    "--model.init_args.model.context_length=16", "--model.init_args.model.drop_rate=0.0",
    "--model.init_args.speed.compile=false", "--data.init_args.tokenizer_vocab_size=300",
    "--data.init_args.num_workers=0",
    "--trainer.accelerator=cpu", "--trainer.precision=32-true",
]
DDP = ["--trainer.devices=2", "--trainer.strategy=lit_ddp"]  # the preset: bucket views, a compiled model in one graph
# Only what the comparison needs: lit_llm's checkpoint (last.ckpt holds the final weights) and, below, the recorder.
LEAN_CALLBACKS = "--trainer.callbacks=" + json.dumps(
    [{"class_path": "lit_llm.callbacks.Checkpoint", "init_args": {"save_last": True, "every_n_train_steps": 1000}}])


@dataclass
class Run:
    """A finished ``python -m lit_llm.train`` run: its folder, exit code and output (stdout and stderr)."""

    root: Path
    code: int
    output: str

    @property
    def records(self) -> Path:
        return self.root / "records"

    def check(self) -> None:
        assert self.code == 0, f"{self.root.name} exited with {self.code}:\n{self.output[-6000:]}"


def _args(root: Path, corpus: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(QUICKSTART), *TINY, f"--data.init_args.source={corpus}",
            f"--trainer.default_root_dir={root}", *extra, f"--trainer.callbacks+={recorder(root / 'records')}"]


def _training(batch_size: int, accumulate: int = 1) -> list[str]:
    """``STEPS`` optimizer steps without validation, logging or progress bar, dropout off (in ``TINY``)."""
    return [LEAN_CALLBACKS, f"--data.init_args.batch_size={batch_size}", f"--trainer.max_steps={STEPS}",
            f"--trainer.accumulate_grad_batches={accumulate}", "--trainer.deterministic=true",
            "--model.init_args.optim.warmup_steps=1", "--model.init_args.optim.schedule_steps=8",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]


@pytest.fixture(scope="module")
def runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """All runs of this module, started at once and waited for together (each launch is mostly start-up)."""
    base = tmp_path_factory.mktemp("ddp_parity")
    plans = {
        # The shipped quickstart, callbacks and all, as a user would smoke-test it on two processes.
        "fast_dev_run": [f"--data.init_args.batch_size={B}", "--trainer.fast_dev_run=true",
                         "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.strategy=ddp"],
        "single": _training(2 * B),
        "ddp": [*_training(B), *DDP],
        "single_accumulate": _training(2 * B, accumulate=2),
        "ddp_accumulate": [*_training(B, accumulate=2), *DDP],
        # FSDP2 (fully_shard) runs on the CPU with gloo too: the sharded math must be the single process's as well.
        "fsdp2": [*_training(B), "--trainer.devices=2", "--trainer.strategy=lit_fsdp2"],
    }
    started: dict[str, tuple[Path, subprocess.Popen]] = {}
    for name, extra in plans.items():
        root = base / name
        root.mkdir()
        # Own data caches: concurrent runs never write the same cache entry (the tokenizers trained on the one corpus
        # come out the same; the tests check it).
        env = {"LIT_LLM_CACHE": str(root / "cache"), "HF_DATASETS_CACHE": str(root / "hf_cache"),
               "OMP_NUM_THREADS": "1"}
        started[name] = root, start_training(_args(root, corpus, *extra), root / "output.log", env=env)
    deadline = time.monotonic() + DEADLINE_S
    done = {}
    for name, (root, proc) in started.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launched rank processes share the session of rank 0
            proc.wait()
            code = None
        output = (root / "output.log").read_text(encoding="utf-8")
        if code is None:
            output += f"\n[killed by the test after {DEADLINE_S} s: the job hung]"
        done[name] = Run(root, -9 if code is None else code, output)
    return done


def _rank_info(run: Run, rank: int) -> dict:
    return json.loads((run.records / f"run.rank{rank}.json").read_text(encoding="utf-8"))


def _final_weights(run: Run) -> dict[str, torch.Tensor]:
    return torch.load(run.root / "last.ckpt", weights_only=True)["state_dict"]


# ---- 1. the entry point on two processes --------------------------------------------------------------------------
def test_fast_dev_run_of_the_quickstart_on_two_processes(runs: dict[str, Run]) -> None:
    """``--trainer.strategy=ddp --trainer.devices=2`` on the CPU: two gloo ranks each train one batch of different
    windows, every quickstart callback runs (sample, loss plot, throughput record) and the job exits 0."""
    run = runs["fast_dev_run"]
    run.check()
    out = run.output
    for line in ("Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es)",
                 "Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2",
                 "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2",
                 "distributed_backend=gloo",
                 "All distributed processes registered. Starting with 2 processes",
                 "`Trainer.fit` stopped: `max_steps=1` reached."):
        assert line in out, f"missing {line!r} in:\n{out[-6000:]}"
    assert "Traceback" not in out
    # tokens_seen counts both ranks: 2 ranks x B windows x 16 tokens, shown by the sample printed at the end.
    assert re.search(rf"\b{2 * B * 16} tokens\b", out), out[-3000:]
    for rank in (0, 1):
        info = _rank_info(run, rank)
        assert {k: info[k] for k in ("world_size", "rank", "backend", "strategy")} == {
            "world_size": 2, "rank": rank, "backend": "gloo", "strategy": "DDPStrategy"}
    assert _rank_info(run, 0)["pid"] != _rank_info(run, 1)["pid"]
    rows = [read_batches(run.records, rank) for rank in (0, 1)]
    assert [len(r) for r in rows] == [1, 1] and [len(r[0]["inputs"]) for r in rows] == [B, B]
    assert not set(map(tuple, rows[0][0]["inputs"])) & set(map(tuple, rows[1][0]["inputs"]))
    weights = [torch.load(run.records / f"weights.rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # one averaged update on both
    for name in ("tokenizer.json", "samples.txt", "loss.png", "throughput.json"):
        assert (run.root / name).is_file(), f"{name} not written in {run.root}"


# ---- 2. loss and weight parity at the same global batch ----------------------------------------------------------
@pytest.mark.parametrize(("single", "ddp"), [("single", "ddp"), ("single_accumulate", "ddp_accumulate")],
                         ids=["no_accumulation", "accumulate_2"])
def test_two_ranks_train_like_one_process_with_their_union_batch(runs: dict[str, Run], single: str, ddp: str) -> None:
    """Two ranks with batch B (and accumulation 2 in the second case) against one process with batch 2B (and the
    same accumulation): the ranks' micro-batches interleave into the single process's, the global loss of every
    optimizer step (mean of the ranks' losses) agrees within 1e-5 and so do the final weights."""
    one, two = runs[single], runs[ddp]
    one.check()
    two.check()
    assert all(_rank_info(two, rank)["backend"] == "gloo" for rank in (0, 1))
    assert _rank_info(one, 0)["world_size"] == 1
    # Same tokenizer, hence the same windows: each run trained its own on the same corpus.
    assert (one.root / "tokenizer.json").read_bytes() == (two.root / "tokenizer.json").read_bytes()

    ref = read_batches(one.records)
    ranks = [read_batches(two.records, rank) for rank in (0, 1)]
    accumulate = ref[0]["accumulate"]
    assert len(ref) == len(ranks[0]) == len(ranks[1]) == STEPS * accumulate
    # The batch composition: rank r holds the even (r = 0) / odd (r = 1) rows of the single process's micro-batch.
    for i, row in enumerate(ref):
        assert len(row["inputs"]) == 2 * B and ranks[0][i]["step"] == ranks[1][i]["step"] == row["step"]
        assert ranks[0][i]["inputs"] == row["inputs"][0::2], f"micro-batch {i}: rank 0 is not the even rows"
        assert ranks[1][i]["inputs"] == row["inputs"][1::2], f"micro-batch {i}: rank 1 is not the odd rows"
    windows = [step_windows(r) for r in ranks]
    assert {s: sorted(windows[0][s] + windows[1][s]) for s in windows[0]} == step_windows(ref)

    expected = step_losses(ref)
    per_rank = [step_losses(r) for r in ranks]
    assert sorted(expected) == list(range(STEPS))
    for step, loss in expected.items():
        global_loss = (per_rank[0][step] + per_rank[1][step]) / 2
        assert abs(global_loss - loss) <= TOLERANCE, f"step {step}: 2 ranks {global_loss!r} vs 1 process {loss!r}"
        # The ranks really saw different data: a pass that does not hinge on both ranks repeating one batch.
        assert abs(per_rank[0][step] - per_rank[1][step]) > 10 * TOLERANCE, f"step {step}: ranks' losses equal"
    assert expected[STEPS - 1] < expected[0] - 0.05  # it trained: the weights compared below moved

    rank_weights = [torch.load(two.records / f"weights.rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(torch.equal(rank_weights[0][k], rank_weights[1][k]) for k in rank_weights[0])
    final_one, final_two = _final_weights(one), _final_weights(two)
    assert final_one.keys() == final_two.keys() and final_one
    for key in final_one:
        torch.testing.assert_close(final_two[key], final_one[key], rtol=0, atol=TOLERANCE, msg=lambda m: f"{key}: {m}")
        assert torch.equal(final_two[key], rank_weights[0][key.removeprefix("model.")])  # last.ckpt = the trained GPT


# ---- 3. FSDP2: the same parity with sharded parameters -------------------------------------------------------------
def test_fsdp2_on_two_ranks_trains_like_one_process(runs: dict[str, Run], tmp_path: Path) -> None:
    """``lit_fsdp2`` (``fully_shard`` per block, parameters sharded over 2 gloo ranks) against one process at the same
    global batch: the same per-step global losses within 1e-5, and the sharded final checkpoint, consolidated into one
    file by ``convert consolidate``, holds the same weights within 1e-5."""
    from lit_llm.weights.consolidate import consolidate

    one, two = runs["single"], runs["fsdp2"]
    one.check()
    two.check()
    assert {_rank_info(two, rank)["strategy"] for rank in (0, 1)} == {"GPTFSDP2Strategy"}
    expected = step_losses(read_batches(one.records))
    per_rank = [step_losses(read_batches(two.records, rank)) for rank in (0, 1)]
    for step, loss in expected.items():
        global_loss = (per_rank[0][step] + per_rank[1][step]) / 2
        assert abs(global_loss - loss) <= TOLERANCE, f"step {step}: FSDP2 {global_loss!r} vs 1 process {loss!r}"
    assert (two.root / "last.ckpt").is_dir()  # every rank wrote its shard
    single_file = consolidate(two.root / "last.ckpt", tmp_path / "fsdp2.ckpt")
    final_one = _final_weights(one)
    final_two = torch.load(single_file, weights_only=True)["state_dict"]
    assert final_one.keys() == final_two.keys() and final_one
    for key in final_one:
        torch.testing.assert_close(final_two[key], final_one[key], rtol=0, atol=TOLERANCE, msg=lambda m: f"{key}: {m}")


def test_fsdp2_resumes_from_its_sharded_checkpoint_exactly(corpus: Path, tmp_path: Path) -> None:
    """Two FSDP2 ranks save a sharded checkpoint directory at step 3 of 6; a new 2-rank run resumed from it trains
    steps 4-6 with the uninterrupted run's losses (RNG states, data position, AdamW state and weights restored)."""
    every_3 = "--trainer.callbacks=" + json.dumps([
        {"class_path": "lit_llm.callbacks.RNGState"},
        {"class_path": "lit_llm.callbacks.Checkpoint", "init_args": {
            "filename": "step={step:06d}", "auto_insert_metric_name": False, "every_n_train_steps": 3,
            "save_top_k": -1}}])
    fsdp2 = [*_training(B), every_3, "--trainer.max_steps=6", "--trainer.devices=2", "--trainer.strategy=lit_fsdp2"]
    runs = {}
    for name, extra in (("full", []), ("resumed", [f"--ckpt_path={tmp_path / 'full' / 'step=000003.ckpt'}"])):
        root = tmp_path / name
        root.mkdir()
        proc = start_training(_args(root, corpus, *fsdp2, *extra), root / "output.log",
                              env={"LIT_LLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
        try:
            code = proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -9
        runs[name] = Run(root, code, (root / "output.log").read_text(encoding="utf-8"))
        runs[name].check()
    assert (tmp_path / "full" / "step=000003.ckpt").is_dir()
    full = {r: step_losses(read_batches(runs["full"].records, r)) for r in (0, 1)}
    resumed = {r: step_losses(read_batches(runs["resumed"].records, r)) for r in (0, 1)}
    assert sorted(resumed[0]) == [3, 4, 5] and sorted(full[0]) == list(range(6))
    for rank in (0, 1):
        for step, loss in resumed[rank].items():
            assert abs(loss - full[rank][step]) <= 1e-6, f"rank {rank}, step {step}: {loss!r} vs {full[rank][step]!r}"
