"""``lit_llm.weights.consolidate`` and ``python -m lit_llm.convert consolidate``: sharded checkpoint directories ->
one file.

The FSDP directories here are real ``torch.distributed.checkpoint`` directories, written by the same Lightning
function and in the same layout as ``FSDPStrategy.save_checkpoint(state_dict_type="sharded")`` writes them (the DCP
shards of ``{"model": ..., "optimizer_0": ...}`` plus ``meta.pt`` with the rest), from the checkpoint of a real tiny
``fit``; the optimizer state is keyed by parameter name, as ``FSDP.optim_state_dict`` keys it. DCP needs no process
group for this in one process. DeepSpeed directories need DeepSpeed and GPUs to be made: the real ones are tested in
``test_consolidate_gpu.py``; here a stand-in for DeepSpeed's ``zero_to_fp32`` exercises everything around it.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from support import ROOT
from weights_helpers import deepspeed_objects, deepspeed_optimizer_state

from lit_llm.convert import main as convert_main
from lit_llm.errors import CheckpointError
from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import generate
from lit_llm.tasks.optim import parameter_groups
from lit_llm.train import cli
from lit_llm.weights.consolidate import consolidate
from lit_llm.weights.discovery import FSDP_META_FILE, detect_kind, sharded_kind
from lit_llm.weights.readers import load_model_for_inference, load_weights

TEXT = ("It had always been his fate to have his judgement questioned, and his work admired by those who never "
        "understood it. The sketch of the donkey was the last thing he painted before he gave it up. ")
TINY = ["--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32", "--model.init_args.model.n_heads=2",
        "--model.init_args.model.context_length=32", "--model.init_args.speed.compile=false"]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
CALLBACKS = ("--trainer.callbacks=[{class_path: lit_llm.callbacks.RNGState}, "
             "{class_path: lit_llm.callbacks.Checkpoint, init_args: {save_last: true}}]")


def _pretrain_args(root: Path, text: Path) -> list[str]:
    return ["--config", str(ROOT / "configs/pretrain/quickstart.yaml"), *TINY, "--model.init_args.optim.warmup_steps=1",
            f"--data.init_args.source={text}",
            "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4", f"--trainer.default_root_dir={root}", "--trainer.limit_val_batches=0",
            *QUIET, CALLBACKS]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory from a three-step `lit_llm.train fit` of a tiny tied GPT (last.ckpt, tokenizer.json)."""
    root = tmp_path_factory.mktemp("run")
    (root / "text.txt").write_text(TEXT * 30)
    cli(["fit", *_pretrain_args(root, root / "text.txt"), "--trainer.max_steps=3"])
    assert (root / "last.ckpt").is_file()
    return root


def _parameter_names(checkpoint: dict) -> list[str]:
    """The task's parameter names in the order of its optimizer's groups, the order the optimizer state indexes."""
    hp = checkpoint["hyper_parameters"]["optim"]
    task = torch.nn.Module()
    task.model = GPTModel(GPTConfig.from_dict(checkpoint["model_config"]))
    names = {id(p): name for name, p in task.named_parameters()}
    return [names[id(p)] for g in parameter_groups(task, hp["weight_decay"], hp["decay_all"]) for p in g["params"]]


def write_fsdp_checkpoint(checkpoint_file: Path, directory: Path, *, list_tied_head: bool = True) -> Path:
    """What ``FSDPStrategy.save_checkpoint`` writes for the checkpoint in ``checkpoint_file``."""
    from lightning_fabric.strategies.fsdp import _distributed_checkpoint_save

    checkpoint = torch.load(checkpoint_file, weights_only=True)
    names = _parameter_names(checkpoint)
    converted = {"model": checkpoint.pop("state_dict")}
    if not list_tied_head:  # a shared parameter may be listed once
        del converted["model"]["model.out_head.weight"]
    for i, optimizer in enumerate(checkpoint.pop("optimizer_states")):
        # FSDP.optim_state_dict keys the state, and lists the groups' parameters, by name.
        assert len(names) == len(optimizer["state"]) == sum(len(g["params"]) for g in optimizer["param_groups"])
        converted[f"optimizer_{i}"] = {
            "state": {names[k]: v for k, v in optimizer["state"].items()},
            "param_groups": [{**g, "params": [names[k] for k in g["params"]]} for g in optimizer["param_groups"]],
        }
    directory.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group, which is what we want
        _distributed_checkpoint_save(converted, directory)
    torch.save(checkpoint, directory / FSDP_META_FILE)
    return directory


