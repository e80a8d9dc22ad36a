"""Score the model on a small benchmark while it trains, through the lm-evaluation-harness."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lit_llm.callbacks.samples import call_inside_root, eager
from lit_llm.distributed.common import params_are_sharded
from lit_llm.errors import ConfigError


class PeriodicEval(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and when training ends), score the live model on a small benchmark
    and log ``eval/<task>_<metric>`` beside the loss.

    The benchmark is any mix of a local multiple-choice file (``eval/<name>_acc``, ``eval/<name>_acc_norm``), a local
    text file scored for perplexity (``eval/<name>_word_perplexity``, ``..._byte_perplexity``,
    ``..._bits_per_byte``) and tasks of the lm-evaluation-harness by name (with ``include_path`` for task YAML files
    of your own); it runs through :class:`lit_llm.evaluation.LitLLMEvalModel` in eval mode under ``no_grad``, eagerly
    when the model is compiled, and the model goes back to train mode after. Metrics go to every logger at the step
    they were measured (with ``eval/seconds``, what the evaluation took), a line is printed, and each evaluation is
    kept in ``history``.

    The cost is bounded: with ``max_overhead`` (default 2 %), an evaluation that falls due is put off while the
    seconds spent evaluating, plus what the last evaluation took, would exceed that fraction of the training time
    so far. The seconds spent accumulate in ``throughput_excluded_seconds``, which
    :class:`~lit_llm.callbacks.Throughput` leaves out of its measurements. Under FSDP and DeepSpeed ZeRO-3 every
    rank evaluates (each forward gathers the sharded weights collectively) and rank 0 logs; otherwise rank 0 alone
    evaluates. The tokenizer comes from ``trainer.datamodule.tokenizer``; without one the callback warns once and
    does nothing. Needs the extra: ``pip install 'lit_llm[eval]'``.
    """

    def __init__(
        self,
        multiple_choice: str | None = None,
        perplexity: str | None = None,
        tasks: list[str] | None = None,
        include_path: str | None = None,
        every_n_steps: int | None = 500,
        limit: int | None = 100,
        batch_size: int = 16,
        max_overhead: float | None = 0.02,
        at_fit_end: bool = True,
    ) -> None:
        """Evaluate on a benchmark while training.

        Args:
            multiple_choice: A JSON Lines file of questions, one ``{"context": str, "choices": [str, ...],
                "answer": int}`` per line (the choices are appended to the context as written: start them with a
                space when they are separate words). Its stem names the metrics.
            perplexity: A JSON Lines file of texts, one ``{"text": str}`` per line, scored for perplexity over
                windows of the context length.
            tasks: lm-evaluation-harness task names (their datasets download from the Hugging Face Hub on first use).
            include_path: A folder of task YAML files in the harness's format, named in ``tasks``.
            every_n_steps: Evaluate every this many optimizer steps; None evaluates only at the end of training.
            limit: Score only the first this many documents of each task (None: all of them).
            batch_size: Sequences per forward pass.
            max_overhead: Put an evaluation off while evaluating would take more than this fraction of the training
                time so far; None evaluates at every ``every_n_steps`` whatever it costs.
            at_fit_end: Also evaluate once when training ends (whatever ``max_overhead`` says).
        """
        super().__init__()
        problems = []
        if multiple_choice is None and perplexity is None and not tasks:
            problems.append("nothing to evaluate: set multiple_choice (a .jsonl of questions), perplexity (a .jsonl "
                            "of texts) or tasks (harness task names)")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            problems.append(f"every_n_steps={every_n_steps!r} must be a positive integer, or None for fit end only")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            problems.append(f"limit={limit!r} must be a positive integer, or None for every document")
        if not isinstance(batch_size, int) or batch_size < 1:
            problems.append(f"batch_size={batch_size!r} must be a positive integer")
        if max_overhead is not None and not 0.0 < max_overhead <= 1.0:
            problems.append(f"max_overhead={max_overhead!r} must be in (0, 1], or None for no bound")
        if problems:
            raise ConfigError("Invalid PeriodicEval arguments:\n  - " + "\n  - ".join(problems))
        from lit_llm import evaluation  # the harness: an optional extra, whose absence is reported here

        self._specs: list[str | dict[str, Any]] = list(tasks or [])
        if multiple_choice is not None:
            self._specs.append(evaluation.multiple_choice_task(multiple_choice))
        if perplexity is not None:
            self._specs.append(evaluation.perplexity_task(perplexity))
        self.include_path = include_path
        self.named_tasks = list(tasks or [])
        self.every_n_steps = every_n_steps
        self.limit = limit
        self.batch_size = batch_size
        self.max_overhead = max_overhead
        self.at_fit_end = at_fit_end
        self.history: list[dict[str, float]] = []
        self.throughput_excluded_seconds = 0.0  # time spent evaluating; Throughput leaves it out of its windows
        self._task_dict: Any = None
        self._last_step: int | None = None
        self._last_cost = 0.0
        self._train_start: float | None = None
        self._warned = False

    # --- evaluation --------------------------------------------------------------------------------------------

    def _tasks(self) -> Any:
        """The harness's task objects, built once (indexing the harness's own tasks takes seconds)."""
        if self._task_dict is None:
            from lit_llm.evaluation import build_task_manager, check_tasks

            manager = build_task_manager(self.include_path, include_defaults=bool(self.named_tasks))
            if self.named_tasks:
                check_tasks(self.named_tasks, manager)
            with _quiet():
                if hasattr(manager, "load"):  # lm-eval >= 0.4.10; get_task_dict is deprecated there
                    self._task_dict = manager.load(self._specs)
                else:
                    from lm_eval.tasks import get_task_dict

                    self._task_dict = get_task_dict(self._specs, manager)
        return self._task_dict

    def evaluate(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, float]:
        """Score ``model`` on the benchmark now; returns ``{"<task>_<metric>": value}``.

        Args:
            model: A ``GPTModel`` (or a compiled one); its train/eval mode is restored after.
            tokenizer: Has ``encode``, ``decode`` and ``eos_id``.
        """
        from lm_eval.evaluator import evaluate

        from lit_llm.evaluation import LitLLMEvalModel, scalar_metrics

        lm = LitLLMEvalModel(model=model, tokenizer=tokenizer, batch_size=self.batch_size, show_progress=False)
        with eager(), _quiet():
            results = evaluate(lm=lm, task_dict=self._tasks(), limit=self.limit, bootstrap_iters=0, log_samples=False)
        return scalar_metrics(results or {})

    def _due(self, trainer: pl.Trainer) -> bool:
        """Whether the evaluation fits the overhead budget; rank 0 decides for all (timings differ by rank)."""
        if self.max_overhead is None or self._train_start is None:
            return True
        training = time.perf_counter() - self._train_start - self.throughput_excluded_seconds
        fits = self.throughput_excluded_seconds + self._last_cost <= self.max_overhead * training
        return bool(trainer.strategy.broadcast(fits, src=0))

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, budgeted: bool) -> None:
        step = trainer.global_step
        if self._last_step == step:
            return  # already scored these weights (gradient accumulation, or fit end right after an evaluation)
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            if not self._warned:
                rank_zero_warn("PeriodicEval: no tokenizer at trainer.datamodule.tokenizer, so nothing is evaluated; "
                               "train with a lit_llm DataModule or remove the callback")
                self._warned = True
            return
        if budgeted and not self._due(trainer):
            return
        self._last_step = step
        sharded = params_are_sharded(trainer.strategy)
        # Under FSDP / DeepSpeed ZeRO-3 every forward gathers the shards collectively, so all ranks evaluate the same
        # requests in the same order; otherwise rank 0 alone does.
        if not (trainer.is_global_zero or sharded):
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the timing below does not include queued training work
        start = time.perf_counter()

        def run() -> dict[str, float]:
            with trainer.precision_plugin.forward_context():
                return self.evaluate(pl_module.model, tokenizer)

        metrics = call_inside_root(trainer, pl_module, run) if sharded else run()
        cost = time.perf_counter() - start  # the scores were read back to the host: the GPU work is done
        self._last_cost = cost
        self.throughput_excluded_seconds += cost
        if trainer.is_global_zero:
            logged = {**{f"eval/{k}": v for k, v in metrics.items()}, "eval/seconds": cost}
            self.history.append({"step": float(step), "seconds": cost, **logged})
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            rank_zero_info(f"[step {step}] eval: {shown} ({cost:.1f} s)")

    # --- hooks -------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()
        self.throughput_excluded_seconds = 0.0
        self._last_cost = 0.0
        self._last_step = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            self._run(trainer, pl_module, budgeted=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: by fit end the strategy has torn down and moved the model to the CPU.
        if self.at_fit_end:
            self._run(trainer, pl_module, budgeted=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The harness logs every request it builds at INFO and WARNING; during training one line per evaluation is
    enough, so its loggers are raised to ERROR for the duration."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
