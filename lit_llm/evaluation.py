"""Standard benchmarks for any lit_llm model through EleutherAI's lm-evaluation-harness (``lm_eval``).

:class:`LitLLMEvalModel` is the harness's model interface (``lm_eval.api.model.TemplateLM``) over a
:class:`~lit_llm.model.gpt.GPTModel` and its tokenizer, registered with the harness as ``lit_llm``. It answers the
harness's three kinds of request the way the harness's own Hugging Face backend does, so a checkpoint scores the same
here as its ``to-hf`` export scores there:

- ``loglikelihood(context, continuation)``: context and continuation are tokenized together and split where the
  context's tokens end (the harness's ``TemplateLM`` does this); the input is cut from the left to the model's
  context length; requests are sorted longest first, right-padded into batches (the GPT is causal, so padding on
  the right changes no earlier position) and scored by one forward pass each. Requests whose inputs are the same
  tokens (the choices of a multiple-choice question that differ only in their last token) share one forward pass.
- ``loglikelihood_rolling(text)``: the whole text is scored in windows of the context length, each token predicted
  exactly once, with the harness's own window function, for perplexity.
- ``generate_until(context, {"until": [...], "max_gen_toks": N, ...})``: lit_llm's decoding
  (:func:`lit_llm.model.sampling.generate_tokens`, KV cache, greedy unless ``do_sample``) until end-of-text, a stop
  sequence or ``max_gen_toks`` tokens. The GPT has no padding mask, so prompts of equal token length share a batch.

This module imports the harness, which is an optional extra: ``pip install 'lit_llm[eval]'``. Nothing else in lit_llm
imports it at module level, so lit_llm works without the extra; importing this module without it raises a
:class:`~lit_llm.errors.ConfigError` that says how to install it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lit_llm.errors import ConfigError
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import generate_tokens

EVAL_INSTALL = "pip install 'lit_llm[eval]'"

try:
    import lm_eval
    import lm_eval.models  # registers the harness's own backends first (it skips them once the registry has any)
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _err:  # the extra is not installed
    raise ConfigError(
        f"evaluation needs EleutherAI's lm-evaluation-harness, which is not installed ({_err}); install it with "
        f"{EVAL_INSTALL}"
    ) from _err

__all__ = [
    "EVAL_INSTALL",
    "LitLLMEvalModel",
    "build_task_manager",
    "check_tasks",
    "multiple_choice_task",
    "perplexity_task",
    "results_table",
    "scalar_metrics",
]

log = logging.getLogger(__name__)

#: Generation arguments the harness's tasks pass that decoding here reads; others are ignored with a warning.
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


@register_model("lit_llm")
class LitLLMEvalModel(TemplateLM):
    """The lm-evaluation-harness's view of a lit_llm GPT.

    Build it from a model and tokenizer in memory (the training callback does), or from a checkpoint by name through
    the harness (``lm_eval --model lit_llm --model_args checkpoint=PATH``), which loads it with
    :func:`lit_llm.weights.readers.load_model_for_inference` (LoRA merged, any format lit_llm reads).

    Args:
        model: The GPT (eval mode is set around each call and the previous mode restored). A ``torch.compile``d
            GPT works; the caller decides whether it runs compiled.
        tokenizer: Its tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and ``eos_id`` (the
            end-of-text id, which also conditions the first token of a text scored without context, as GPT-2's
            ``bos_token`` does in Hugging Face).
        checkpoint: Instead of ``model`` and ``tokenizer``: anything ``load_model_for_inference`` reads.
        batch_size: Sequences per forward pass.
        device: Where ``checkpoint`` is loaded: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
            A given ``model`` stays where it is.
        dtype: Weights' dtype for ``checkpoint``: ``float32``, ``bfloat16``, ``float16``; default: as stored.
        max_gen_toks: Most tokens ``generate_until`` produces when a task does not say (the harness's default, 256,
            capped so that at least one prompt token fits the context).
        show_progress: Show a progress bar per kind of request.
    """

    def __init__(
        self,
        model: GPTModel | None = None,
        tokenizer: Any = None,
        checkpoint: str | None = None,
        batch_size: int | str = 16,
        device: str = "auto",
        dtype: str | None = None,
        max_gen_toks: int = 256,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        if (model is None) == (checkpoint is None):
            raise ConfigError("LitLLMEvalModel needs either model= (with tokenizer=) or checkpoint=, not both")
        if checkpoint is not None:
            model, tokenizer = load_for_evaluation(str(checkpoint), device=device, dtype=dtype)
        if tokenizer is None:
            raise ConfigError("LitLLMEvalModel(model=...) needs the model's tokenizer (tokenizer=...)")
        try:
            size = int(batch_size)  # the harness passes model_args and --batch_size as strings
        except (TypeError, ValueError):
            size = 0
        if size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (no 'auto' here)")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = size
        self.show_progress = show_progress
        self.vocab_size = int(model.config.vocab_size)
        self._max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device
        self._warned_gen_keys: set[str] = set()

    # ---- what the harness reads ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def max_length(self) -> int:
        """The model's context length: the longest input of one forward pass."""
        return int(self.model.config.context_length)

    @property
    def max_gen_toks(self) -> int:
        return min(self._max_gen_toks, self.max_length - 1)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"lit_llm-{getattr(self.tokenizer, 'fingerprint', type(self.tokenizer).__name__)[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # GPT-2 style tokenizers add no special tokens, so add_special_tokens changes nothing (as in Hugging Face).
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        """What the results record about the model."""
        cfg = self.model.config
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype),
                "model_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None}

    # ---- scoring -----------------------------------------------------------------------------------------------

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary (padding columns dropped: they would take probability mass)."""
        return self.model(inputs)[..., : self.vocab_size]

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Score ``(key, context_ids, continuation_ids)`` requests: (sum of log-probabilities, greedy or not)."""
        from tqdm import tqdm

        L = self.max_length
        # One forward pass per distinct input: the last L tokens of context + continuation, minus the last token.
        by_input: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(f"request {i} has an empty context or continuation; the harness never sends one")
            if len(continuation) > L:
                raise ConfigError(f"a continuation of {len(continuation)} tokens cannot be scored by a model whose "
                                  f"context_length is {L}")
            by_input.setdefault(tuple((context + continuation)[-(L + 1):][:-1]), []).append(i)
        inputs = sorted(by_input, key=lambda ids: (-len(ids), ids))  # longest first: padding is least, OOMs early
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.show_progress,
                   desc="Running loglikelihood requests")
        with self._inference():
            for start in range(0, len(inputs), self.batch_size):
                chunk = inputs[start : start + self.batch_size]
                width = len(chunk[0])  # right padding (with token 0) changes nothing before it in a causal model
                batch = torch.tensor([list(ids) + [0] * (width - len(ids)) for ids in chunk])
                logits = self._logits(batch.to(self.device))
                # Every (row, position, target) a continuation token is scored at, flattened over the batch's
                # requests, so the scoring is a few large operations instead of several small ones per request.
                members = [i for ids in chunk for i in by_input[ids]]
                rows: list[int] = []
                cols: list[int] = []
                targets: list[int] = []
                for row, ids in enumerate(chunk):
                    for i in by_input[ids]:
                        continuation = requests[i][2]
                        rows += [row] * len(continuation)
                        cols += range(len(ids) - len(continuation), len(ids))
                        targets += continuation
                owners = [k for k, i in enumerate(members) for _ in requests[i][2]]  # request k of the batch
                sums, misses = self._score(logits, rows, cols, targets, owners, len(members))
                for k, i in enumerate(members):
                    answer = (sums[k], misses[k] == 0)
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(members))
        bar.close()
        return results  # type: ignore[return-value]

    def _score(self, logits: torch.Tensor, rows: list[int], cols: list[int], targets: list[int], owners: list[int],
               n: int) -> tuple[list[float], list[int]]:
        """Per request: the summed log-probability of its target tokens and how many of them are not the argmax.

        The log-softmax runs in float32 over the selected positions only, a bounded number of them at a time (a
        window of 1,024 tokens over GPT-2's vocabulary is 200 MB in float32).
        """
        device = logits.device
        rows_t = torch.tensor(rows, device=device)
        cols_t = torch.tensor(cols, device=device)
        targets_t = torch.tensor(targets, device=device)
        owners_t = torch.tensor(owners, device=device)
        sums = torch.zeros(n, dtype=torch.float64, device=device)
        misses = torch.zeros(n, dtype=torch.long, device=device)
        step = max(1, (1 << 28) // (4 * logits.shape[-1]))  # about 256 MB of float32 log-probabilities at a time
        for start in range(0, len(rows), step):
            part = slice(start, start + step)
            selected = logits[rows_t[part], cols_t[part]].float()  # (tokens, vocab)
            target = targets_t[part]
            picked = F.log_softmax(selected, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            sums.index_add_(0, owners_t[part], picked.double())
            misses.index_add_(0, owners_t[part], (selected.argmax(dim=-1) != target).long())
        return sums.tolist(), misses.tolist()

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in windows of the context length (each token predicted once)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            pieces = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_eval_utils.make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context with lit_llm's decoding until a stop sequence, end-of-text or ``max_gen_toks``."""
        from tqdm import tqdm

        eos_text = self.tok_decode([self.eot_token_id])
        groups: dict[tuple[str, int], list[int]] = {}
        settings: dict[str, dict[str, Any]] = {}
        encoded: list[list[int]] = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            if key not in settings:
                settings[key] = self._generation_settings(gen_kwargs, eos_text)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            ids = ids[-(self.max_length - settings[key]["max_new_tokens"]):]
            encoded.append(ids)
            groups.setdefault((key, len(ids)), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.show_progress,
                   desc="Running generate_until requests")
        # Longest prompts first, as the harness's backends do.
        for key, length in sorted(groups, key=lambda g: -g[1]):
            rows = groups[(key, length)]
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                texts = self._generate([encoded[i] for i in chunk], **settings[key])
                for i, text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def _generation_settings(self, gen_kwargs: dict[str, Any], eos_text: str) -> dict[str, Any]:
        if not isinstance(gen_kwargs, dict):
            raise ConfigError(f"generation arguments must be a mapping, got {gen_kwargs!r}")
        for key in sorted(set(gen_kwargs) - _GEN_KEYS - self._warned_gen_keys):
            log.warning("lit_llm evaluation ignores the generation argument %s=%r", key, gen_kwargs[key])
            self._warned_gen_keys.add(key)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if eos_text not in until:
            until.append(eos_text)
        max_new = int(gen_kwargs.get("max_gen_toks") or self.max_gen_toks)
        if max_new >= self.max_length:
            raise ConfigError(f"max_gen_toks={max_new} leaves no room for the prompt in the model's context of "
                              f"{self.max_length} tokens; ask for fewer")
        sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0 if sample else 0.0) or 0.0)
        return {"until": [s for s in until if s], "max_new_tokens": max_new,
                "temperature": temperature if sample else 0.0,
                "top_k": gen_kwargs.get("top_k") if sample else None,
                "top_p": gen_kwargs.get("top_p") if sample else None}

    def _generate(self, prompts: list[list[int]], *, until: list[str], max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None) -> list[str]:
        """Decode a batch of equal-length prompts; returns each continuation cut before its first stop sequence."""
        idx = torch.tensor(prompts, dtype=torch.long, device=self.device)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        # A stop sequence spans at most this many characters of new text, so only the tail needs checking.
        tail = max((len(s) for s in until), default=0) + 16
        with self._inference():
            steps = generate_tokens(self.model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, eos_id=self.eot_token_id)
            for nxt in steps:
                for row, token in enumerate(nxt[:, 0].tolist()):
                    if done[row]:
                        continue
                    if token == self.eot_token_id:
                        done[row] = True
                        continue
                    new[row].append(token)
                    text = self.tok_decode(new[row][-tail:])
                    if any(s in text for s in until):
                        done[row] = True
                if all(done):
                    break  # the generator stops; the rest of the budget is not spent
        out = []
        for ids in new:
            text = self.tok_decode(ids)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode and no autograd for the duration; the model's previous mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)