@pytest.fixture(scope="module")
def fsdp_run(run, tmp_path_factory) -> Path:
    """A run directory whose last.ckpt is an FSDP sharded checkpoint directory (of ``run``'s last.ckpt)."""
    root = tmp_path_factory.mktemp("fsdp_run")
    write_fsdp_checkpoint(run / "last.ckpt", root / "last.ckpt")
    return root


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)  # what lit_llm's readers do: no pickled objects accepted


# ---- FSDP --------------------------------------------------------------------------------------------------------


def test_the_fsdp_layout_is_lightnings(fsdp_run):
    from lightning_fabric.strategies.fsdp import _is_sharded_checkpoint
    from lightning_fabric.utilities.load import _METADATA_FILENAME

    assert FSDP_META_FILE == _METADATA_FILENAME
    directory = fsdp_run / "last.ckpt"
    assert _is_sharded_checkpoint(directory)  # how Lightning's FSDP strategy recognises its own checkpoints
    assert {p.name for p in directory.iterdir()} == {".metadata", "__0_0.distcp", "meta.pt"}
    assert detect_kind(directory) == "fsdp" == sharded_kind(directory)


@pytest.mark.parametrize("list_tied_head", [True, False])
def test_fsdp_weights_come_out_bit_for_bit(run, list_tied_head, tmp_path):
    directory = write_fsdp_checkpoint(run / "last.ckpt", tmp_path / "step=000003.ckpt", list_tied_head=list_tied_head)
    out = consolidate(directory, tmp_path / "out" / "one.ckpt")
    assert out == tmp_path / "out" / "one.ckpt" and not (tmp_path / "out" / "one.ckpt.tmp").exists()
    original, merged = _load(run / "last.ckpt"), _load(out)
    assert set(merged["state_dict"]) == set(original["state_dict"])
    for name, tensor in original["state_dict"].items():
        assert merged["state_dict"][name].dtype == tensor.dtype and torch.equal(merged["state_dict"][name], tensor)
    # The tied head is the embedding under a second name, as in a single-device checkpoint.
    sd = merged["state_dict"]
    assert sd["model.out_head.weight"].data_ptr() == sd["model.tok_emb.weight"].data_ptr()
    for key in ("hyper_parameters", "model_config", "tokens_seen", "PretrainDataModule", "global_step", "epoch",
                "loops", "datamodule_hyper_parameters"):
        assert merged[key] == original[key], key
    assert merged["callbacks"].keys() == original["callbacks"].keys()
    # Weights only by default: what ModelCheckpoint(save_weights_only=True) leaves out.
    assert "optimizer_states" not in merged and "lr_schedulers" not in merged


