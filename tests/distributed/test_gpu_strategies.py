"""Every named strategy on 2 GPUs against one GPU, through ``python -m lit_llm.train fit``.

For each strategy, at the same global batch as one GPU (16 sequences: 8 per GPU on 2 GPUs):

- **float32**: the 2-GPU losses of the first 20 steps equal the one-GPU run's (no strategy) within ``FP32_TOL``.
  In float32 the only difference is the order of the sums, so this proves that sharding and reduction are right.
- **bf16-mixed**: the 2-GPU losses stay as close to the same strategy on one GPU as accumulating two half batches
  on one GPU stays to the full batch (the ``bf16 tolerance``, measured in the same session), and the gap of every
  strategy to plain one-GPU bf16-mixed is reported. The same strategy is the reference because DeepSpeed's and
  FSDP's bf16 modes compute with bf16 weights (so a bf16 residual stream), not with float32 weights under autocast
  as the other runs: a different, intended numerics that is not a distribution effect.
- A checkpoint at step 10, resumed to step 20: the losses continue as in the uninterrupted run.
- The final checkpoint (consolidated into one file for FSDP / DeepSpeed) generates, through
  ``python -m lit_llm.generate``, the same greedy text as the live model did at the end of training.

Every run is its own process; they run side by side, spread over the GPUs (several small runs share a GPU).

    python -m pytest -m gpu tests/distributed/test_gpu_strategies.py -v -s
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from support import ROOT, cuda_visible

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]

GPUS = torch.cuda.device_count()
STRATEGIES = ["lit_ddp", "lit_fsdp", "lit_fsdp2", "lit_deepspeed_zero2", "lit_deepspeed_zero3"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
PROMPT = "The function returns"
BATCH = 8  # per GPU; the one-GPU references take 2 x BATCH
STEPS = 20
#: float32, same global batch: only the order of the sums differs (the quickstart model's losses are ~5-8).
FP32_TOL = 2e-3
#: The bf16 tolerance is this many times the largest gap that accumulation alone makes on one GPU (at least FLOOR).
BF16_FACTOR = 2.0
BF16_FLOOR = 0.02
RESUME_TOL = 0.02


def _callbacks_yaml(folder: Path, save: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = textwrap.dedent("""\
        - class_path: lit_llm.callbacks.RNGState
        - class_path: lit_llm.callbacks.Checkpoint
          init_args:
            filename: "step={step:06d}"
            auto_insert_metric_name: false
            every_n_train_steps: 10
            save_top_k: -1
            save_last: true
    """) if save else ""
    probe = textwrap.dedent(f"""\
        - class_path: strategy_probe.StrategyProbe
          init_args:
            folder: {folder}
            prompt: "{PROMPT}"
    """)
    path = folder / "callbacks.yaml"
    path.write_text("trainer:\n  callbacks:\n" + textwrap.indent(checkpoint + probe, "    "), encoding="utf-8")
    return path


def _env(gpus: list[int]) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=cuda_visible(gpus, GPUS),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("LIT_LLM_CACHE", str(ROOT / ".pytest_cache" / "lit_llm_gpu"))
    return env


def _fit(root: Path, gpus: list[int], strategy: str | None, batch: int, folder: Path, *extra: str,
         precision: str = "bf16-mixed", save: bool = False) -> dict:
    cmd = [sys.executable, "-m", "lit_llm.train", "fit", "--config", str(ROOT / "configs/pretrain/quickstart.yaml"),
           "--config", str(_callbacks_yaml(folder, save=save)),
           "--model.init_args.model.drop_rate=0.0", "--model.init_args.model.tie_weights=false",
           # A learning rate and warmup the loss follows smoothly: at a loss spike, bf16 rounding differences between
           # two otherwise equal runs are amplified into large gaps that say nothing about the strategy.
           "--model.init_args.optim.learning_rate=1e-3", "--model.init_args.optim.warmup_steps=5",
           "--model.init_args.speed.compile=false",
           f"--data.init_args.batch_size={batch}", "--data.init_args.num_workers=2",
           "--trainer.accelerator=gpu", f"--trainer.devices={len(gpus)}", f"--trainer.precision={precision}",
           f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
           "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", *extra]
    if strategy is not None:
        cmd.append(f"--trainer.strategy={strategy}")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(gpus), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}"
    record = json.loads((folder / "probe.json").read_text())
    record["losses"] = {int(k): v for k, v in record["losses"].items()}
    return record


def _generate(checkpoint: Path, gpu: int, dtype: str) -> str:
    cmd = [sys.executable, "-m", "lit_llm.generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT,
           "--max-new-tokens", "16", "--temperature", "0", "--dtype", dtype, "--device", "cuda", "--format", "jsonl"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env([gpu]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["completion"]


def _pipeline(strategy: str, gpus: list[int], base: Path) -> dict:
    root = base / strategy
    full = _fit(root, gpus, strategy, BATCH, root / "full", save=True)
    resumed = _fit(root, gpus, strategy, BATCH, root / "resumed", f"--ckpt_path={root / 'step=000010.ckpt'}")
    last = root / "last.ckpt"
    if last.is_dir():
        single = root / "consolidated.ckpt"
        proc = subprocess.run([sys.executable, "-m", "lit_llm.convert", "consolidate", str(last), str(single)],
                              cwd=ROOT, env=_env(gpus[:1]), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        single = last
    # The live model ran in bf16 under FSDP (mixed precision gathers bf16 weights) and DeepSpeed (bf16 weights), in
    # float32 under DDP (float32 weights, no autocast outside the training step): generate in the same dtype.
    dtype = "float32" if strategy == "lit_ddp" else "bfloat16"  # FSDP2 too: its policy gathers bf16 weights
    return {"full": full, "resumed": resumed, "generated": _generate(single, gpus[0], dtype),
            "checkpoint_kind": "directory" if last.is_dir() else "file"}


class _GpuPool:
    """Hands out the least-loaded GPU, or the least-loaded aligned pair, to each run (runs may share a GPU)."""

    def __init__(self, n: int) -> None:
        self.load = [0] * n
        self.lock = threading.Lock()

    def take(self, count: int) -> list[int]:
        with self.lock:
            groups = [list(range(i, i + count)) for i in range(0, len(self.load) - count + 1, count)]
            chosen = min(groups, key=lambda g: sum(self.load[i] for i in g))
            for i in chosen:
                self.load[i] += 1
            return chosen

    def give(self, gpus: list[int]) -> None:
        with self.lock:
            for i in gpus:
                self.load[i] -= 1

    def on(self, count: int, fn, *args):
        """``fn(gpus, *args)`` on ``count`` GPUs taken from the pool for the call."""
        gpus = self.take(count)
        try:
            return fn(gpus, *args)
        finally:
            self.give(gpus)


def _setup(tmp_path_factory, name: str, strategies: list[str]) -> tuple[Path, _GpuPool, list[str]]:
    if GPUS < 2:
        pytest.skip("needs at least 2 CUDA GPUs")
    wanted = [s for s in strategies if HAS_DEEPSPEED or "deepspeed" not in s]
    return tmp_path_factory.mktemp(name), _GpuPool(GPUS), wanted


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base, pool, wanted = _setup(tmp_path_factory, "strategies", STRATEGIES)
    on = pool.on

    def one_gpu(name: str, strategy: str | None, *extra: str, precision: str = "bf16-mixed", batch: int = 2 * BATCH):
        return lambda gpus: _fit(base / name, gpus, strategy, batch, base / name / "probe", *extra,
                                 precision=precision)

    def two_gpus_fp32(strategy: str):
        return lambda gpus: _fit(base / f"{strategy}-fp32", gpus, strategy, BATCH, base / f"{strategy}-fp32" / "probe",
                                 precision="32-true")

    with ThreadPoolExecutor(max_workers=4 + 3 * len(wanted)) as ex:
        jobs = {
            "one_gpu": ex.submit(on, 1, one_gpu("one_gpu", None)),
            "one_gpu_accumulated": ex.submit(on, 1, one_gpu("one_gpu_accumulated", None,
                                                            "--trainer.accumulate_grad_batches=2", batch=BATCH)),
            "one_gpu_fp32": ex.submit(on, 1, one_gpu("one_gpu_fp32", None, precision="32-true")),
        }
        for s in wanted:
            jobs[s] = ex.submit(on, 2, lambda gpus, s=s: _pipeline(s, gpus, base))
            jobs[f"{s}/fp32"] = ex.submit(on, 2, two_gpus_fp32(s))
            jobs[f"{s}/one_gpu"] = ex.submit(on, 1, one_gpu(f"{s}-one_gpu", s))
        results = {name: job.result() for name, job in jobs.items()}
    results["base"] = str(base)
    (base / "summary.json").write_text(json.dumps(results, indent=2, default=str))
    try:  # a report for the docs; the tests below make the assertions
        noise = _gaps(results["one_gpu_accumulated"]["losses"], results["one_gpu"]["losses"])
        print(json.dumps({s: _summary(results, s) for s in wanted} | {
            "accumulation_noise": noise, "bf16_tolerance": _bf16_tolerance(results),
            "losses": {name: r["losses"] for name, r in results.items() if isinstance(r, dict) and "losses" in r},
        }, indent=2))
    except Exception as e:  # noqa: BLE001
        print(f"summary failed: {e!r}")
    return results


def _gaps(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return {s: abs(a[s] - b[s]) for s in a}


def _bf16_tolerance(runs: dict) -> float:
    noise = _gaps(runs["one_gpu_accumulated"]["losses"], runs["one_gpu"]["losses"])
    return max(BF16_FLOOR, BF16_FACTOR * max(noise.values()))


def _start_gap(a: dict, b: dict) -> float | None:
    """The largest difference between the two runs' per-parameter sums at the start of training."""
    if not a.get("start_sums") or not b.get("start_sums"):
        return None
    common = set(a["start_sums"]) & set(b["start_sums"])
    return max((abs(a["start_sums"][k] - b["start_sums"][k]) for k in common), default=None)


