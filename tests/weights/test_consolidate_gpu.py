"""Consolidating real FSDP and DeepSpeed checkpoints of 2-GPU ``python -m lit_llm.train fit`` runs.

Each strategy trains a tiny GPT for a few steps on 2 GPUs (bf16-mixed) and saves ``last.ckpt`` as a directory; a
callback (``consolidate_helpers.py``) records what the live model computes at the end of training: the logits
of a fixed prompt and its greedy continuation. ``python -m lit_llm.convert consolidate`` then makes one file of the
directory, and the tests check that

- its weights equal, bit for bit, what Lightning's own consolidation gives (``_load_distributed_checkpoint`` for
  FSDP, ``convert_zero_checkpoint_to_fp32_state_dict`` and so DeepSpeed's ``zero_to_fp32`` for DeepSpeed);
- the model read from it, in the dtype the live model computed in, gives the live model's logits and greedy tokens;
- with ``--keep-optimizer`` (FSDP), the file resumes the run on one GPU without a sharded strategy.

Lightning's own strategies are used (``FSDPStrategy`` with sharded checkpoints, ``deepspeed_stage_2``,
``deepspeed_stage_3``), two at a time on separate GPU pairs when the machine has four GPUs.

    python -m pytest -m gpu tests/weights/test_consolidate_gpu.py -v
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from support import ROOT, cuda_visible

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
STEPS = 4
STRATEGIES = {
    "fsdp": ["--trainer.strategy=pytorch_lightning.strategies.FSDPStrategy",
             "--trainer.strategy.state_dict_type=sharded"],
    "deepspeed_stage_2": ["--trainer.strategy=deepspeed_stage_2"],
    # ZeRO-3 partitions each parameter as it is built; an untied head keeps that simple.
    "deepspeed_stage_3": ["--trainer.strategy=deepspeed_stage_3", "--model.init_args.model.tie_weights=false"],
}
#: The consolidated model runs the live model's computation with the same bf16 weights, outside the strategy's
#: wrapper: equal up to the order of a few reductions.
LOGITS_TOL = 2e-2


def _env(gpus: list[int]) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=cuda_visible(gpus, GPUS), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # DeepSpeed's op builder reads TORCH_CUDA_ARCH_LIST as plain major.minor numbers ("9.0a" fails).
    if env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", env["TORCH_CUDA_ARCH_LIST"])
    return env


def _run(cmd: list[str], gpus: list[int]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(gpus), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc


def _fit(root: Path, gpus: list[int], *extra: str) -> dict:
    probe = root / "live.pt"
    callbacks = ("[{class_path: lit_llm.callbacks.Checkpoint, init_args: {save_last: true}}, "
                 f"{{class_path: consolidate_helpers.LiveGreedy, init_args: {{out: '{probe}'}}}}]")
    _run([sys.executable, "-m", "lit_llm.train", "fit", "--config", str(ROOT / "configs/pretrain/quickstart.yaml"),
          "--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=64",
          "--model.init_args.model.n_heads=2", "--model.init_args.model.context_length=64",
          "--model.init_args.model.drop_rate=0.0", "--model.init_args.optim.warmup_steps=1",
          "--model.init_args.speed.compile=false", "--data.init_args.tokenizer_vocab_size=300",
          "--data.init_args.batch_size=8", "--data.init_args.num_workers=0", "--trainer.accelerator=gpu",
          f"--trainer.devices={len(gpus)}", "--trainer.precision=bf16-mixed", f"--trainer.max_steps={STEPS}",
          "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
          f"--trainer.callbacks={callbacks}", *extra], gpus)
    return torch.load(probe, weights_only=True)


def _consolidate(directory: Path, out: Path, gpus: list[int], *flags: str) -> str:
    proc = _run([sys.executable, "-m", "lit_llm.convert", "consolidate", str(directory), str(out), *flags], gpus)
    return proc.stdout.strip()


def _pipeline(name: str, base: Path, gpus: list[int]) -> dict:
    root = base / name
    live = _fit(root, gpus, *STRATEGIES[name])
    last = root / "last.ckpt"
    record = {"live": live, "is_dir": last.is_dir(), "last": last, "root": root,
              "summary": _consolidate(last, root / "consolidated.ckpt", gpus[:1])}
    if name == "fsdp":
        record["full_summary"] = _consolidate(root, root / "full.ckpt", gpus[:1], "--keep-optimizer")
        record["resumed"] = _fit(root / "resumed", gpus[:1], f"--ckpt_path={root / 'full.ckpt'}",
                                 f"--trainer.max_steps={STEPS + 2}")
    return record


def _selected(session: pytest.Session) -> set[str]:
    """The strategies the selected tests of this module use (``-k fsdp`` runs FSDP alone)."""
    names = set()
    for item in session.items:
        if item.module is not None and item.module.__name__ == __name__:
            callspec = getattr(item, "callspec", None)
            names.add(callspec.params["name"] if callspec is not None else "fsdp")
    return names


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, dict]:
    if GPUS < 2:
        pytest.skip(f"needs at least 2 CUDA GPUs (found {GPUS})")
    base = tmp_path_factory.mktemp("consolidate_gpu")
    pairs: queue.Queue[list[int]] = queue.Queue()
    for first in range(0, GPUS - 1, 2):
        pairs.put([first, first + 1])
    selected = _selected(request.session)
    wanted = [name for name in STRATEGIES if name in selected and (HAS_DEEPSPEED or not name.startswith("deepspeed"))]

    def on_a_pair(name: str) -> dict:
        gpus = pairs.get()
        try:
            return _pipeline(name, base, gpus)
        finally:
            pairs.put(gpus)

    with ThreadPoolExecutor(max_workers=pairs.qsize()) as pool:
        futures = {name: pool.submit(on_a_pair, name) for name in wanted}
        return {name: future.result() for name, future in futures.items()}


def _record(runs: dict, name: str) -> dict:
    if name not in runs:
        pytest.skip("deepspeed is not installed")
    return runs[name]


def _reference_state(name: str, last: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The weights as Lightning's own consolidation utilities give them."""
    if name == "fsdp":
        from lightning_fabric.utilities.load import _load_distributed_checkpoint
        from pytorch_lightning.utilities.consolidate_checkpoint import _format_checkpoint

        return _format_checkpoint(_load_distributed_checkpoint(last))["state_dict"]
    from pytorch_lightning.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    return convert_zero_checkpoint_to_fp32_state_dict(last, scratch / "lightning_fp32.pt")["state_dict"]