# Resuming in another folder than the checkpoint's: Lightning says it will not reload the best-k bookkeeping.
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_keep_optimizer_resumes_like_the_original(run, fsdp_run, tmp_path):
    """With --keep-optimizer the file resumes a run without FSDP, exactly as the unsharded checkpoint does."""
    out = consolidate(fsdp_run, tmp_path / "full.ckpt", keep_optimizer=True)  # the run directory: its last.ckpt
    original, merged = _load(run / "last.ckpt"), _load(out)
    assert merged["lr_schedulers"] == original["lr_schedulers"]
    [mine], [theirs] = merged["optimizer_states"], original["optimizer_states"]
    assert mine["param_groups"] == theirs["param_groups"]  # parameters by index again
    assert list(mine["state"]) == list(theirs["state"]) == list(range(len(theirs["state"])))
    for i, state in theirs["state"].items():
        assert state.keys() == mine["state"][i].keys()
        assert all(torch.equal(mine["state"][i][k], v) for k, v in state.items())

    def resume(ckpt: Path, root: Path) -> dict:
        cli(["fit", *_pretrain_args(root, run / "text.txt"), "--trainer.max_steps=5", f"--ckpt_path={ckpt}"])
        return _load(root / "last.ckpt")

    a, b = resume(run / "last.ckpt", tmp_path / "a"), resume(out, tmp_path / "b")
    assert a["global_step"] == b["global_step"] == 5 and a["tokens_seen"] == b["tokens_seen"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_every_reader_takes_the_output(run, fsdp_run, tmp_path, capsys):
    out = consolidate(fsdp_run / "last.ckpt", tmp_path / "one.ckpt")
    assert load_weights(out)[0] == load_weights(run / "last.ckpt")[0]
    expected, tokenizer, _ = load_model_for_inference(str(run / "last.ckpt"))
    model, tok, meta = load_model_for_inference(str(out))
    assert meta["format"] == "lit" and meta["global_step"] == 3 and tok.fingerprint == tokenizer.fingerprint
    ids = torch.tensor([tokenizer.encode("The sketch of the donkey")])
    with torch.no_grad():
        assert torch.equal(model(ids), expected(ids))
        assert torch.equal(generate(model, ids, 12), generate(expected, ids, 12))

    # python -m lit_llm.generate, greedy: the same text from both files.
    from lit_llm.generate import main as generate_main

    texts = []
    for source in (run / "last.ckpt", out):
        generate_main(["--checkpoint", str(source), "--prompt", "The sketch", "--max-new-tokens", "12",
                       "--format", "jsonl", "--device", "cpu"])
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and '"completion"' in texts[0]

    # to-hf, read back by lit_llm's Hugging Face reader.
    convert_main(["to-hf", str(out), str(tmp_path / "hf")])
    hf, hf_tok, hf_meta = load_model_for_inference(str(tmp_path / "hf"))
    assert hf_meta["format"] == "hf" and hf_tok.fingerprint == tokenizer.fingerprint
    with torch.no_grad():
        assert torch.allclose(hf(ids), expected(ids)[..., :300], atol=1e-6)


def test_init_weights_of_a_finetuning_run(fsdp_run, tmp_path):
    """Spam classification (the book's chapter 6) from the consolidated file: weights and tokenizer come from it."""
    out = consolidate(fsdp_run, tmp_path / "pretrained.ckpt")
    rows = [("spam", f"You won {i} pounds!") if i % 3 == 0 else ("ham", f"See you at {i}") for i in range(40)]
    (tmp_path / "sms.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    c = cli(["fit", "--config", str(ROOT / "configs/classify/sms_spam.yaml"), *TINY,
             "--model.init_args.model.qkv_bias=false", f"--model.init_args.init_weights={out}",
             f"--data.init_args.source={tmp_path / 'sms.tsv'}", "--data.init_args.sha256=null",
             "--data.init_args.archive_member=null", f"--data.init_args.tokenizer={out}",
             f"--trainer.default_root_dir={tmp_path / 'classify'}", "--trainer.accelerator=cpu",
             "--trainer.max_steps=2", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
             "--trainer.limit_val_batches=0", *QUIET])
    assert c.trainer.global_step == 2
    pretrained = _load(out)["state_dict"]
    trained = c.model.model.state_dict()
    # trainable: last_block; the first block is frozen, so it still holds exactly the consolidated weights.
    frozen = [k for k in trained if k.startswith("trf_blocks.0.")]
    assert frozen and all(torch.equal(trained[k], pretrained[f"model.{k}"]) for k in frozen)
    assert c.datamodule.tokenizer.fingerprint == _load(out)["PretrainDataModule"]["tokenizer_fingerprint"]


# ---- DeepSpeed, around DeepSpeed's zero_to_fp32 ------------------------------------------------------------------


