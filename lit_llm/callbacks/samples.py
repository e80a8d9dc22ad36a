"""Print what the model writes as it trains, like the book's ``generate_and_print_sample``."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from rich.console import Console
from rich.text import Text

from lit_llm.distributed import params_are_sharded
from lit_llm.errors import ConfigError
from lit_llm.model.sampling import generate

_T = TypeVar("_T")


def call_inside_root(trainer: pl.Trainer, pl_module: pl.LightningModule, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` from inside the forward of the strategy's outermost wrapper (FSDP, DeepSpeed engine).

    FSDP wraps the LightningModule itself and gathers the weights that live outside the wrapped blocks (embeddings,
    final norm, head) only while that outer wrapper's forward runs, so calling ``pl_module.model`` directly would
    meet sharded weights. Lightning runs ``training_step`` through the wrapper in the same way.
    """
    wrapper = trainer.strategy.model
    if wrapper is None:
        return fn()
    own_forward = pl_module.__dict__.get("forward")
    result: list[_T] = []

    def redirected(*args: Any, **kwargs: Any) -> None:
        _restore_forward(pl_module, own_forward)
        result.append(fn())

    pl_module.forward = redirected  # type: ignore[method-assign]
    try:
        wrapper()
    finally:
        _restore_forward(pl_module, own_forward)
    return result[0]


def _restore_forward(module: torch.nn.Module, own_forward: Any) -> None:
    if own_forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = own_forward  # type: ignore[method-assign]


def eager() -> contextlib.AbstractContextManager:
    """Run a ``compile()``d model eagerly: it would otherwise recompile for eval mode and for new sequence lengths."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()  # nothing can be compiled, and importing the compiler takes a second
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def format_count(n: float) -> str:
    """``1234567`` -> ``"1.2M"``; plain digits below a thousand."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return str(int(n))


