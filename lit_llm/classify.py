"""``python -m lit_llm.classify``: label texts with a classification checkpoint.

    python -m lit_llm.classify --checkpoint checkpoints/classify-quickstart/last.ckpt "The lid is not flimsy at all."
    python -m lit_llm.classify --checkpoint checkpoints/sms-spam/last.ckpt --file messages.txt --json

``--checkpoint`` is a ``.ckpt`` written by ``python -m lit_llm.train fit`` with ``lit_llm.tasks.ClassifyTask``
(or its run directory, which holds ``last.ckpt``). Everything needed comes from it: the model's shape and weights
(the head's size included), the class names, the pooling, the tokenizer and the padding the model was trained
with. Texts come as arguments and/or from ``--file`` (one text per line, blank lines skipped; a ``.jsonl`` file holds
one ``{"text": ...}`` object per line; ``-`` reads standard input).

Each text prints as ``label<TAB>probability<TAB>text``, or with ``--json`` as one JSON object per line:
``{"text": ..., "label": ..., "probability": ..., "probs": {class: probability, ...}}``.

A text longer than the model was trained on is cut to that length, with a warning on stderr. Mistakes print one
``error: ...`` line and exit with status 1; ``LIT_LLM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from lit_llm.cli import CommandParser, entry_point, read_text_file, resolve_device, run_command
from lit_llm.data.tokenizer import Tokenizer
from lit_llm.errors import CheckpointError, ConfigError, LitLLMError
from lit_llm.tasks.base import GPTTask
from lit_llm.tasks.classify import ClassifyTask
from lit_llm.tasks.options import grouped


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m lit_llm.classify``."""
    p = CommandParser(prog="python -m lit_llm.classify",
                description="Label texts with a lit_llm classification checkpoint (ClassifyTask).")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a .ckpt written by lit_llm.train with ClassifyTask, or its run directory")
    p.add_argument("--file", metavar="FILE", default=None,
                   help="one text per line, a .jsonl file of {\"text\": ...} objects, or - for standard input")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per forward pass (default: 32)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    return p


@dataclass
class Classifier:
    """A classification model ready for inference, with what its checkpoint says about its inputs.

    Attributes:
        task: The ``ClassifyTask`` in eval mode.
        tokenizer: The tokenizer it was trained with.
        label_names: Class names in id order.
        pooling: ``last``, ``last_nonpad`` or ``mean``.
        pad_length: The fixed length training texts were padded to (``pad_to: longest_train``), else ``None``.
        max_length: The most tokens per text the model saw in training; longer texts are cut.
        pad_id: The padding id (``<|endoftext|>``).
    """

    task: ClassifyTask
    tokenizer: Tokenizer
    label_names: list[str]
    pooling: str
    pad_length: int | None
    max_length: int
    pad_id: int