def write_deepspeed_like(checkpoint_file: Path, directory: Path, stage: int = 2) -> Path:
    """DeepSpeed's layout for Lightning's checkpoint: ``latest`` -> ``checkpoint/`` with rank 0's model states
    (engine entries + Lightning's client state) and per-rank optimizer files holding what ZeRO saves, DeepSpeed's own
    objects included (only checked here, weights-only: merging them is the stand-in's job)."""
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    engine = {"module": {}, "buffer_names": [], "optimizer": None, "shared_params": {},
              "param_shapes": [collections.OrderedDict(w=torch.Size([4, 2]))], "sparse_tensor_module_names": set(),
              "lr_scheduler": None, "skipped_steps": 0, "global_steps": 3, "global_samples": 12, "dp_world_size": 2,
              "mp_world_size": 1, "ds_version": "0.0.0", "ds_config": {"zero_optimization": {"stage": stage}}}
    folder = directory / "checkpoint"
    folder.mkdir(parents=True)
    states = "mp_rank_00_model_states.pt" if stage < 3 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({**engine, **client}, folder / states)
    with deepspeed_objects() as ds:
        for rank in range(2):
            torch.save(deepspeed_optimizer_state(ds, stage, rank),
                       folder / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    (directory / "latest").write_text("checkpoint\n")
    return directory


@pytest.fixture
def fake_zero_to_fp32(run, monkeypatch):
    """A stand-in for ``deepspeed.utils.zero_to_fp32`` returning the run's float32 weights under the names DeepSpeed
    gives them (Lightning's wrapper prefix, the tied head once); records how it was called."""
    calls = []
    weights = {f"_forward_module.{k}": v for k, v in _load(run / "last.ckpt")["state_dict"].items()
               if k != "model.out_head.weight"}

    def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None, exclude_frozen_parameters=False,
                                                 lazy_mode=False):
        calls.append((checkpoint_dir, tag))
        print("Processing zero checkpoint")  # DeepSpeed prints; the command's output must stay one line
        return dict(weights)

    module = types.ModuleType("deepspeed.utils.zero_to_fp32")
    module.get_fp32_state_dict_from_zero_checkpoint = get_fp32_state_dict_from_zero_checkpoint
    for name, mod in {"deepspeed": types.ModuleType("deepspeed"), "deepspeed.utils": types.ModuleType("d.utils"),
                      "deepspeed.utils.zero_to_fp32": module}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_client_state_and_names(run, fake_zero_to_fp32, stage, tmp_path, capsys):
    directory = write_deepspeed_like(run / "last.ckpt", tmp_path / "last.ckpt", stage)
    assert detect_kind(directory) == "deepspeed" == sharded_kind(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of a well-formed checkpoint is dropped
        out = consolidate(directory, tmp_path / "one.ckpt")
    assert fake_zero_to_fp32 == [(str(directory), "checkpoint")]
    assert capsys.readouterr().out == ""
    original, merged = _load(run / "last.ckpt"), _load(out)
    assert set(merged["state_dict"]) == set(original["state_dict"])  # prefix gone, tied head under both names
    assert all(torch.equal(merged["state_dict"][k], v) for k, v in original["state_dict"].items())
    # The engine's own entries are gone; Lightning's client state is kept, except the training-only state.
    assert set(merged) == set(original) - {"optimizer_states", "lr_schedulers"}
    assert merged["PretrainDataModule"] == original["PretrainDataModule"]
    model, tok, _ = load_model_for_inference(str(out))
    assert tok is not None and model.config.n_layers == 2


def test_deepspeed_keep_optimizer_warns_that_it_cannot(run, fake_zero_to_fp32, tmp_path):
    directory = write_deepspeed_like(run / "last.ckpt", tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match="flat ZeRO partitions"):
        out = consolidate(directory, tmp_path / "one.ckpt", keep_optimizer=True)
    assert "optimizer_states" not in _load(out)


def test_objects_that_are_not_plain_data_are_refused(run, fake_zero_to_fp32, tmp_path):
    """A Python object in the model states that is neither plain data nor one of DeepSpeed's own classes is not
    unpickled (that could run code): one error naming the file and the class, before DeepSpeed reads anything."""
    directory = write_deepspeed_like(run / "last.ckpt", tmp_path / "last.ckpt")
    states = directory / "checkpoint" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=True), "my_callback_thing": Path("x")}, states)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(states))} holds Python objects .*pathlib\.PosixPath"):
        consolidate(directory, tmp_path / "one.ckpt")
    assert fake_zero_to_fp32 == [] and not (tmp_path / "one.ckpt").exists()


def test_deepspeed_without_deepspeed_is_one_error_naming_the_extra(run, tmp_path, monkeypatch):
    directory = write_deepspeed_like(run / "last.ckpt", tmp_path / "last.ckpt")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing it fails, installed or not
    with pytest.raises(CheckpointError, match=r"needs DeepSpeed.*pip install 'lit_llm\[deepspeed\]'"):
        consolidate(directory, tmp_path / "one.ckpt")
    assert not (tmp_path / "one.ckpt").exists()


# ---- mistakes ----------------------------------------------------------------------------------------------------


