"""The shipped classification configs, the spam workflow end to end, learning the built-in task, predict and the
``python -m lit_llm.classify`` CLI."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from classify_helpers import TINY_MODEL, sms_rows, write_sms_collection, write_sms_zip
from support import ROOT

from lit_llm.classify import classify, load_classifier, main
from lit_llm.data import ClassifyDataModule
from lit_llm.errors import CheckpointError, DataError
from lit_llm.tasks import ClassifyTask
from lit_llm.train import cli

CONFIGS = sorted((ROOT / "configs" / "classify").glob("*.yaml"))
QUICKSTART = ROOT / "configs" / "classify" / "quickstart.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls gain nothing from threads, and on a shared CPU extra threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def offline_overrides(config: Path, data: Path, root: Path) -> list[str]:
    """Shrink a shipped classification config to seconds on a CPU, with local files in place of downloads."""
    args = [*TINY_MODEL, f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true", "--data.init_args.num_workers=0", *QUIET]
    cfg = yaml.safe_load(config.read_text())
    d, m = cfg["data"]["init_args"], cfg["model"]["init_args"]
    if not str(d["source"]).startswith("builtin:"):
        args += [f"--data.init_args.source={data}", "--data.init_args.sha256=null",
                 "--data.init_args.archive_member=null"]
    if d.get("tokenizer") != "train" or d.get("tokenizer_vocab_size", 4096) > 600:
        args += ["--data.init_args.tokenizer=train", "--data.init_args.tokenizer_vocab_size=300"]
    if m.get("init_weights"):
        args += ["--model.init_args.init_weights=null"]
    if m["model"]["context_length"] > 128:
        args += ["--model.init_args.model.context_length=64"]
    return args


@pytest.fixture
def sms_file(tmp_path: Path) -> Path:
    return write_sms_collection(tmp_path / "SMSSpamCollection", sms_rows(60, 20))


def test_configs_folder_is_covered() -> None:
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "sms_spam.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_fast_dev_run(config: Path, sms_file: Path, tmp_path: Path, in_repo_root: Path) -> None:
    c = cli(["fit", "--config", str(config), *offline_overrides(config, sms_file, tmp_path),
             "--trainer.fast_dev_run=true"])
    assert isinstance(c.model, ClassifyTask) and isinstance(c.datamodule, ClassifyDataModule)
    assert c.model.config.vocab_size == c.datamodule.vocab_size
    assert c.datamodule.context_length == c.model.config.context_length
    assert c.model.hparams.label_names == c.datamodule.label_names
    assert c.trainer.state.finished and c.trainer.global_step == 1
    assert torch.isfinite(c.trainer.callback_metrics["train/loss"])


def test_sms_spam_is_the_books_run() -> None:
    """configs/classify/sms_spam.yaml holds the book's chapter 6 settings (test_config_fast_dev_run runs it offline)."""
    cfg = yaml.safe_load((ROOT / "configs/classify/sms_spam.yaml").read_text())
    m, d, t = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert cfg["seed_everything"] == 123
    assert m["model"] == {"context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12, "drop_rate": 0.0,
                          "qkv_bias": True, "tie_weights": True, "pad_vocab_multiple": 1}
    assert m["init_weights"] == "openai-community/gpt2"
    assert (m["pooling"], m["trainable"]) == ("last", "last_block")
    o = m["optim"]
    assert (o["learning_rate"], o["weight_decay"], o["decay_all"], o["betas"]) == (5e-5, 0.1, True, [0.9, 0.999])
    assert (o["lr_schedule"], o["warmup_steps"], o["gradient_clip"]) == ("constant", 0, None)
    assert d["source"] == "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    assert d["sha256"] == "1587ea43e58e82b14ff1f5425c88e17f8496bfcdb67a583dbff9eefaf9963ce3"
    assert (d["archive_member"], d["file_format"], d["column_names"]) == ("SMSSpamCollection", "tsv",
                                                                          ["label", "text"])
    assert (d["labels"], d["balance"], d["split"], d["seed"]) == (["ham", "spam"], True, [0.7, 0.1, 0.2], 123)
    assert (d["tokenizer"], d["pad_to"], d["batch_size"], d["drop_last"]) == ("gpt2", "longest_train", 8, True)
    assert t["max_epochs"] == 5