def load_classifier(checkpoint: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Rebuild a trained classifier from its lit_llm checkpoint alone.

    Args:
        checkpoint: A ``.ckpt`` written with ``ClassifyTask``, or a run directory holding ``last.ckpt``.
        device: Where the model goes.

    Raises:
        CheckpointError: The file is missing or unreadable, or it is not a classification checkpoint.
    """
    from lit_llm.weights.files import torch_load

    path = Path(checkpoint).expanduser()
    file = path / "last.ckpt" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"--checkpoint {str(checkpoint)!r}: {file} does not exist (cwd: {Path.cwd()})")
    ckpt = torch_load(file)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    info = ckpt.get("classifier") if isinstance(ckpt, dict) else None
    data_state = next((v for v in (ckpt.values() if isinstance(ckpt, dict) else ())
                       if isinstance(v, dict) and "tokenizer_json" in v), None)
    if not isinstance(hparams, dict) or not isinstance(info, dict) or "state_dict" not in ckpt:
        kind = "a language-model checkpoint" if isinstance(hparams, dict) else "not a lit_llm training checkpoint"
        raise CheckpointError(
            f"{file} is not a classification checkpoint ({kind}: it has no classifier head and class names). Train "
            "one with model.class_path: lit_llm.tasks.ClassifyTask (see configs/classify/), or use "
            "python -m lit_llm.generate for language models."
        )
    if data_state is None:
        raise CheckpointError(f"{file} holds no tokenizer (no DataModule state); it was not written by lit_llm.train "
                              "with lit_llm.data.ClassifyDataModule")
    accepted = set(inspect.signature(ClassifyTask.__init__).parameters) | set(
        inspect.signature(GPTTask.__init__).parameters)
    # grouped(): a checkpoint written before the option groups stores learning_rate, compile, ... flat.
    kwargs = {k: v for k, v in grouped(hparams).items() if k in accepted and k not in ("self", "kwargs")}
    # The weights come from the checkpoint: no initial weights to fetch, nothing to compile for a few texts.
    speed = dict(kwargs.get("speed") or {}, compile=False)
    kwargs.update(init_weights=None, speed=speed, num_classes=info["num_classes"], label_names=info["label_names"])
    task = ClassifyTask(**kwargs)
    task.configure_model()
    try:
        task.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{file}: the weights do not fit the model its hyperparameters describe: {err}") from err
    task.to(device).eval()
    tokenizer = Tokenizer.from_json(data_state["tokenizer_json"])
    config = task.config
    return Classifier(
        task=task,
        tokenizer=tokenizer,
        label_names=list(info["label_names"]),
        pooling=str(info.get("pooling", hparams.get("pooling", "last"))),
        pad_length=data_state.get("pad_length") if data_state.get("pad_to") == "longest_train" else None,
        max_length=int(data_state.get("max_length") or config.context_length),
        pad_id=tokenizer.eos_id,
    )


def classify(classifier: Classifier, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """Label ``texts``: per text, the predicted ``label``, its ``probability`` and ``probs`` (every class).

    Texts are padded as in training: to the trained length under ``pad_to: longest_train`` (what ``last`` pooling
    saw, as the book's ``classify_review`` does), else not at all for ``last`` pooling (texts of equal length share a
    batch) and to the batch's longest text for ``last_nonpad``/``mean`` (which read only the real tokens).
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    limit = classifier.pad_length or classifier.max_length
    ids = classifier.tokenizer.encode_batch(list(texts)) if texts else []
    for i, row in enumerate(ids):
        if len(row) > limit:
            warnings.warn(f"text {i + 1} has {len(row)} tokens; the model was trained on at most {limit}, so it is cut "
                          f"to its first {limit} tokens", stacklevel=2)
        if not row:
            raise ConfigError(f"text {i + 1} is empty; give it some text")
    ids = [row[:limit] for row in ids]
    order = list(range(len(ids)))
    if classifier.pooling == "last" and classifier.pad_length is None:
        order.sort(key=lambda i: len(ids[i]))  # equal lengths together: no padding at all
    device = next(classifier.task.parameters()).device
    results: list[dict[str, Any]] = [{} for _ in ids]
    start = 0
    while start < len(order):
        chunk = order[start : start + batch_size]
        if classifier.pooling == "last" and classifier.pad_length is None:
            chunk = [i for i in chunk if len(ids[i]) == len(ids[chunk[0]])]
        start += len(chunk)
        width = classifier.pad_length or max(len(ids[i]) for i in chunk)
        batch = torch.full((len(chunk), width), classifier.pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
        lengths = torch.tensor([len(ids[i]) for i in chunk], dtype=torch.long)
        with torch.inference_mode():
            probs = torch.softmax(classifier.task.class_logits(batch.to(device), lengths.to(device)), dim=-1).cpu()
        for row, i in enumerate(chunk):
            p = probs[row].tolist()
            best = max(range(len(p)), key=p.__getitem__)
            results[i] = {"label": classifier.label_names[best], "probability": p[best],
                          "probs": dict(zip(classifier.label_names, p))}
    return results


def read_texts(texts: Sequence[str], file: str | None, stdin: TextIO) -> list[str]:
    """The argument texts followed by those of ``file`` (``-`` for ``stdin``)."""
    out = list(texts)
    if file is not None:
        out += read_text_file(file, field="text", option="--file", noun="texts", stdin=stdin)
    return out


def run(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    """Carry out parsed command-line arguments."""

    texts = read_texts(args.texts, args.file, stdin)
    if not texts:
        raise ConfigError("nothing to classify: pass texts as arguments or --file FILE")
    classifier = load_classifier(args.checkpoint, resolve_device(args.device))
    for text, result in zip(texts, classify(classifier, texts, batch_size=args.batch_size)):
        if args.json:
            stdout.write(json.dumps({"text": text, **result}, ensure_ascii=False) + "\n")
        else:
            stdout.write(f"{result['label']}\t{result['probability']:.4f}\t{text}\n")
    stdout.flush()


def main(argv: Iterable[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run ``python -m lit_llm.classify`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    def action() -> None:
        run(build_parser().parse_args(None if argv is None else list(argv)), stdin or sys.stdin, stdout or sys.stdout)

    return run_command(action, (LitLLMError, ValueError, OSError))


if __name__ == "__main__":
    entry_point(main)