def test_what_is_not_a_sharded_checkpoint_is_one_clear_error(run, fsdp_run, tmp_path):
    cases = {
        tmp_path / "nope": "does not exist",
        run / "last.ckpt": "already is one checkpoint",
        tmp_path / "empty": r"neither an FSDP nor a DeepSpeed checkpoint directory \(it is empty\)",
        run: r"newest checkpoint .*last\.ckpt is already one file",
    }
    (tmp_path / "empty").mkdir()
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            consolidate(path, tmp_path / "out.ckpt")
    # Incomplete saves: DeepSpeed's `latest` names a missing folder; FSDP shards without their index or meta.pt.
    ds = write_deepspeed_like(run / "last.ckpt", tmp_path / "ds.ckpt")
    shutil.rmtree(ds / "checkpoint")
    with pytest.raises(CheckpointError, match=r"`latest` file names the folder 'checkpoint', which is missing"):
        detect_kind(ds)
    for missing, message in ((".metadata", r"not their index \.metadata"), ("meta.pt", r"has no meta\.pt")):
        broken = tmp_path / f"no{missing}.ckpt"
        shutil.copytree(fsdp_run / "last.ckpt", broken)
        (broken / missing).unlink()
        with pytest.raises(CheckpointError, match=message):
            consolidate(broken, tmp_path / "out.ckpt")
    unfinished = tmp_path / "step=000003.ckpt.tmp"
    shutil.copytree(fsdp_run / "last.ckpt", unfinished)
    with pytest.raises(CheckpointError, match=r"unfinished save.*step=000003\.ckpt if it exists"):
        consolidate(unfinished, tmp_path / "out.ckpt")
    assert not (tmp_path / "out.ckpt").exists()


def test_bad_output_paths_and_a_damaged_shard(fsdp_run, tmp_path):
    directory = tmp_path / "last.ckpt"
    shutil.copytree(fsdp_run / "last.ckpt", directory)
    with pytest.raises(CheckpointError, match="is a directory"):
        consolidate(directory, tmp_path)
    with pytest.raises(CheckpointError, match="inside the checkpoint directory"):
        consolidate(directory, directory / "one.ckpt")
    shard = directory / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"could not read the shards of .*last\.ckpt"):
        consolidate(directory, tmp_path / "one.ckpt")
    assert not (tmp_path / "one.ckpt").exists() and not (tmp_path / "one.ckpt.tmp").exists()


def test_readers_refuse_sharded_directories_with_the_command(fsdp_run, tmp_path):
    expected = (f"`python -m lit_llm.convert consolidate {fsdp_run / 'last.ckpt'} "
                f"{fsdp_run / 'last.consolidated.ckpt'}`")
    for source in (fsdp_run / "last.ckpt", fsdp_run):  # the directory, and the run directory it is the last of
        with pytest.raises(CheckpointError, match="sharded FSDP checkpoint directory") as err:
            load_weights(source)
        assert expected in str(err.value)
    # A run directory without last.ckpt stands for its newest checkpoint, here a sharded one.
    run = tmp_path / "run"
    shutil.copytree(fsdp_run / "last.ckpt", run / "step=000002.ckpt")
    shutil.copytree(fsdp_run / "last.ckpt", run / "step=000010.ckpt")
    with pytest.raises(CheckpointError, match=r"consolidate \S*step=000010\.ckpt \S*step=000010\.consolidated\.ckpt"):
        load_model_for_inference(str(run))
    # Once consolidated, the run directory reads the file (newest of the same step).
    consolidate(run, run / "step=000010.consolidated.ckpt")
    model, tok, meta = load_model_for_inference(str(run))
    assert meta["path"].endswith("step=000010.consolidated.ckpt") and tok is not None


# ---- the command line --------------------------------------------------------------------------------------------


def test_command_line(fsdp_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lit_llm.convert", "consolidate", str(fsdp_run),
                           str(tmp_path / "one.ckpt"), "--keep-optimizer"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert line.startswith(f"wrote {tmp_path / 'one.ckpt'}") and "FSDP checkpoint" in line
    assert "36,544 parameters (float32)" in line and "optimizer state kept" in line
    assert "optimizer_states" in _load(tmp_path / "one.ckpt")

    proc = subprocess.run([sys.executable, "-m", "lit_llm.convert", "consolidate", "no/such/dir.ckpt", "out.ckpt"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: CheckpointError: no/such/dir.ckpt does not exist")


def test_command_line_prints_warnings_as_lines(run, fake_zero_to_fp32, tmp_path, capsys):
    directory = write_deepspeed_like(run / "last.ckpt", tmp_path / "last.ckpt")
    convert_main(["consolidate", str(directory), str(tmp_path / "one.ckpt"), "--keep-optimizer"])
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {tmp_path / 'one.ckpt'}") and "DeepSpeed checkpoint" in captured.out
    assert captured.err.startswith("warning: ") and "flat ZeRO partitions" in captured.err
