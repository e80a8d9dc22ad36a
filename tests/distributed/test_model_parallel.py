"""Tensor and pipeline parallelism are exact: over gloo CPU processes they train like one process at the same global
batch.

Every run goes through ``python -m lit_llm.train fit --config configs/pretrain/quickstart.yaml`` on a 4-layer,
32-wide GPT with a tied embedding and head (the quickstart's), float32, dropout off, gradient clipping at 1.0, 20
optimizer steps. A tensor-parallel group or a pipeline sees the whole batch a single process sees; with two groups
or pipelines side by side (4 processes), each sees half of it and the global loss is the mean of theirs, as under
DDP (``test_ddp_parity.py`` says why the halves are exactly the single process's batch).

Checked against the single process: every step's global loss (1e-5), the gradients of the tied embedding and head at
the first step (each pipeline end holds a copy; a tensor-parallel rank a vocabulary slice), and the final weights
after ``convert consolidate`` (1e-5). A run resumed from its step-10 checkpoint trains steps 10-19 with the
uninterrupted run's losses. The runs of each fixture start together and share the two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from ddp_helpers import QUICKSTART, read_batches, recorder, start_training, step_losses

from lit_llm.distributed.pipeline import GPTStage, bubble_share, cut_to_stages, split_layers
from lit_llm.distributed.tensor import canonical_qkv_order, canonical_state, check_tensor_parallel, group_qkv_by_rank
from lit_llm.errors import ConfigError
from lit_llm.model.gpt import GPTConfig, GPTModel
from lit_llm.weights.consolidate import consolidate

pytestmark = pytest.mark.distributed

STEPS = 20
B = 8  # windows per step of the single process (and of each model replica with one replica)
TOLERANCE = 1e-5
DEADLINE_S = 420  # a hung job (a collective one rank never joins) would otherwise wait for gloo's 30 minutes
PIPELINE = "lit_llm.distributed.pipeline.GPTPipelineStrategy"
TENSOR = "lit_llm.distributed.tensor.GPTTensorParallelStrategy"

TINY = [
    "--model.init_args.model.n_layers=4", "--model.init_args.model.emb_dim=32", "--model.init_args.model.n_heads=2",
    "--model.init_args.model.context_length=16", "--model.init_args.model.drop_rate=0.0",
    "--model.init_args.speed.compile=false", "--data.init_args.tokenizer_vocab_size=300",
    "--data.init_args.num_workers=0",
    "--trainer.accelerator=cpu", "--trainer.precision=32-true",
]
CALLBACKS = "--trainer.callbacks=" + json.dumps([
    {"class_path": "lit_llm.callbacks.RNGState"},
    {"class_path": "lit_llm.callbacks.Checkpoint", "init_args": {
        "filename": "step={step:06d}", "auto_insert_metric_name": False, "every_n_train_steps": 10,
        "save_top_k": -1, "save_last": True}},
])


@dataclass
class Run:
    """A finished ``python -m lit_llm.train`` run: its folder, exit code, output and number of processes."""

    root: Path
    code: int
    output: str
    ranks: int

    @property
    def records(self) -> Path:
        return self.root / "records"

    def check(self) -> None:
        assert self.code == 0, f"{self.root.name} exited with {self.code}:\n{self.output[-6000:]}"

    def global_losses(self) -> dict[int, float]:
        """Step -> the mean over the ranks of their logged loss: the global loss (replicas see halves of the batch,
        ranks of one replica log the same value)."""
        per_rank = [step_losses(read_batches(self.records, r)) for r in range(self.ranks)]
        return {step: sum(p[step] for p in per_rank) / self.ranks for step in per_rank[0]}


def _args(root: Path, corpus: Path, batch_size: int, *extra: str) -> list[str]:
    return ["fit", "--config", str(QUICKSTART), *TINY, f"--data.init_args.source={corpus}",
            f"--trainer.default_root_dir={root}", CALLBACKS, f"--data.init_args.batch_size={batch_size}",
            f"--trainer.max_steps={STEPS}", "--trainer.deterministic=true", "--model.init_args.optim.warmup_steps=1",
            f"--model.init_args.optim.schedule_steps={STEPS}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", *extra, f"--trainer.callbacks+={recorder(root / 'records')}",
            "--trainer.callbacks+=" + json.dumps({"class_path": "parallel_helpers.TiedGradRecorder",
                                                  "init_args": {"folder": str(root / "records")}})]


def _launch(plans: dict[str, tuple[int, int, list[str]]], base: Path, corpus: Path) -> dict[str, Run]:
    """Start every plan (name -> (processes, batch size, arguments)) at once and wait for all of them."""
    started = {}
    for name, (ranks, batch_size, extra) in plans.items():
        root = base / name
        root.mkdir()
        env = {"LIT_LLM_CACHE": str(root / "cache"), "HF_DATASETS_CACHE": str(root / "hf_cache"),
               "OMP_NUM_THREADS": "1"}
        started[name] = ranks, root, start_training(_args(root, corpus, batch_size, *extra), root / "output.log",
                                                    env=env)
    deadline = time.monotonic() + DEADLINE_S
    done = {}
    for name, (ranks, root, proc) in started.items():
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launched rank processes share the session of rank 0
            proc.wait()
            code = -9
        output = (root / "output.log").read_text(encoding="utf-8")
        done[name] = Run(root, code, output, ranks)
    return done


def _devices(n: int, strategy: str, *options: str) -> list[str]:
    return [f"--trainer.devices={n}", f"--trainer.strategy={strategy}", *options]


@pytest.fixture(scope="module")
def runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """One process, and 2-process tensor and pipeline runs (three schedules, an uneven split), plus two bad inputs."""
    plans = {
        "single": (1, B, []),
        "tp": (2, B, _devices(2, "lit_tp")),
        "pipeline": (2, B, _devices(2, "lit_pipeline")),
        "gpipe_uneven": (2, B, _devices(2, PIPELINE, "--trainer.strategy.schedule=gpipe",
                                        "--trainer.strategy.microbatches=2",
                                        "--trainer.strategy.stages=[[0,1],[1,4]]")),
        "interleaved": (2, B, _devices(2, PIPELINE, "--trainer.strategy.schedule=interleaved_1f1b",
                                       "--trainer.strategy.stages_per_rank=2")),
        "bad_tp_world": (2, B, _devices(2, TENSOR, "--trainer.strategy.tensor_parallel_size=3")),
        "bad_stages": (2, B, _devices(2, PIPELINE, "--trainer.strategy.stages=[[0,1],[2,4]]")),
    }
    return _launch(plans, tmp_path_factory.mktemp("model_parallel"), corpus)


@pytest.fixture(scope="module")
def runs4(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """One process and 4-process runs: 2-D (tensor parallel pairs, FSDP2 across), 4 pipeline stages, and 2 pipelines
    of 2 stages side by side, replicated and FSDP2-sharded."""
    pipelines_of_2 = [f"--trainer.strategy={PIPELINE}", "--trainer.devices=4",
                      "--trainer.strategy.pipeline_parallel_size=2"]
    plans = {
        "single": (1, B, []),
        "tp_fsdp": (4, B // 2, _devices(4, "lit_tp_fsdp")),
        "pipeline4": (4, B, _devices(4, "lit_pipeline")),
        "pipeline_ddp": (4, B // 2, pipelines_of_2),
        "pipeline_fsdp": (4, B // 2, [*pipelines_of_2, "--trainer.strategy.data_parallel=shard"]),
    }
    return _launch(plans, tmp_path_factory.mktemp("model_parallel_4"), corpus)


def _check_parity(one: Run, other: Run, tmp_path: Path) -> None:
    one.check()
    other.check()
    expected, got = one.global_losses(), other.global_losses()
    assert sorted(got) == sorted(expected) == list(range(STEPS))
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= TOLERANCE, f"{other.root.name} step {step}: {got[step]!r} vs {loss!r}"
    assert expected[STEPS - 1] < expected[0] - 0.5  # it trained
    # The tied embedding's gradient at the first step: whole on every rank that holds a copy, before clipping.
    reference = torch.load(one.records / "grads.rank0.pt", weights_only=True)["tok_emb.weight"]
    copies = 0
    for rank in range(other.ranks):
        for name, grad in torch.load(other.records / f"grads.rank{rank}.pt", weights_only=True).items():
            torch.testing.assert_close(grad, reference, rtol=0, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")
            copies += 1
    assert copies >= 2
    # The checkpoint directory consolidates into the single process's final weights, the head tied again.
    assert (other.root / "last.ckpt").is_dir()
    final = torch.load(consolidate(other.root / "last.ckpt", tmp_path / f"{other.root.name}.ckpt"),
                       weights_only=True)["state_dict"]
    reference_weights = torch.load(one.root / "last.ckpt", weights_only=True)["state_dict"]
    assert final.keys() == reference_weights.keys()
    for key, value in reference_weights.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=TOLERANCE, msg=lambda m: f"{key}: {m}")
    assert final["model.out_head.weight"].data_ptr() == final["model.tok_emb.weight"].data_ptr()


# ---- 1. parity on two processes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tp", "pipeline", "gpipe_uneven", "interleaved"])
def test_two_processes_train_like_one(runs: dict[str, Run], name: str, tmp_path: Path) -> None:
    """Tensor parallel (2 ranks) and pipelines of 2 stages (1F1B; GPipe with stages of 1 and 3 layers and 2
    micro-batches; interleaved 1F1B with 4 stages on 2 ranks): per-step losses, the tied gradients and the
    consolidated final weights of one process at the same batch."""
    _check_parity(runs["single"], runs[name], tmp_path)
    assert "Traceback" not in runs[name].output


def test_the_split_is_what_was_asked(runs: dict[str, Run]) -> None:
    for name, line in (("tp", "Tensor parallel over 2 processes"),
                       ("pipeline", "Pipeline: 2 stages over 2 processes (blocks 0-1, blocks 2-3), schedule 1f1b"),
                       ("gpipe_uneven", "Pipeline: 2 stages over 2 processes (block 0, blocks 1-3), schedule gpipe"),
                       ("interleaved", "Pipeline: 4 stages over 2 processes (block 0, block 1, block 2, block 3)")):
        assert line in runs[name].output, f"{name}: {line!r} not in\n{runs[name].output[-3000:]}"


# ---- 2. bad input, one line each ---------------------------------------------------------------------------------
def test_a_tensor_parallel_degree_that_does_not_divide_the_processes_is_one_line(runs: dict[str, Run]) -> None:
    run = runs["bad_tp_world"]
    assert run.code != 0
    line = ("error: ConfigError: tensor_parallel_size=3 (trainer.strategy) must divide the 2 processes "
            "(trainer.devices x trainer.num_nodes)")
    assert line in run.output, run.output[-3000:]
    assert "Traceback" not in run.output


def test_a_stage_split_that_does_not_cover_the_layers_is_one_line(runs: dict[str, Run]) -> None:
    run = runs["bad_stages"]
    assert run.code != 0
    line = "error: ConfigError: trainer.strategy.stages=[[0, 1], [2, 4]] does not cover the model's 4 layers"
    assert line in run.output, run.output[-3000:]
    assert "Traceback" not in run.output


@pytest.mark.parametrize(("stages", "says"), [
    ([[0, 1], [2, 4]], "stage [2, 4] should start at 1"),
    ([[0, 2], [2, 3]], "it ends at 3"),
    ([[0, 4]], "has 1 stages but the pipeline has 2"),
    ([[0, 2], [2, 2], [2, 4]], "has 3 stages but the pipeline has 2"),
])
def test_stage_splits_that_do_not_cover_the_layers(stages: list, says: str) -> None:
    with pytest.raises(ConfigError, match="trainer.strategy.stages") as err:
        split_layers(4, 2, stages)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert "[[0, 2], [2, 4]]" in str(err.value)  # the even split, as an example


def test_even_splits_and_the_bubble() -> None:
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    assert split_layers(48, 4) == [(0, 12), (12, 24), (24, 36), (36, 48)]
    assert split_layers(5, 2) == [(0, 3), (3, 5)]
    assert split_layers(20, 2, [[0, 10], [10, 20]]) == [(0, 10), (10, 20)]
    with pytest.raises(ConfigError, match="cannot fill 4 pipeline stages"):
        split_layers(3, 4)
    assert bubble_share(4, 8) == pytest.approx(3 / 11)


def test_a_tensor_parallel_degree_that_does_not_divide_the_heads_is_one_line() -> None:
    model = GPTModel(GPTConfig(vocab_size=64, context_length=16, emb_dim=24, n_heads=3, n_layers=1))
    with pytest.raises(ConfigError, match=r"model.n_heads=3 is not a multiple of the tensor-parallel degree 2") as err:
        check_tensor_parallel(model, 2)
    assert "\n" not in str(err.value)
    check_tensor_parallel(model, 1)


# ---- 3. the pieces, in one process -------------------------------------------------------------------------------
def test_stages_chained_compute_the_gpts_logits() -> None:
    """The stages of a cut GPT, run one after another, give the uncut GPT's logits (tied head on the last stage)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=5, drop_rate=0.0,
                       tie_weights=True)
    model = GPTModel(config).eval()
    ids = torch.randint(0, 64, (3, 16))
    expected = model(ids)
    ranges = split_layers(5, 3)
    stages = cut_to_stages(model, ranges, owned=[0, 1, 2])
    assert all(isinstance(s, GPTStage) for s in stages)
    x = ids
    for stage in stages:
        x = stage(x)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    names = {name for stage in stages for name, _ in stage.named_parameters()}
    assert "trf_blocks.4.att.qkv.weight" in names and "out_head.weight" in names  # the GPT's names