# ---- loading -----------------------------------------------------------------------------------------------------


def load_for_evaluation(source: str, device: str = "auto", dtype: str | torch.dtype | None = None) -> tuple[GPTModel,
                                                                                                         Any]:
    """The eval-mode GPT and tokenizer of any checkpoint lit_llm writes or reads, for the harness.

    Args:
        source: A lit_llm ``.ckpt`` or run directory (pretrained, instruction-tuned, LoRA: merged on reading), a
            consolidated file of a sharded run, a converted or Hugging Face GPT-2 directory, or a Hub id.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``float32``, ``bfloat16``, ``float16`` (or a ``torch.dtype``); ``None``/``auto`` keeps the stored one.

    Raises:
        CheckpointError: Nothing readable at ``source``, or it is a classifier (which has no language-model head).
        ConfigError: No tokenizer is known for the checkpoint, or a bad device or dtype.
    """
    from lit_llm.cli import dtype_from_name, resolve_device
    from lit_llm.errors import CheckpointError
    from lit_llm.weights.readers import load_model_for_inference

    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    target = resolve_device(device)
    try:
        model, tokenizer, _ = load_model_for_inference(source, device=str(target), dtype=dtype)
    except CheckpointError as err:
        if _is_classifier(source):
            raise CheckpointError(
                f"{source} is a classification checkpoint: its head predicts classes, not tokens, so it has no "
                "log-likelihoods for the harness to score. Evaluate it with python -m lit_llm.classify on labelled "
                "texts, or evaluate the language model it was finetuned from"
            ) from err
        raise
    if tokenizer is None:
        raise ConfigError(f"no tokenizer is stored with {source!r} (no tokenizer.json beside it); put the model's "
                          "tokenizer.json next to the weights")
    return model.eval(), tokenizer