# ---- the spam workflow, downloaded over HTTP ------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 over a temp directory: (base URL, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_spam_workflow_end_to_end(http_root: tuple[str, Path], tmp_path: Path, in_repo_root: Path, one_thread: None,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The book's spam config with its real download path (zip over HTTP, SHA-256, SMSSpamCollection member):
    fit, test, predict, then the classify CLI on the checkpoint alone."""
    base, www = http_root
    archive = write_sms_zip(www / "sms+spam+collection.zip", sms_rows(60, 25, seed=3))
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    config = ROOT / "configs/classify/sms_spam.yaml"
    run = tmp_path / "run"
    common = [*TINY_MODEL, "--model.init_args.model.context_length=64", "--model.init_args.init_weights=null",
              "--model.init_args.trainable=all", "--model.init_args.optim.learning_rate=3e-3",
              f"--data.init_args.source={base}/sms+spam+collection.zip", f"--data.init_args.sha256={sha}",
              "--data.init_args.tokenizer=train", "--data.init_args.tokenizer_vocab_size=300",
              f"--data.init_args.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={run}",
              "--trainer.accelerator=cpu", *QUIET]
    fit = cli(["fit", "--config", str(config), *common, "--trainer.max_epochs=6"])
    dm = fit.datamodule
    assert [len(dm.examples(s)) for s in ("train", "val", "test")] == [35, 5, 10]  # 25 + 25 balanced, 70/10/20
    assert fit.trainer.global_step == 6 * (35 // 8)  # batch 8, last incomplete batch dropped
    assert (run / "last.ckpt").is_file() and (run / "tokenizer.json").is_file()
    log_dir = Path(fit.trainer.log_dir)
    matrices = [json.loads(line) for line in (log_dir / "confusion_matrix.jsonl").read_text().splitlines()]
    assert {m["split"] for m in matrices} == {"train", "val"} and matrices[-1]["labels"] == ["ham", "spam"]
    assert sum(map(sum, [m for m in matrices if m["split"] == "val"][-1]["matrix"])) == 5
    assert "ham,"in (log_dir / "confusion_matrix_val.csv").read_text()

    ckpt = str(run / "last.ckpt")
    test = cli(["test", "--config", str(config), *common, f"--ckpt_path={ckpt}"])
    metrics = test.trainer.callback_metrics
    assert {"test/acc", "test/f1", "test/loss"} <= set(metrics)
    assert metrics["test/acc"].item() >= 0.8  # ham and spam messages use disjoint templates: easy to learn

    texts = ["WINNER!! You have won a 500 prize. Call 0906555 now to claim", "Sorry, I'll call later"]
    (tmp_path / "new.txt").write_text("\n".join(texts) + "\n")
    cli(["predict", "--config", str(config), *common, f"--ckpt_path={ckpt}",
         f"--data.init_args.predict_source={tmp_path / 'new.txt'}"])
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1] and [r["text"] for r in rows] == texts
    assert all(r["label"] in ("ham", "spam") and 0.5 <= r["probability"] <= 1.0 for r in rows)
    assert all(r["probs"][r["label"]] == pytest.approx(r["probability"]) for r in rows)

    capsys.readouterr()
    assert main(["--checkpoint", ckpt, *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [r["label"] for r in rows]
    assert [float(line.split("\t")[1]) for line in lines] == pytest.approx([r["probability"] for r in rows], abs=1e-4)
    assert [line.split("\t", 2)[2] for line in lines] == texts


# ---- learning the built-in task -----------------------------------------------------------------------------------


def _fit_quickstart(tmp_path: Path, epochs: int) -> tuple[float, float]:
    args = ["--config", str(QUICKSTART), f"--trainer.default_root_dir={tmp_path}", f"--trainer.max_epochs={epochs}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}", *QUIET]
    fit = cli(["fit", *args])
    val = fit.trainer.callback_metrics["val/acc"].item()
    test = cli(["test", *args, f"--ckpt_path={tmp_path / 'last.ckpt'}"])
    return val, test.trainer.callback_metrics["test/acc"].item()


def test_small_model_learns_builtin_reviews_quickly(tmp_path: Path, in_repo_root: Path, one_thread: None) -> None:
    """The quickstart cut to three epochs (about 25 s on one core): well above chance (50 %) and above the best
    single-keyword rule (54 %, see test_builtin_reviews.py). Measured: val 79.3 %, test 76.2 %."""
    val, test = _fit_quickstart(tmp_path, epochs=3)
    assert val >= 0.70 and test >= 0.68


@pytest.mark.slow
def test_quickstart_reaches_its_documented_accuracy(tmp_path: Path, in_repo_root: Path, one_thread: None) -> None:
    """The whole quickstart (8 epochs, about a minute on one core). Measured: val 91.8 %, test 88.0 %."""
    val, test = _fit_quickstart(tmp_path, epochs=8)
    assert val >= 0.85 and test >= 0.83


# ---- the classify CLI -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier trained for a few steps on SMS-like data (pad_to: longest_train, pooling: last)."""
    import os

    root = tmp_path_factory.mktemp("tiny_classifier")
    data = write_sms_collection(root / "sms.tsv", sms_rows(40, 20, seed=7))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cli(["fit", "--config", str(ROOT / "configs/classify/sms_spam.yaml"),
             *offline_overrides(ROOT / "configs/classify/sms_spam.yaml", data, root / "run"),
             f"--data.init_args.cache_dir={root / 'cache'}", "--trainer.max_steps=3", "--trainer.logger=false"])
    finally:
        os.chdir(cwd)
    return root / "run" / "last.ckpt"


