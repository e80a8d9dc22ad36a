"""Lightning's own errors and faults of the environment end ``python -m lit_llm.train`` with one ``error:`` line that
names the cause and the fix (exit status 1, no traceback; ``LIT_LLM_DEBUG=1`` shows it): invalid trainer settings, a
GPU preset without a GPU, a full disk while saving a checkpoint (the previous checkpoint stays whole), text that is
not UTF-8, a cache folder that cannot be written."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch
from faults import fit_args, one_line_error

from lit_llm.cli import run_command
from lit_llm.train import main


def test_negative_max_steps(corpus, tmp_path, in_repo_root, capsys):
    err = one_line_error(capsys, fit_args(tmp_path, corpus, 2, [], "--trainer.max_steps=-5"))
    assert err.startswith("error: ConfigError: a trainer setting is invalid (Lightning says: `max_steps` must be a "
                          "non-negative integer or -1")
    assert "You passed in -5" in err and "python -m lit_llm.train fit --help" in err


def test_unknown_strategy_name(corpus, tmp_path, in_repo_root, capsys):
    err = one_line_error(capsys, fit_args(tmp_path, corpus, 2, [], "--trainer.strategy=lit_dp"))
    assert err.startswith("error: ConfigError: trainer.strategy='lit_dp' is not a strategy name; did you mean lit_ddp")
    assert "lit_fsdp2" in err and "configs/trainer/" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_preset_on_a_machine_without_gpu(corpus, tmp_path, in_repo_root, capsys):
    err = one_line_error(capsys, fit_args(tmp_path, corpus, 2, [], "--config", "configs/trainer/gpu.yaml"))
    assert err.startswith("error: ConfigError: trainer.accelerator asks for a GPU, but this machine has no usable one")
    assert "--trainer.accelerator=cpu" in err and "configs/trainer/gpu.yaml" in err


def test_debug_shows_the_traceback(corpus, tmp_path, in_repo_root, monkeypatch):
    monkeypatch.setenv("LIT_LLM_DEBUG", "1")
    with pytest.raises(ValueError, match="invalid strategy name"):
        main(fit_args(tmp_path, corpus, 2, [], "--trainer.strategy=lit_dp"))


@pytest.mark.parametrize("encoding,looks", [("latin-1", "Latin-1"), ("utf-16", "UTF-16")])
def test_corpus_that_is_not_utf8(encoding, looks, tmp_path, in_repo_root, capsys):
    corpus = tmp_path / "old.txt"
    text = "A line of plain ascii text... café and more words " * 40
    corpus.write_bytes(text.encode(encoding))
    offset = text.encode(encoding).index(b"\xe9") if encoding == "latin-1" else 0  # the é; UTF-16's byte-order mark
    err = one_line_error(capsys, fit_args(tmp_path, corpus, 2, []))
    assert err.startswith(f"error: DataError: data.source: {corpus} is not UTF-8 text: byte {offset} ")
    assert looks in err and "iconv -f " in err and "DatasetGenerationError" not in err


def test_a_file_where_the_cache_folder_belongs(corpus, tmp_path, in_repo_root, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    err = one_line_error(capsys, fit_args(tmp_path / "run", corpus, 2, [], f"--data.init_args.cache_dir={blocker}"))
    assert err.startswith(f"error: StorageError: the cache folder {blocker} cannot be written ({blocker} is a file")
    assert "data.cache_dir" in err and "LIT_LLM_CACHE" in err and str(corpus) not in err


@contextlib.contextmanager
def tmpfs(folder: Path, *options: str):
    """A tmpfs mounted on ``folder`` (root on Linux), or skip."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root on Linux): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        # Lazily: the run in this process may still map files of it (datasets keeps arrow files memory-mapped).
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_read_only_cache_folder(corpus, tmp_path, in_repo_root, capsys):
    """LIT_LLM_CACHE on a read-only filesystem (a chmod would not stop root)."""
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as folder:
        err = one_line_error(capsys, fit_args(tmp_path / "run", corpus, 2, [],
                                              f"--data.init_args.cache_dir={folder / 'cache'}"))
    assert err.startswith(f"error: StorageError: the cache folder {folder / 'cache'} cannot be written (Read-only "
                          "file system)")


def test_a_full_disk_while_saving_a_checkpoint(corpus, tmp_path, in_repo_root, capsys):
    """Checkpoints every 2 steps into a 1.2 MB tmpfs: step 2's checkpoint and last.ckpt fit (~470 kB each), step 4's
    does not. One line names the file, the cause and the free space; the previous checkpoint stays whole and
    loads; no partial file is left."""
    checkpoint = {"filename": "step={step:06d}", "auto_insert_metric_name": False, "every_n_train_steps": 2,
                  "save_top_k": -1, "save_last": True}
    with tmpfs(tmp_path / "disk", "size=1200k") as disk:
        err = one_line_error(capsys, fit_args(disk / "run", corpus, 6, [], checkpoint=checkpoint))
        files = sorted(p.name for p in (disk / "run").iterdir())
        last = torch.load(disk / "run" / "last.ckpt", weights_only=True)
        step2 = torch.load(disk / "run" / "step=000002.ckpt", weights_only=True)
    assert err.startswith(f"error: StorageError: could not write the checkpoint {disk / 'run' / 'step=000004.ckpt'}: "
                          "the disk is full (")
    assert f"free on {disk / 'run'}" in err and "are intact" in err and "--ckpt_path auto" in err
    assert "inline_container" in err  # torch's own words, kept in the line, without its 30 frames
    assert last["global_step"] == step2["global_step"] == 2
    assert not [f for f in files if f.endswith(".tmp")]


def test_commands_tell_a_full_disk_in_one_line(tmp_path, capsys):
    """The other commands (run_command) too: an ``OSError`` ENOSPC names the file and the free space."""
    target = tmp_path / "out.json"

    def action() -> None:
        raise OSError(28, "No space left on device", str(target))

    assert run_command(action) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: StorageError: could not write the file {target}: the disk is full (No space left on "
                          f"device; ") and f"free on {tmp_path}" in err and err.count("\n") == 1
    assert "data.cache_dir / LIT_LLM_CACHE" in err


def test_a_bug_keeps_its_traceback(capsys):
    def action() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(action)


@pytest.mark.parametrize("size", ["100k", "900k"])
def test_a_full_disk_under_the_cache(size, tmp_path, in_repo_root, capsys):
    """The cache on a tmpfs too small for a 300,000-character corpus: at 100 kB the arrow files of the text do not fit,
    at 900 kB the token array does (its space is reserved up front, so the memory map never meets a full disk, which
    would kill the process with SIGBUS). One line naming the cache file, never blamed on the corpus."""
    from lit_llm.data.builtin import load_builtin

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(load_builtin("pydoc")["text"])[:300_000], encoding="utf-8")
    with tmpfs(tmp_path / "disk", f"size={size}") as disk:
        err = one_line_error(capsys, fit_args(tmp_path / "run", corpus, 1, [],
                                              f"--data.init_args.cache_dir={disk / 'cache'}"))
        leftovers = [p for p in disk.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("tmp"))]
    assert err.startswith(f"error: StorageError: could not write the file {disk / 'cache'}")
    assert "the disk is full (No space left on device; " in err and "could not read" not in err
    if size == "900k":
        assert "/pretrain/" in err and err.split(": the disk is full")[0].endswith("train.npy")
    assert leftovers == [] or size == "100k"  # a partial arrow file of datasets may stay; the next start sweeps it