def _is_classifier(source: str) -> bool:
    """Whether ``source`` is a Lightning checkpoint written by the classification task (read weights-only)."""
    from lit_llm.errors import LitLLMError
    from lit_llm.weights.discovery import newest_checkpoint
    from lit_llm.weights.files import torch_load

    path = Path(source).expanduser()
    if path.is_dir():
        path = newest_checkpoint(path) or path
    if not path.is_file() or path.suffix != ".ckpt":
        return False
    try:
        ckpt = torch_load(path)
    except (LitLLMError, OSError, RuntimeError):
        return False
    return isinstance(ckpt, dict) and isinstance(ckpt.get("classifier"), dict)


# ---- tasks -------------------------------------------------------------------------------------------------------


def build_task_manager(include_path: str | Path | Sequence[str | Path] | None = None,
                       include_defaults: bool = True) -> Any:
    """The harness's ``TaskManager`` over its own tasks (unless ``include_defaults`` is off) and the task YAML
    files under ``include_path``.

    Raises:
        FileNotFoundError: An ``include_path`` that does not exist.
    """
    from lm_eval.tasks import TaskManager

    paths = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    for p in paths:
        if not Path(p).expanduser().exists():
            raise FileNotFoundError(f"--include_path {str(p)!r} does not exist (cwd: {Path.cwd()}); pass the folder "
                                    "that holds your task YAML files")
    return TaskManager(include_path=[str(Path(p).expanduser()) for p in paths] or None,
                       include_defaults=include_defaults)