def _summary(runs: dict, strategy: str) -> dict:
    run = runs[strategy]
    full, resumed = run["full"]["losses"], run["resumed"]["losses"]
    return {
        "fp32_gap_to_one_gpu": max(_gaps(runs[f"{strategy}/fp32"]["losses"], runs["one_gpu_fp32"]["losses"]).values()),
        "bf16_gap_to_same_strategy_one_gpu": max(_gaps(full, runs[f"{strategy}/one_gpu"]["losses"]).values()),
        "bf16_gap_to_plain_one_gpu": max(_gaps(full, runs["one_gpu"]["losses"]).values()),
        "resume_gap": max(_gaps(resumed, {s: full[s] for s in resumed}).values()),
        "first_last_loss": (full[1], full[STEPS]),
        "start_weights_gap_to_plain_one_gpu": _start_gap(runs[f"{strategy}/one_gpu"], runs["one_gpu"]),
        "first_batch_sums": (run["full"]["first_batch_sum"], runs["one_gpu"]["first_batch_sum"]),
        "live": run["full"]["generated"], "from_checkpoint": run["generated"],
    }


def _run(runs: dict, strategy: str) -> dict:
    if strategy not in runs:
        pytest.skip("deepspeed is not installed")
    return runs[strategy]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp32_two_gpus_match_one_gpu_at_the_same_global_batch(strategy, runs):
    two, one = _run(runs, f"{strategy}/fp32"), runs["one_gpu_fp32"]
    assert two["world_size"] == 2 and two["dtype"] == "float32"
    assert sorted(two["losses"]) == list(range(1, STEPS + 1))
    assert two["losses"][STEPS] < two["losses"][1] - 0.3  # it learns
    gaps = _gaps(two["losses"], one["losses"])
    assert max(gaps.values()) < FP32_TOL, gaps


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16_two_gpus_match_one_gpu_within_the_accumulation_noise(strategy, runs):
    full, one = _run(runs, strategy)["full"], runs[f"{strategy}/one_gpu"]
    assert full["world_size"] == 2 and one["world_size"] == 1
    assert full["losses"][STEPS] < full["losses"][1] - 0.3
    gaps = _gaps(full["losses"], one["losses"])
    assert max(gaps.values()) < _bf16_tolerance(runs), gaps


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resumed_at_step_10_continues_like_the_uninterrupted_run(strategy, runs):
    run = _run(runs, strategy)
    full, resumed = run["full"]["losses"], run["resumed"]["losses"]
    assert sorted(resumed) == list(range(11, STEPS + 1))
    gaps = {s: abs(resumed[s] - full[s]) for s in resumed}
    assert max(gaps.values()) < RESUME_TOL, gaps


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_single_file_checkpoint_generates_like_the_live_model(strategy, runs):
    run = _run(runs, strategy)
    assert run["checkpoint_kind"] == ("file" if strategy == "lit_ddp" else "directory")
    assert run["generated"] == run["full"]["generated"] and len(run["generated"]) > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_logged_gradient_norm_is_the_global_one_at_every_step(strategy, runs):
    """``train/grad_norm`` is logged for every optimizer step under every strategy (DeepSpeed's from its engine), and in
    float32 it is the one-GPU run's norm: the norm of the whole averaged gradient, not of one rank's shard (which
    would be about 1/sqrt(2) of it on 2 GPUs) nor of one rank's own gradient."""
    norms = {int(k): v for k, v in _run(runs, strategy)["full"]["grad_norms"].items()}
    assert sorted(norms) == list(range(1, STEPS + 1))
    assert all(v is not None and 0 < v < float("inf") for v in norms.values()), norms
    assert len(set(norms.values())) == STEPS, norms  # a norm no longer logged would repeat the last one
    fp32 = {int(k): v for k, v in runs[f"{strategy}/fp32"]["grad_norms"].items()}
    reference = {int(k): v for k, v in runs["one_gpu_fp32"]["grad_norms"].items()}
    for step in (1, 2, 3):  # before the float32 runs' rounding differences have had steps to grow
        assert abs(fp32[step] - reference[step]) <= 0.02 * reference[step], (step, fp32, reference)