def _check_against_live(record: dict) -> None:
    from lit_llm.model.sampling import generate
    from lit_llm.weights.readers import load_model_for_inference

    live = record["live"]
    assert live["world_size"] == 2
    dtype = getattr(torch, live["dtype"])
    model, tokenizer, meta = load_model_for_inference(str(record["root"] / "consolidated.ckpt"), device="cuda",
                                                      dtype=dtype)
    assert meta["global_step"] == STEPS and tokenizer is not None
    prompt = live["prompt_ids"].cuda()
    with torch.no_grad():
        logits = model(prompt)[0, -1].float().cpu()
        ids = generate(model, prompt, live["ids"].shape[1] - prompt.shape[1]).cpu()
    vocab = model.config.vocab_size  # the padding rows are not weights: readers start them at zero
    gap = (logits[:vocab] - live["logits"][:vocab]).abs().max().item()
    assert gap <= LOGITS_TOL, f"logits differ from the live model's by {gap}"
    assert torch.equal(ids, live["ids"]), (ids.tolist(), live["ids"].tolist())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_consolidated_weights_are_lightnings_and_the_live_models(name, runs, tmp_path):
    record = _record(runs, name)
    assert record["is_dir"], "the strategy saved last.ckpt as one file: nothing was sharded"
    kind = "FSDP" if name == "fsdp" else "DeepSpeed"
    assert record["summary"].startswith(f"wrote {record['root'] / 'consolidated.ckpt'}") and kind in record["summary"]
    ours = torch.load(record["root"] / "consolidated.ckpt", weights_only=True)
    reference = _reference_state(name, record["last"], tmp_path)
    reference = {k.removeprefix("_forward_module."): v for k, v in reference.items()}
    assert set(reference) <= set(ours["state_dict"])
    for key, value in reference.items():
        assert ours["state_dict"][key].dtype == torch.float32 == value.dtype, key
        assert torch.equal(ours["state_dict"][key], value), key
    assert {"hyper_parameters", "model_config", "PretrainDataModule", "tokens_seen"} <= set(ours)
    assert "optimizer_states" not in ours
    _check_against_live(record)


def test_fsdp_keep_optimizer_resumes_on_one_gpu(runs):
    from lit_llm.model.config import GPTConfig
    from lit_llm.model.gpt import GPTModel
    from lit_llm.tasks.optim import parameter_groups

    record = _record(runs, "fsdp")
    assert "optimizer state kept" in record["full_summary"]
    full = torch.load(record["root"] / "full.ckpt", weights_only=True)
    [optimizer] = full["optimizer_states"]
    # Indexed as a plain AdamW indexes its state: position i holds the moments of the i-th parameter of the groups.
    task = torch.nn.Module()
    task.model = GPTModel(GPTConfig.from_dict(full["model_config"]))
    names = {id(p): n for n, p in task.named_parameters()}
    hp = full["hyper_parameters"]
    order = [names[id(p)] for g in parameter_groups(task, hp["weight_decay"], hp["decay_all"]) for p in g["params"]]
    assert [i for g in optimizer["param_groups"] for i in g["params"]] == list(range(len(order)))
    for i, name in enumerate(order):
        assert optimizer["state"][i]["exp_avg"].shape == full["state_dict"][name].shape, name
    assert full["lr_schedulers"] and full["loops"]
    resumed = record["resumed"]  # fit --ckpt_path full.ckpt on one GPU, no strategy, to step STEPS + 2
    assert resumed["world_size"] == 1
    last = torch.load(record["root"] / "resumed" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS + 2 and last["tokens_seen"] > full["tokens_seen"]