def test_a_stage_keeps_only_its_modules_under_their_names() -> None:
    config = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=4, tie_weights=True)
    last = GPTModel(config)
    last.record_parameter_counts()  # as the task does before a strategy splits the model
    cut_to_stages(last, split_layers(4, 2), owned=[1])
    keys = set(last.state_dict())
    assert {k.split(".")[0] for k in keys} == {"trf_blocks", "final_norm", "out_head"}
    assert {int(k.split(".")[1]) for k in keys if k.startswith("trf_blocks")} == {2, 3}
    assert last.num_parameters() == GPTModel(config).num_parameters()  # counted before the cut


def test_qkv_rows_regrouped_by_rank_hold_whole_heads_and_convert_back() -> None:
    c, size = 8, 2
    weight = torch.arange(3 * c * 4, dtype=torch.float32).reshape(3 * c, 4)
    grouped = group_qkv_by_rank(weight, size)
    q, k, v = weight.split(c)
    for r, part in enumerate(grouped.chunk(size)):
        rows = slice(r * c // size, (r + 1) * c // size)
        torch.testing.assert_close(part, torch.cat([q[rows], k[rows], v[rows]]))
    torch.testing.assert_close(canonical_qkv_order(grouped, size), weight)
    bias = torch.arange(3 * c, dtype=torch.float32)
    torch.testing.assert_close(canonical_qkv_order(group_qkv_by_rank(bias, size), size), bias)


def test_consolidation_puts_weights_and_moments_back_in_order() -> None:
    weight = torch.randn(24, 8)
    grouped = group_qkv_by_rank(weight, 2)
    loaded = {"state_dict": {"model.trf_blocks.0.att.qkv.weight": grouped, "model.tok_emb.weight": weight},
              "optimizer_0": {"state": {"model.trf_blocks.0.att.qkv.weight": {"exp_avg": grouped, "step": torch.tensor(
                  3.0)}}, "param_groups": []}}
    out = canonical_state(loaded, {"kind": "tensor", "tensor_parallel_size": 2})
    torch.testing.assert_close(out["state_dict"]["model.trf_blocks.0.att.qkv.weight"], weight)
    torch.testing.assert_close(out["state_dict"]["model.tok_emb.weight"], weight)  # not a qkv: unchanged
    torch.testing.assert_close(out["optimizer_0"]["state"]["model.trf_blocks.0.att.qkv.weight"]["exp_avg"], weight)
    assert canonical_state(loaded, {"kind": "pipeline"}) is loaded


# ---- 4. resume -----------------------------------------------------------------------------------------------------
def test_resume_from_a_mid_run_checkpoint_is_exact(runs: dict[str, Run], corpus: Path, tmp_path: Path) -> None:
    """Tensor-parallel and pipeline runs resumed from their step-10 checkpoint directories train steps 10-19 with the
    uninterrupted runs' losses and end with their weights."""
    plans = {}
    for name, extra in (("tp", _devices(2, "lit_tp")), ("pipeline", _devices(2, "lit_pipeline"))):
        full = runs[name]
        full.check()
        assert (full.root / "step=000010.ckpt").is_dir()
        plans[name] = (2, B, [*extra, f"--ckpt_path={full.root / 'step=000010.ckpt'}"])
    resumed = _launch(plans, tmp_path, corpus)
    for name, run in resumed.items():
        run.check()
        full = runs[name]
        for rank in range(2):
            before = step_losses(read_batches(full.records, rank))
            after = step_losses(read_batches(run.records, rank))
            assert sorted(after) == list(range(10, STEPS))
            for step, loss in after.items():
                assert abs(loss - before[step]) <= 1e-6, f"{name} rank {rank} step {step}: {loss!r} vs {before[step]!r}"
        ends = [torch.load(consolidate(r.root / "last.ckpt", tmp_path / f"{name}.{i}.ckpt"),
                           weights_only=True)["state_dict"] for i, r in enumerate((full, run))]
        for key, value in ends[0].items():
            torch.testing.assert_close(ends[1][key], value, rtol=0, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")


def test_resuming_under_another_split_is_one_clear_error(runs: dict[str, Run], corpus: Path, tmp_path: Path) -> None:
    full = runs["pipeline"]
    full.check()
    bad = _launch({"other_split": (2, B, [*_devices(2, PIPELINE, "--trainer.strategy.stages=[[0,1],[1,4]]"),
                                          f"--ckpt_path={full.root / 'step=000010.ckpt'}"])}, tmp_path, corpus)
    run = bad["other_split"]
    assert run.code != 0
    assert "holds pipeline stages [[0, 2], [2, 4]] over 2 processes, this run [[0, 1], [1, 4]]" in run.output, \
        run.output[-3000:]
    assert "Traceback" not in run.output


# ---- 5. four processes ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp_fsdp", "pipeline4", "pipeline_ddp", "pipeline_fsdp"])
def test_four_processes_train_like_one(runs4: dict[str, Run], name: str, tmp_path: Path) -> None:
    """2-D (tensor-parallel pairs, FSDP2 across the 2 pairs at half the batch each), a pipeline of 4 stages, and 2
    pipelines of 2 stages side by side (gradients averaged, or each stage FSDP2-sharded over the two)."""
    _check_parity(runs4["single"], runs4[name], tmp_path)