def check_tasks(names: Iterable[str], task_manager: Any) -> list[str]:
    """The task names, each checked against the harness's index (tasks, groups and tags; wildcards allowed).

    Raises:
        ConfigError: One message naming every unknown task and how to list the known ones.
    """
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError("--tasks is empty; pass task names separated by commas, e.g. --tasks hellaswag,arc_easy")
    known = set(task_manager.all_tasks)
    unknown = [n for n in names if n not in known and not task_manager.match_tasks([n])]
    if unknown:
        close = {n: difflib.get_close_matches(n, sorted(known), n=3, cutoff=0.75) for n in unknown}
        hints = "; ".join(f"{n!r} (did you mean {', '.join(c)}?)" if c else repr(n) for n, c in close.items())
        raise ConfigError(
            f"unknown task{'s' if len(unknown) > 1 else ''}: {hints}. List the known tasks with "
            "python -m lit_llm.evaluate --list_tasks [--include_path DIR]; a task of your own is a YAML file in the "
            "harness's task format in the folder given to --include_path"
        )
    return names


def multiple_choice_task(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """A harness task config (a dict ``simple_evaluate``/``get_task_dict`` accept) over a local JSON Lines file of
    multiple-choice questions: one ``{"context": str, "choices": [str, ...], "answer": int}`` object per line.

    The score is ``acc`` (the choice with the highest log-likelihood given the context) and ``acc_norm`` (the same,
    per character of the choice). Choices are appended to the context as written: start them with a space when
    they are separate words.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: A line is not such an object.
    """
    file = _read_jsonl(path, required={"context": str, "choices": list, "answer": int})
    return {
        "task": name or _task_name(file),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def perplexity_task(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """A harness task config over a local JSON Lines file of texts (``{"text": str}`` per line), scored by
    ``loglikelihood_rolling``: word and byte perplexity and bits per byte.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: A line is not such an object.
    """
    file = _read_jsonl(path, required={"text": str})
    return {
        "task": name or _task_name(file),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(file)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "should_decontaminate": False,
        # The harness knows these metrics' aggregations (weighted perplexities, bits per byte over all bytes).
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    }


def _task_name(file: Path) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in file.stem)


def _read_jsonl(path: str | Path, required: dict[str, type]) -> Path:
    """Check every line of a JSON Lines file has the ``required`` fields (the harness would fail deep inside)."""
    from lit_llm.errors import DataError

    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"{path} does not exist (cwd: {Path.cwd()})")
    fields = ", ".join(f'"{k}": {t.__name__}' for k, t in required.items())
    count = 0
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{file}:{n} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in required.items()):
                raise DataError(f"{file}:{n} must be a JSON object with {fields}")
            count += 1
    if not count:
        raise DataError(f"{file} holds no records; each line must be a JSON object with {fields}")
    return file


# ---- results -----------------------------------------------------------------------------------------------------


def scalar_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>_<metric>": value}`` for every finite number the harness reports (standard errors left out)."""
    out: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if metric in ("sample_len",) or not math.isfinite(float(value)):
                continue
            suffix = "" if filt in ("", "none") else f"_{filt}"
            out[f"{task}_{metric}{suffix}"] = float(value)
    return out


def results_table(results: dict[str, Any]) -> str:
    """The harness's own table of the results (and of groups, when there are any)."""
    table = lm_eval_utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_eval_utils.make_table(results, "groups")
    return table


def harness_version() -> str:
    """The installed harness's version."""
    return str(getattr(lm_eval, "__version__", "unknown"))