class SampleGeneration(pl.Callback):
    """Generate a continuation of a prompt every ``every_n_steps`` optimizer steps and at the end of training.

    Each sample is printed as one line, ``[step 500 | 1.2M tokens] Every effort moves you ...``, appended to
    ``samples.txt`` in the run's log directory, and added to TensorBoard (``samples`` text) when a TensorBoardLogger
    is attached. Generation runs in eval mode under ``torch.no_grad()``, starts from a fresh generator seeded with
    ``seed`` each time, and puts the model back in train mode afterwards; greedy decoding (``temperature=0``, the
    default) makes samples from the same weights identical.

    The tokenizer comes from ``trainer.datamodule.tokenizer`` (``encode``, ``decode``, optional ``eos_id``); without
    one the callback warns once and does nothing. Under FSDP and DeepSpeed ZeRO-3 every rank generates (each
    forward gathers the sharded weights collectively) and rank 0 prints; otherwise rank 0 alone generates.

    The seconds spent generating accumulate in ``throughput_excluded_seconds``, which
    :class:`~lit_llm.callbacks.Throughput` leaves out of its measurements.
    """

    def __init__(
        self,
        prompt: str = "Every effort moves you",
        every_n_steps: int | None = 500,
        max_new_tokens: int = 50,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 123,
        at_fit_end: bool = True,
    ) -> None:
        """Print model samples during training.

        Args:
            prompt: Text to continue (the book's "Every effort moves you"). Cropped from the left to the model's
                context length.
            every_n_steps: Generate every this many optimizer steps; None generates only at the end of training.
            max_new_tokens: Tokens to generate per sample (fewer if the tokenizer's end-of-text id comes first).
            temperature: 0 decodes greedily (deterministic); higher values sample more randomly.
            top_k: Sample only among the k most likely tokens (None: all). Ignored when temperature is 0.
            top_p: Sample only among the most likely tokens whose probabilities sum to top_p (None: all). Ignored
                when temperature is 0.
            seed: Seed of the sampling generator, reset for every sample so samples are comparable across steps.
            at_fit_end: Also generate once when training ends.
        """
        super().__init__()
        problems = []
        if not isinstance(prompt, str) or not prompt:
            problems.append(f"prompt={prompt!r} must be a non-empty string")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            problems.append(f"every_n_steps={every_n_steps!r} must be a positive integer, or None for fit end only")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            problems.append(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        if temperature < 0:
            problems.append(f"temperature={temperature!r} must be >= 0 (0 is greedy)")
        if top_k is not None and top_k < 1:
            problems.append(f"top_k={top_k!r} must be a positive integer or None")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            problems.append(f"top_p={top_p!r} must be in (0, 1] or None")
        if problems:
            raise ConfigError("Invalid SampleGeneration arguments:\n  - " + "\n  - ".join(problems))
        self.prompt = prompt
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = seed
        self.at_fit_end = at_fit_end
        self.throughput_excluded_seconds = 0.0  # time spent generating; Throughput leaves it out of its windows
        self._last_step: int | None = None
        self._warned = False
        self._log_dir: str | None = None
        self._console: Console | None = None  # made on first use: a Console holds locks, which cannot be pickled

    # --- generation --------------------------------------------------------------------------------------------

    def generate_sample(self, model: torch.nn.Module, tokenizer: Any, device: torch.device | str = "cpu") -> str:
        """Continue ``prompt`` with ``model`` and return prompt + continuation as one line of text.

        Args:
            model: A ``GPTModel`` (or anything with its ``config`` and call signature).
            tokenizer: Has ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and optionally ``eos_id``.
            device: Where the model's weights are.
        """
        ids = list(tokenizer.encode(self.prompt))[-model.config.context_length :]
        eos_id = getattr(tokenizer, "eos_id", None)
        if not ids:
            if eos_id is None:
                raise ConfigError(
                    f"SampleGeneration(prompt={self.prompt!r}) encodes to no tokens; choose a prompt with text"
                )
            ids = [eos_id]  # GPT-2 style: end-of-text also starts a document
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        generator = None
        if self.temperature > 0:
            generator = torch.Generator(device=idx.device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), eager():
                out = generate(
                    model, idx, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                    top_p=self.top_p, eos_id=eos_id, generator=generator,
                )
        finally:
            model.train(was_training)
        # One line per sample, as the book prints it (splitlines also catches \r, form feeds and Unicode breaks).
        return " ".join(tokenizer.decode(out[0].tolist()).splitlines())

    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if self._last_step == step:
            return  # already sampled these weights (gradient accumulation, or fit end right after a sample)
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None:
            if not self._warned:
                rank_zero_warn(
                    "SampleGeneration: no tokenizer at trainer.datamodule.tokenizer, so no samples are generated; "
                    "train with a lit_llm DataModule or remove the callback"
                )
                self._warned = True
            return
        self._last_step = step
        if not getattr(trainer.strategy, "supports_generation", True):  # a model split by layers or by heads
            if not self._warned:
                rank_zero_warn(f"SampleGeneration: no samples under {type(trainer.strategy).__name__}, whose split "
                               "model has no one-device forward to generate with; consolidate a checkpoint "
                               "(python -m lit_llm.convert consolidate) and run python -m lit_llm.generate on it")
                self._warned = True
            return
        sharded = params_are_sharded(trainer.strategy)
        # Under FSDP / DeepSpeed ZeRO-3 each rank holds a shard of the weights and every forward gathers them
        # collectively, so all ranks must generate together (rank 0 alone would hang); otherwise only rank 0 works.
        if not (trainer.is_global_zero or sharded):
            return
        model = pl_module.model
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the timing below does not include queued training work
        start = time.perf_counter()

        def run() -> str:
            with trainer.precision_plugin.forward_context():
                return self.generate_sample(model, tokenizer, pl_module.device)

        with torch.no_grad():
            text = call_inside_root(trainer, pl_module, run) if sharded else run()
        self.throughput_excluded_seconds += time.perf_counter() - start  # decode() read the ids back: no sync needed
        if trainer.is_global_zero:
            self._emit(trainer, pl_module, step, text)

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, text: str) -> None:
        tokens = getattr(pl_module, "tokens_seen", None)
        head = f"[step {step} | {format_count(float(tokens))} tokens]" if tokens is not None else f"[step {step}]"
        # Text, not markup: generated text may contain "[...]" that rich would take for style tags.
        if self._console is None:
            self._console = Console(highlight=False)
        self._console.print(Text.assemble((head, "bold cyan"), " ", text))
        log_dir = self._log_dir or trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "samples.txt"), "a", encoding="utf-8") as f:
            f.write(f"{head} {text}\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", f"{head} {text}", global_step=step)

    # --- hooks -------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir is a collective call (it broadcasts), so resolve it here, where every rank runs.
        self._log_dir = trainer.log_dir or trainer.default_root_dir
        self._last_step = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            self._sample(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: by fit end the strategy has torn down and moved the model to the CPU.
        if self.at_fit_end:
            self._sample(trainer, pl_module)