def test_cli_json_and_file_input(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "texts.jsonl").write_text('{"text": "Call 0800 now to claim"}\n\n{"text": "see you soon"}\n')
    out = io.StringIO()
    assert main(["--checkpoint", str(tiny_checkpoint.parent), "first", "--file", str(tmp_path / "texts.jsonl"),
                 "--json"], stdout=out) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["text"] for r in rows] == ["first", "Call 0800 now to claim", "see you soon"]
    for r in rows:
        assert set(r) == {"text", "label", "probability", "probs"} and set(r["probs"]) == {"ham", "spam"}
        assert r["probability"] == pytest.approx(max(r["probs"].values()))
    out = io.StringIO()
    assert main(["--checkpoint", str(tiny_checkpoint), "--file", "-"], stdin=io.StringIO("one\ntwo\n"),
                stdout=out) == 0
    assert [line.split("\t")[2] for line in out.getvalue().splitlines()] == ["one", "two"]


def test_classify_pads_like_training(tiny_checkpoint: Path) -> None:
    """Under pooling=last a text is padded to the training length, so its answer does not depend on its batch."""
    clf = load_classifier(tiny_checkpoint)
    assert clf.pooling == "last" and clf.pad_length is not None and clf.label_names == ["ham", "spam"]
    texts = ["a", "Claim your free ringtone now! Text TONE to 12", "Mum says dinner is at 7"]
    together = classify(clf, texts, batch_size=3)
    alone = [classify(clf, [t])[0] for t in texts]
    assert [r["probs"] for r in together] == pytest.approx([r["probs"] for r in alone], abs=1e-5)
    with pytest.warns(UserWarning, match=rf"text 1 has \d+ tokens; the model was trained on at most {clf.pad_length}"):
        classify(clf, ["WIN " * 200])


def test_cli_refuses_a_language_model_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "lm.ckpt"
    torch.save({"state_dict": {"model.tok_emb.weight": torch.zeros(4, 2)},
                "hyper_parameters": {"model": {"vocab_size": 4}}}, ckpt)
    assert main(["--checkpoint", str(ckpt), "hello"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a classification checkpoint" in err and "ClassifyTask" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.ckpt")
    assert main(["--checkpoint", str(ckpt)]) == 1
    assert "nothing to classify" in capsys.readouterr().err


def test_checkpoint_holds_the_classes_and_resumes(sms_file: Path, tmp_path: Path, in_repo_root: Path) -> None:
    config = ROOT / "configs/classify/sms_spam.yaml"
    common = [*offline_overrides(config, sms_file, tmp_path), "--trainer.logger=false"]
    cli(["fit", "--config", str(config), *common, "--trainer.max_steps=2"])
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)  # plain types only
    assert ckpt["hyper_parameters"]["label_names"] == ["ham", "spam"]
    assert ckpt["classifier"] == {"num_classes": 2, "label_names": ["ham", "spam"], "pooling": "last"}
    assert ckpt["ClassifyDataModule"]["label_names"] == ["ham", "spam"]
    assert ckpt["state_dict"]["model.out_head.weight"].shape == (2, 32)
    resumed = cli(["fit", "--config", str(config), *common, "--trainer.max_steps=4", "--ckpt_path=last"])
    assert resumed.trainer.global_step == 4
    with pytest.raises(DataError, match=r"the checkpoint's classes \['ham', 'spam'\] differ"):
        cli(["fit", "--config", str(config), *common, "--trainer.max_steps=6", "--ckpt_path=last",
             "--data.init_args.labels=[spam, ham]", f"--data.init_args.tokenizer={tmp_path / 'tokenizer.json'}"])