#: Presets checked only for training: each runs MORE_STEPS on 2 GPUs and must learn.
MORE_PRESETS = ["lit_fsdp_hybrid", "lit_fsdp_offload", "lit_deepspeed_zero1", "lit_deepspeed_zero3_offload"]
MORE_STEPS = 8


@pytest.fixture(scope="module")
def more_runs(tmp_path_factory) -> dict:
    base, pool, wanted = _setup(tmp_path_factory, "more_strategies", MORE_PRESETS)

    def fit(gpus: list[int], strategy: str) -> dict:
        return _fit(base / strategy, gpus, strategy, BATCH, base / strategy / "probe",
                    f"--trainer.max_steps={MORE_STEPS}", "--model.init_args.optim.learning_rate=3e-3",
                    "--model.init_args.optim.warmup_steps=2")

    with ThreadPoolExecutor(max_workers=len(wanted)) as ex:
        jobs = {s: ex.submit(pool.on, 2, fit, s) for s in wanted}
        # Each test re-raises its own run's failure, so one broken preset does not hide the others' results.
        return {s: job.exception() or job.result() for s, job in jobs.items()}


@pytest.mark.parametrize("strategy", MORE_PRESETS)
def test_the_other_presets_train_on_two_gpus(strategy, more_runs):
    if strategy not in more_runs:
        pytest.skip("deepspeed is not installed")
    run = more_runs[strategy]
    if isinstance(run, BaseException):
        raise run
    assert run["world_size"] == 2
    assert sorted(run["losses"]) == list(range(1, MORE_STEPS + 1))
    assert run["losses"][MORE_STEPS] < run["losses"][1] - 0.3, run["losses"]
