"""DPOTask: the loss against the paper's equation, the three reference modes, a reference that never moves, exact
resume, the responses before and after, every shipped config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from lit_llm.data import DPODataModule
from lit_llm.errors import ConfigError
from lit_llm.model.lora import is_lora_key
from lit_llm.tasks import DPOTask
from lit_llm.train import cli
from lit_llm.weights.files import torch_load

DPO_CONFIGS = sorted((ROOT / "configs" / "dpo").glob("*.yaml"))
SHAPE = dict(context_length=128, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=False, tie_weights=True)
SHAPE_ARGS = [f"--model.init_args.model.{k}={v}" for k, v in SHAPE.items()] + [
    "--model.init_args.speed.compile=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
    "--trainer.precision=32-true", "--trainer.enable_progress_bar=false", "--data.init_args.num_workers=0",
]
LORA = {"rank": 4, "alpha": 8, "targets": ["attention", "ff"]}
WORDS = ["river", "stone", "light", "cloud", "amber", "quiet", "north", "ember"]


def pair_records(n: int) -> list[dict[str, str]]:
    """Book-shaped preference records: repeat a word (chosen) rather than another one (rejected)."""
    return [
        {"instruction": f"Repeat the word {WORDS[i % 8]}.", "input": WORDS[(i + 3) % 8] if i % 3 == 0 else "",
         "output": WORDS[i % 8], "chosen": WORDS[i % 8], "rejected": WORDS[(i + 5) % 8], "id": f"p{i}"}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "instruction-data-with-preference.json"
    path.write_text(json.dumps(pair_records(60)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def start_ckpt(pairs_file, tmp_path_factory) -> Path:
    """A tiny instruction-finetuned checkpoint (10 steps of the instruct quickstart on the same records)."""
    root = tmp_path_factory.mktemp("instruct")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        cli(["fit", "--config", "configs/instruct/quickstart.yaml", *SHAPE_ARGS, f"--trainer.default_root_dir={root}",
             f"--data.init_args.source={pairs_file}", "--data.init_args.tokenizer=train",
             "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.batch_size=8",
             "--model.init_args.generate_after_fit=false", "--trainer.max_steps=10", "--trainer.val_check_interval=10",
             "--trainer.logger=false"])
    return root / "last.ckpt"


def dpo_args(config: Path, pairs: Path, start: Path, root: Path, *extra: str) -> list[str]:
    """A DPO config shrunk to a tiny offline run from the tiny instruction checkpoint."""
    return [
        "--config", str(config), *SHAPE_ARGS, f"--trainer.default_root_dir={root}",
        f"--data.init_args.source={pairs}", "--data.init_args.sha256=null", f"--data.init_args.tokenizer={start}",
        "--data.init_args.allowed_max_length=null", "--data.init_args.batch_size=4",
        f"--model.init_args.init_weights={start}", "--model.init_args.max_new_tokens=4", *extra,
    ]


@pytest.fixture(scope="module")
def data(pairs_file, start_ckpt) -> DPODataModule:
    dm = DPODataModule(source=str(pairs_file), tokenizer=str(start_ckpt), context_length=128, batch_size=4)
    dm.setup("fit")
    return dm


def task(start: Path, dm: DPODataModule, **kw) -> DPOTask:
    module = DPOTask(model=SHAPE, vocab_size=dm.vocab_size, init_weights=str(start), **kw)
    module.configure_model()
    module._datamodule = lambda: dm  # no Trainer in these tests
    return module


def perturb(module: DPOTask, seed: int = 0, lora_only: bool = False) -> None:
    """Move the policy away from the reference the same way in every module (a few optimizer steps' worth)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if lora_only and not is_lora_key(name):
                continue
            p.add_(torch.randn(p.shape, generator=generator) * (0.05 if is_lora_key(name) else 0.01))


# ---- the loss against an independent implementation of the paper's equation ---------------------------------------


def sequence_logprob(model: torch.nn.Module, prompt: list[int], response: list[int]) -> float:
    """log pi(response | prompt) of one unpadded example, token by token, written out from the definition: a softmax
    over the tokenizer's vocabulary (the head's rows beyond it, padding to a multiple of 64, are no tokens)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids[:, :-1]).float()[0, :, : model.config.vocab_size], dim=-1)
    return sum(log_probs[len(prompt) - 1 + t, token].item() for t, token in enumerate(response))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_rewards_and_margins_equal_the_papers_equation(loss_type, data, start_ckpt):
    beta = 0.3
    module = task(start_ckpt, data, beta=beta, loss_type=loss_type, reference="copy")
    perturb(module)
    items = [data.datasets["train"][i] for i in (0, 5, 9, 13)]
    batch = data.collate()(items)
    out = module.dpo_loss(batch, "train")

    policy, reference = module.model, module.reference_model
    losses, chosen_rewards, rejected_rewards, scale = [], [], [], 1.0
    for item in items:
        pi_w = sequence_logprob(policy, item["prompt"], item["chosen"])
        pi_l = sequence_logprob(policy, item["prompt"], item["rejected"])
        ref_w = sequence_logprob(reference, item["prompt"], item["chosen"])
        ref_l = sequence_logprob(reference, item["prompt"], item["rejected"])
        scale = max(scale, abs(pi_w), abs(pi_l), abs(ref_w), abs(ref_l))
        h = (pi_w - ref_w) - (pi_l - ref_l)
        if loss_type == "sigmoid":  # -log sigma(beta * h), the paper's equation 7
            losses.append(-math.log(1 / (1 + math.exp(-beta * h))))
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - beta * h))
        chosen_rewards.append(beta * (pi_w - ref_w))
        rejected_rewards.append(beta * (pi_l - ref_l))
    expected_margins = torch.tensor(chosen_rewards) - torch.tensor(rejected_rewards)
    # 1e-6 relative to the log-probabilities' size: float32 sums of |log p| ~ 10-20 carry about 1e-7 of it in rounding.
    tol = 1e-6 * scale
    assert abs(out.loss.item() - sum(losses) / len(losses)) < tol * max(1.0, abs(out.loss.item()))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(chosen_rewards), rtol=0, atol=tol)
    torch.testing.assert_close(out.rejected_rewards, torch.tensor(rejected_rewards), rtol=0, atol=tol)
    torch.testing.assert_close(out.margins, expected_margins, rtol=0, atol=tol)
    assert out.accuracy.item() == (expected_margins > 0).float().mean().item()
    assert expected_margins.abs().min() > 1e-3  # the perturbation really separated policy and reference
    # The policy's log-probabilities carry the gradient; the rewards do not.
    assert out.loss.requires_grad and not out.chosen_rewards.requires_grad


def test_mean_reduction_is_the_books_average_over_response_tokens(data, start_ckpt):
    module = task(start_ckpt, data, reference="copy", logprob_reduction="mean", beta=0.1)
    perturb(module)
    items = [data.datasets["train"][i] for i in (1, 2)]
    out = module.dpo_loss(data.collate()(items), "train")
    expected = []
    for item in items:
        pi_w = sequence_logprob(module.model, item["prompt"], item["chosen"]) / len(item["chosen"])
        ref_w = sequence_logprob(module.reference_model, item["prompt"], item["chosen"]) / len(item["chosen"])
        expected.append(0.1 * (pi_w - ref_w))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor(expected), rtol=0, atol=1e-6)  # means: |log p| < 10


# ---- the three reference modes ------------------------------------------------------------------------------------


def test_the_three_reference_modes_give_the_same_loss_on_the_same_batch(data, start_ckpt):
    batch = data.collate()([data.datasets["val"][i] for i in range(len(data.datasets["val"]))])
    modules = {}
    for mode in ("copy", "precomputed", "lora_off"):
        torch.manual_seed(0)  # the same LoRA initialisation, so that the three policies are one
        modules[mode] = task(start_ckpt, data, reference=mode, lora=LORA)
    modules["precomputed"]._ensure_reference_logprobs()  # what the first step does
    # At the start the policy is its reference: every mode gives ln 2 and zero rewards.
    for module in modules.values():
        out = module.dpo_loss(batch, "val")
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert out.margins.abs().max().item() < 1e-6
    for module in modules.values():
        perturb(module, lora_only=True)
    results = {mode: module.dpo_loss(batch, "val") for mode, module in modules.items()}
    copy = results["copy"]
    assert copy.margins.abs().max() > 1e-2 and copy.chosen_rewards.abs().min() > 1e-2  # the policy moved
    for mode in ("precomputed", "lora_off"):
        assert results[mode].loss.item() == pytest.approx(copy.loss.item(), abs=1e-6), mode
        torch.testing.assert_close(results[mode].chosen_rewards, copy.chosen_rewards, rtol=0, atol=1e-6)
        torch.testing.assert_close(results[mode].rejected_rewards, copy.rejected_rewards, rtol=0, atol=1e-6)


def test_lora_off_needs_lora_and_other_bad_settings(start_ckpt):
    with pytest.raises(ConfigError, match="model.reference=lora_off .* model.lora is not set"):
        DPOTask(model=SHAPE, reference="lora_off")
    with pytest.raises(ConfigError, match="model.beta=0 must be > 0"):
        DPOTask(model=SHAPE, beta=0)
    with pytest.raises(ConfigError, match="model.reference='frozen' must be copy, precomputed or lora_off"):
        DPOTask(model=SHAPE, reference="frozen")


# ---- training: the reference never moves, resume is exact -----------------------------------------------------------


CHECKPOINT_EVERY_3 = """
trainer:
  callbacks:
    - class_path: lit_llm.callbacks.RNGState
    - class_path: lit_llm.callbacks.Checkpoint
      init_args: {filename: "step={step:06d}", auto_insert_metric_name: false, every_n_train_steps: 3,
                  save_top_k: -1, save_last: true}
"""


def run(pairs: Path, start: Path, root: Path, *extra: str):
    """The quickstart config, tiny, saving step=000003.ckpt and step=000006.ckpt (a resume point mid-epoch)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "checkpointing.yaml").write_text(CHECKPOINT_EVERY_3, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return cli(["fit", *dpo_args(ROOT / "configs/dpo/quickstart.yaml", pairs, start, root),
                    "--config", str(root / "checkpointing.yaml"),
                    "--model.init_args.optim.schedule_steps=6", "--model.init_args.optim.learning_rate=3e-3",
                    "--trainer.val_check_interval=3", *extra])


def train_losses(root: Path) -> dict[int, float]:
    losses = {}
    for metrics in sorted((root / "logs").glob("version_*/metrics.csv")):
        lines = metrics.read_text().splitlines()
        header = lines[0].split(",")
        col, step = header.index("train/loss"), header.index("step")
        for line in lines[1:]:
            cells = line.split(",")
            if cells[col]:
                losses[int(cells[step])] = float(cells[col])
    return losses


@pytest.mark.parametrize("mode", ["copy", "precomputed", "lora_off"])
def test_reference_never_moves_and_resume_is_exact(mode, pairs_file, start_ckpt, tmp_path):
    lora = [f"--model.init_args.lora={json.dumps(LORA)}"] if mode == "lora_off" else []
    common = [f"--model.init_args.reference={mode}", *lora, "--trainer.log_every_n_steps=1",
              "--model.init_args.generate_before_fit=false", "--model.init_args.generate_after_fit=false"]
    straight = run(pairs_file, start_ckpt, tmp_path / "straight", *common, "--trainer.max_steps=6")
    module = straight.model
    vocab = module.config.vocab_size  # lit_llm's loader zeroes the head rows padding the vocabulary: compare the rest
    start_state = {k.removeprefix("model."): v[:vocab] if k.endswith(("tok_emb.weight", "out_head.weight")) else v
                   for k, v in torch_load(start_ckpt)["state_dict"].items()}

    def same(name: str, tensor: torch.Tensor) -> bool:
        return torch.equal(tensor.detach()[: len(start_state[name])], start_state[name])

    if mode == "copy":
        reference = module.reference_model
        assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
        for name, tensor in reference.state_dict().items():
            assert same(name, tensor), name
    elif mode == "lora_off":
        for name, p in module.model.named_parameters():
            if not is_lora_key(name):
                assert not p.requires_grad and same(name, p), name
    else:
        # The table is the starting model's log-probabilities of every pair, and it is what the checkpoint holds.
        fresh = task(start_ckpt, straight.datamodule, reference="copy")
        batch = straight.datamodule.collate()([straight.datamodule.datasets["train"][i] for i in range(8)])
        chosen, rejected = fresh.reference_logprobs_of(batch, "train")
        torch.testing.assert_close(module.reference_logprobs["train"][:8], torch.stack([chosen, rejected], 1),
                                   rtol=0, atol=1e-5)
        saved = torch_load(tmp_path / "straight" / "step=000006.ckpt")["dpo_reference_logprobs"]
        assert torch.equal(saved["train"], module.reference_logprobs["train"])
    trained = dict(module.model.named_parameters())
    moved = [n for n, p in trained.items() if p.requires_grad and (
        p.detach().abs().sum() > 0 if n.endswith("lora_B") else n in start_state and not same(n, p))]
    assert moved  # the policy trained (LoRA's B starts at zero)

    run(pairs_file, start_ckpt, tmp_path / "resumed", *common, "--trainer.max_steps=3")
    resumed = run(pairs_file, start_ckpt, tmp_path / "resumed", *common, "--trainer.max_steps=6",
                  f"--ckpt_path={tmp_path / 'resumed' / 'step=000003.ckpt'}")
    assert resumed.trainer.global_step == 6
    a, b = torch_load(tmp_path / "straight" / "step=000006.ckpt"), torch_load(tmp_path / "resumed" / "step=000006.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    straight_losses, resumed_losses = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert len(straight_losses) == 6 and straight_losses == resumed_losses


# ---- the run as a user sees it ------------------------------------------------------------------------------------


def test_fit_logs_the_books_metrics_and_writes_responses_before_and_after(pairs_file, start_ckpt, tmp_path):
    c = run(pairs_file, start_ckpt, tmp_path, "--trainer.max_steps=6", "--trainer.log_every_n_steps=1")
    metrics = (next((tmp_path / "logs").glob("version_*")) / "metrics.csv").read_text().splitlines()[0].split(",")
    for split in ("train", "val"):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
            assert f"{split}/{name}" in metrics
    assert "test/before_exact_match" in metrics and "test/exact_match" in metrics
    records = pair_records(60)[51:57]  # the book's split of 60: 51 train, 6 test, 3 validation
    for name in ("test_before_responses.json", "test_responses.json"):
        responses = json.loads((tmp_path / name).read_text())
        assert [list(r) for r in responses] == [[*record, "model_response"] for record in records]
        assert [{k: r[k] for k in records[0]} for r in responses] == records
    before = json.loads((tmp_path / "test_before_scores.json").read_text())
    after = json.loads((tmp_path / "test_scores.json").read_text())
    assert before["global_step"] == 0 and after["global_step"] == 6 and after["n_records"] == 6
    assert c.model.test_scores["exact_match"] == after["exact_match"]
    ckpt = torch_load(tmp_path / "last.ckpt")
    assert ckpt["hyper_parameters"]["prompt_template"] == "alpaca" and ckpt["hyper_parameters"]["beta"] == 0.1


@pytest.mark.parametrize("config", DPO_CONFIGS, ids=lambda p: p.name)
def test_dpo_config_fast_dev_run(config, pairs_file, start_ckpt, tmp_path, in_repo_root):
    """Every YAML in configs/dpo runs offline: local pairs and the tiny starting checkpoint in place of the real."""
    c = cli(["fit", *dpo_args(config, pairs_file, start_ckpt, tmp_path), "--trainer.fast_dev_run=true"])
    assert isinstance(c.model, DPOTask) and isinstance(c.datamodule, DPODataModule)
    assert c.trainer.state.finished and c.trainer.global_step == 1
    loss = c.trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
