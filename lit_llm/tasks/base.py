"""What every lit_llm task shares: the GPT built in ``configure_model``, AdamW + schedule, clipping, token count."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_llm.callbacks.signals import StopAgreement
from lit_llm.distributed import (
    check_ddp_options,
    engine_grad_norm,
    is_deepspeed,
    is_fsdp,
    is_fsdp1,
    is_fsdp2,
    is_zero3,
    params_are_sharded,
    shard_with_fsdp2,
    splits_model,
)
from lit_llm.errors import ConfigError
from lit_llm.model.config import GPTConfig
from lit_llm.model.float8 import check_float8_device, convert_to_float8
from lit_llm.model.gpt import GPTModel
from lit_llm.model.lora import LoRAConfig, apply_lora, count_trainable, is_lora_key
from lit_llm.model.losses import triton_interpreting
from lit_llm.tasks.optim import StepSchedule, build_adamw, lr_multiplier, parameter_groups
from lit_llm.tasks.options import Optimization, SdpaBackend, Speed, check_options, coerce
from lit_llm.tasks.resume import FIXED, check_resume_settings, log_applied


class GPTTask(pl.LightningModule):
    """Base LightningModule: owns the GPT, the optimizer and the learning-rate schedule.

    Subclasses implement the steps. The Trainer owns accumulation, precision, checkpointing and distribution.
    """

    #: Hyperparameters (dotted keys) a resume cannot change; every other setting of the run's config applies on a
    #: resume (:mod:`lit_llm.tasks.resume`). A task adds the ones its weights or optimizer state depend on.
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = FIXED

    def __init__(
        self,
        model: GPTConfig | None = None,
        vocab_size: int | None = None,
        optim: Optimization | None = None,
        speed: Speed | None = None,
        init_weights: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        """
        Args:
            model: The GPT's shape and options (the book's ``GPT_CONFIG_124M`` keys). ``vocab_size`` here is
                overridden by the ``vocab_size`` argument when that is given.
            vocab_size: Vocabulary size; ``lit_llm.train`` links it from the tokenizer so the two always agree.
            optim: AdamW, the learning-rate schedule and gradient clipping
                (:class:`~lit_llm.tasks.options.Optimization`).
            speed: How the same math runs faster or in less memory: compilation, attention kernel, activation
                checkpointing, chunked or fused loss, FP8 (:class:`~lit_llm.tasks.options.Speed`).
            init_weights: Initial weights: a lit_llm checkpoint, a converted weights dir, an HF directory or a Hub id
                such as openai-community/gpt2. ``model`` must describe the same architecture (for GPT-2: the
                ``gpt2-*`` shape with ``qkv_bias: true`` and ``tie_weights: true``); any key or shape mismatch stops
                the run with a list of them. Loaded when the model is built (so a missing file is reported then, as a
                one-line CheckpointError); a resumed run (``--ckpt_path``) skips it, as Lightning restores the
                checkpoint's weights right after.
            lora: LoRA adapters (the book's appendix E), e.g. ``{rank: 16, alpha: 16, targets: [attention, ff]}``:
                the targeted Linear layers get trainable low-rank adapters and every other parameter is frozen
                (a task may un-freeze more in ``select_trainable``, e.g. a new head). Added after ``init_weights``
                is loaded; checkpoints then hold the base weights and the adapters, and every weights reader of
                lit_llm merges them. ``null``: no adapters, every parameter trains. See docs/lora.md.
        """
        super().__init__()
        config = _as_config(model)
        if vocab_size is not None:
            config = config.replace(vocab_size=vocab_size)
        self.optim = coerce(Optimization, optim, "model.optim")
        self.speed = coerce(Speed, speed, "model.speed")
        self.lora_config = LoRAConfig.coerce(lora)
        check_options(self.optim, self.speed, self.lora_config)
        self.config = config
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model", "lora", "optim", "speed"])
        self.hparams["model"] = config.to_dict()
        self.hparams["vocab_size"] = config.vocab_size
        self.hparams["optim"] = dataclasses.asdict(self.optim)
        self.hparams["speed"] = dataclasses.asdict(self.speed)
        self.hparams["lora"] = self.lora_config.to_dict() if self.lora_config is not None else None
        self.model: GPTModel | None = None
        self.tokens_seen = 0
        #: Set by ``lit_llm.train`` when the run resumes from this checkpoint (``init_weights`` is then not read).
        self.resume_checkpoint: str | None = None

    # ---- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the GPT here (idempotent) so that sharded strategies can initialise it directly on the devices."""
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        if strategy is not None:
            check_ddp_options(strategy, getattr(self._trainer, "accumulate_grad_batches", 1))
        loads_weights = bool(self.hparams.get("init_weights")) and not self._resuming()
        self.model = None
        builds_split = splits_model(strategy)  # tensor / pipeline parallel
        if (is_fsdp(strategy) or builds_split) and not loads_weights:
            # A model that fits on one device is built there whole, as a one-device run builds it (Lightning builds
            # on the GPU), so its initial weights are exactly that run's with the same seed; FSDP then shards it. A
            # larger one is built without memory, and FSDP materialises each unit on its GPU (reset_parameters runs
            # lit_llm's initialisation) and shards it; but a tied head would come out untied from that path (each
            # module is materialised separately), so a large tied model is built whole on the CPU, as is any model
            # whose weights are loaded (they need real tensors).
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                meta = GPTModel(self.config)
            device = getattr(strategy, "root_device", torch.device("cpu"))
            if not _too_big_to_build_whole(meta, device):
                with torch.device(device):
                    self.model = GPTModel(self.config)
            elif not self.config.tie_weights:
                self.model = meta
                rank_zero_info(f"FSDP: the model ({meta.num_parameters():,} parameters) is built on the meta device "
                               "and initialised shard by shard on the GPUs; its initial weights are not those a "
                               "one-device run with the same seed starts from")
        if self.model is None:
            self.model = GPTModel(self.config)
        self.model.activation_checkpointing = self.speed.activation_checkpointing
        self.model.autocast_residual = self.speed.low_precision_residual
        if self.hparams.get("init_weights"):
            self._load_init_weights(self.hparams.init_weights)
        self.adapt_model(self.model)
        if self.lora_config is not None:
            # Before Lightning restores a checkpoint (it does so after configure_model), so resuming finds the
            # adapters' parameters in place.
            adapted = apply_lora(self.model, self.lora_config)
            c = self.lora_config
            rank_zero_info(f"LoRA rank {c.rank}, alpha {c.alpha:g} on {len(adapted)} layers ({', '.join(c.targets)})")
        self.select_trainable(self.model)
        trainable, total = count_trainable(self.model)
        rank_zero_info(f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / max(total, 1):.2f}%)")
        self.model.record_parameter_counts()  # before a sharded strategy replaces the parameters by shards
        if self.speed.float8:
            self._convert_to_float8(strategy)
        if strategy is not None and is_fsdp2(strategy):
            precision = getattr(self._trainer.precision_plugin, "precision", "32-true")
            shard_with_fsdp2(self.model, strategy, str(precision))
        zero3 = is_zero3(strategy)
        chunk = self.speed.chunked_loss
        if chunk and zero3:
            # ZeRO-3 gathers the head's weight only inside the head module's own forward, which this path skips.
            rank_zero_info("model.speed.chunked_loss is off under DeepSpeed ZeRO stage 3 (the plain head is used)")
            chunk = None
        self.model.loss_chunk = chunk
        self.model.fused_loss = self._use_fused_loss(strategy, zero3)
        model = self.model

        def model_loss(input_ids: torch.Tensor, targets: torch.Tensor, documents: Any = None) -> torch.Tensor:
            return model(input_ids, targets=targets, documents=documents)

        # Stored outside nn.Module registration: no duplicate parameters, no "_orig_mod." keys in checkpoints.
        # The loss is compiled together with the model so the compiler fuses the head's output into the
        # cross-entropy instead of materialising float32 logits for the whole batch.
        compile_ = self.speed.compile
        if compile_ and zero3:
            # ZeRO-3 gathers and releases parameters in module hooks that the compiler cannot trace.
            rank_zero_info("model.speed.compile is off under DeepSpeed ZeRO stage 3 (its parameter hooks do not "
                           "compile)")
            compile_ = False
        how = {"mode": None if compile_ in (True, "default") else compile_}
        if self.speed.compile_options:
            how = {"options": dict(self.speed.compile_options)}
        object.__setattr__(self, "_forward", torch.compile(model, **how) if compile_ else model)
        object.__setattr__(self, "_model_loss", torch.compile(model_loss, **how) if compile_ else model_loss)
        if builds_split:
            # lit_llm.distributed's tensor- and pipeline-parallel strategies split the GPT and may reroute the loss
            # and forward above (a pipeline runs them through its schedule).
            strategy.parallelize_task(self)

    def _use_fused_loss(self, strategy: Any, zero3: bool) -> bool:
        if not self.speed.fused_loss:
            return False
        if zero3:
            rank_zero_info("model.speed.fused_loss is off under DeepSpeed ZeRO stage 3 (the plain head is used)")
            return False
        device = strategy.root_device if strategy is not None else self.device
        if device.type != "cuda" and not triton_interpreting():
            raise ConfigError(
                f"model.speed.fused_loss runs a Triton kernel on CUDA GPUs, but this run is on {device.type.upper()}: "
                "remove "
                "model.speed.fused_loss (or set it to false) for this device"
            )
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("model.speed.fused_loss needs Triton, which PyTorch's CUDA builds install; this "
                              "environment "
                              "has none: pip install triton, or set model.speed.fused_loss to false")
        return True

    def _convert_to_float8(self, strategy: Any) -> None:
        recipe = self.speed.float8
        if strategy is not None and (params_are_sharded(strategy) or is_deepspeed(strategy)):
            raise ConfigError(
                f"model.speed.float8 runs on one GPU or under DDP, not under {type(strategy).__name__} "
                "(trainer.strategy): use trainer.strategy=lit_ddp, or remove model.speed.float8."
            )
        device = getattr(strategy, "root_device", None) or self.device
        check_float8_device(device)
        layers = convert_to_float8(self.model, recipe, head=self.speed.float8_head)
        head = " and the output head" if self.speed.float8_head else " (the output head stays bf16)"
        rank_zero_info(f"FP8 matmuls ({recipe} scaling) in {len(layers)} Linear layers{head}")
        if not self.speed.compile:
            rank_zero_warn("model.speed.float8 without model.speed.compile: the FP8 casts run as separate kernels, "
                           "which is "
                           "usually slower than bf16; set model.speed.compile: true")

    def adapt_model(self, model: GPTModel) -> None:
        """Change the GPT's structure after its initial weights are loaded (e.g. a classification head).

        Runs inside ``configure_model``, before any LoRA adapters are added; the default changes nothing.
        """

    def select_trainable(self, model: GPTModel) -> None:
        """Choose which parameters train (``requires_grad``) once the model is complete.

        Runs inside ``configure_model`` after LoRA adapters (if any) are added; the default changes nothing.
        """

    def _resuming(self) -> str | None:
        trainer = self._trainer
        return (trainer.ckpt_path if trainer is not None else None) or getattr(self, "resume_checkpoint", None)

    def _load_init_weights(self, source: str) -> None:
        resuming = self._resuming()
        if resuming:
            # Lightning restores the checkpoint's weights after configure_model; reading init_weights would be wasted.
            rank_zero_info(f"Resuming from {resuming}: model.init_weights={source} is not loaded")
            return
        from lit_llm.weights.readers import load_into, load_weights

        strategy = self._trainer.strategy if self._trainer is not None else None
        if is_zero3(strategy):
            # ZeRO-3 has partitioned the parameters as they were built; filling them in from a file is not supported.
            raise ConfigError(
                f"model.init_weights={source} cannot be loaded under DeepSpeed ZeRO stage 3 (trainer.strategy), "
                "which partitions the parameters as it builds them. Use trainer.strategy=lit_fsdp (it loads the "
                "weights, then shards them) or lit_deepspeed_zero2, or resume a ZeRO-3 checkpoint with --ckpt_path."
            )
        _, state = load_weights(source, self.config)
        # Special tokens a data module added to the tokenizer (a chat template's) have no rows in the weights yet.
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        added = int(getattr(datamodule, "added_tokens", 0) or 0)
        load_into(self.model, state, source=source, new_rows=added)
        rank_zero_info(f"Initial weights from {source}" + (f" ({added} new token rows start as the mean embedding)"
                                                           if added else ""))

    def forward(self, input_ids: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)`` for token ids ``(B, T)`` (compiled when ``compile`` is on); ``documents`` ``(B, T)``
        for rows that pack several examples (see :meth:`~lit_llm.model.gpt.GPTModel.document_mask`)."""
        if self.model is None:
            self.configure_model()
        with sdpa_backend_context(self.speed.sdpa_backend):
            if documents is None:
                return self._forward(input_ids)
            return self._forward(input_ids, documents=self._document_mask(documents))

    def loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of the model on ``(input_ids, targets)``, ``-100`` targets ignored.

        ``documents`` ``(B, T)`` numbers the examples packed into each row: none of them sees another, and their
        positions restart at 0 (see :meth:`~lit_llm.model.gpt.GPTModel.document_mask`).
        """
        if self.model is None:
            self.configure_model()
        with sdpa_backend_context(self.speed.sdpa_backend):
            if documents is None:
                return self._model_loss(input_ids, targets)
            return self._model_loss(input_ids, targets, self._document_mask(documents))

    def _document_mask(self, documents: torch.Tensor) -> Any:
        """The packed batch's mask, built here, outside the compiled model (one block mask per batch)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if splits_model(strategy):
            raise ConfigError(PACKING_UNSUPPORTED.format(strategy=type(strategy).__name__))
        return self.model.document_mask(documents)

    # ---- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.optim
        strategy = self.trainer.strategy
        groups = parameter_groups(self, hp.weight_decay, decay_all=hp.decay_all)
        if getattr(strategy, "offloads_optimizer", False):
            # DeepSpeed keeps the optimizer state in CPU memory and steps it with its vectorised CPU Adam.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps,
                                         adamw_mode=True)
        else:
            fused = hp.fused_adamw
            if fused is None:  # the fused kernel needs every parameter on the GPU (not so with FSDP CPU offload)
                fused = not is_deepspeed(strategy) and all(p.is_cuda for g in groups for p in g["params"])
            optimizer = build_adamw(groups, hp.learning_rate, tuple(hp.betas), hp.eps, fused=fused)
        total = hp.schedule_steps or self._estimated_steps()
        self._warn_if_warmup_spans(total)
        rank_zero_info(
            f"AdamW lr={hp.learning_rate} wd={hp.weight_decay}; {hp.lr_schedule} schedule, "
            f"{hp.warmup_steps} warmup steps over {total} optimizer steps; "
            f"{self.model.num_parameters(trainable_only=True):,} trainable parameters"
        )
        schedule = StepSchedule(
            optimizer,
            lambda step: lr_multiplier(
                step,
                warmup_steps=hp.warmup_steps,
                total_steps=total,
                schedule=hp.lr_schedule,
                min_lr_ratio=hp.min_lr_ratio,
            ),
            total_steps=total,
            schedule=hp.lr_schedule,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _warn_if_warmup_spans(self, total: int) -> None:
        """A warmup as long as the schedule leaves the learning rate below its peak and never decays it: warn.

        A warning, not an error: running a shipped config for a few steps (``--trainer.max_steps=5``) is a legitimate
        trial run. Checked here, where the schedule's length is known for every kind of run (an epoch-bounded run's
        only once its data is loaded).
        """
        hp, trainer = self.optim, self.trainer
        spans = 0 < total <= hp.warmup_steps
        if not spans or hp.lr_schedule == "constant" or trainer.fast_dev_run:
            return
        if hp.schedule_steps:
            of = f"the schedule (model.optim.schedule_steps={hp.schedule_steps})"
        elif trainer.max_steps is not None and trainer.max_steps > 0:
            of = f"the schedule (trainer.max_steps={trainer.max_steps})"
        else:
            of = f"trainer.max_epochs={trainer.max_epochs}"
        rank_zero_warn(
            f"model.optim.warmup_steps={hp.warmup_steps} is not shorter than the {total} optimizer steps of {of}: the "
            f"learning rate never reaches model.optim.learning_rate={hp.learning_rate} and never decays. Lower "
            "model.optim.warmup_steps (a few percent of the steps is usual) or train for longer.",
            category=UserWarning,
        )

    def _estimated_steps(self) -> int:
        try:
            steps = self.trainer.estimated_stepping_batches
        except Exception:  # no trainer attached, or a dataloader of unknown length
            steps = float("inf")
        if steps == float("inf") or steps is None:
            if self.optim.lr_schedule != "constant":
                raise ConfigError(
                    f"model.optim.lr_schedule={self.optim.lr_schedule!r} needs to know the number of optimizer steps; "
                    "set trainer.max_steps, or model.optim.schedule_steps, or use model.optim.lr_schedule: constant"
                )
            return 1
        return max(1, int(steps))

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        # NonFiniteGuard(policy="skip") marks a dropped optimizer step: the schedule must not advance either.
        if self.__dict__.pop("_lit_llm_skip_scheduler_step", False):
            return
        super().lr_scheduler_step(scheduler, metric)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # DeepSpeed clips inside its engine (configure_gradient_clipping does not run), so its norm is logged here:
        # the one the engine computed for this step, read without waiting for the GPU.
        if self._trainer is not None and is_deepspeed(self.trainer.strategy):
            norm = engine_grad_norm(self.trainer.strategy)
            if norm is not None:
                self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Overridden because Lightning's built-in norm clipping raises under FSDP; the sharded module clips itself.
        max_norm = gradient_clip_val or self.optim.gradient_clip
        if not max_norm or is_deepspeed(self.trainer.strategy):
            return  # DeepSpeed clips inside its engine (lit_llm's DeepSpeed strategy hands it the clipping value)
        clip = getattr(self.trainer.strategy, "clip_grad_norm_", None)
        if callable(clip):  # a pipeline's stages: the norm of the whole model is summed over the stages
            norm = clip(self.parameters(), max_norm)
        elif is_fsdp1(self.trainer.strategy):
            norm = self.trainer.strategy.model.clip_grad_norm_(max_norm)
        else:  # DTensor parameters (FSDP2) clip here too; their norm is a DTensor to make whole
            norm = nn.utils.clip_grad_norm_(self.parameters(), max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def count_tokens(self, input_ids: torch.Tensor) -> None:
        """Add a training batch's tokens, over all ranks, to ``tokens_seen`` and log it."""
        trainer = self._trainer
        # Under tensor / pipeline parallelism the ranks of one model replica share a batch: count the replicas.
        world = getattr(trainer.strategy, "data_parallel_size", trainer.world_size) if trainer is not None else 1
        self.tokens_seen += input_ids.numel() * world
        self.log_host_value("train/tokens_seen", self.tokens_seen)

    def log_lr(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            lr = schedulers.get_last_lr()[0] if not isinstance(schedulers, list) else schedulers[0].get_last_lr()[0]
            self.log_host_value("train/lr", lr)

    def log_host_value(self, name: str, value: float, prog_bar: bool = False) -> None:
        """Log a Python number every step without a GPU synchronisation.

        ``self.log(name, 0.5)`` turns the number into a tensor on the module's device, a blocking host-to-device copy
        that waits for all queued GPU work: done every step, it stops the CPU from running ahead of the GPU and costs
        several percent of a GPU run's speed. A CPU tensor is logged as it is.
        """
        self.log(name, torch.tensor(float(value), dtype=torch.float32), on_step=True, on_epoch=False,
                 prog_bar=prog_bar)

    def setup(self, stage: str) -> None:
        # Under several processes, Lightning's per-batch SIGTERM check makes the CPU wait for the GPU at every step;
        # StopAgreement makes the same agreement without that wait (lit_llm/callbacks/signals.py).
        if self._trainer is not None:
            StopAgreement.install(self._trainer)

    def on_fit_start(self) -> None:
        # A trainer.validate() or test() before fit() leaves the metrics' states as inference tensors (they were reset
        # under inference mode), which fit's validation, run under no_grad, cannot update in place: start afresh.
        from torchmetrics import Metric

        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    # ---- checkpoint extras -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["model_config"] = self.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        # Lightning restores the model before the DataModule; check the tokenizer first, so that a checkpoint trained
        # with another tokenizer gets that message rather than a vocabulary-size mismatch.
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "load_state_dict"):
            for state in checkpoint.values():
                if isinstance(state, dict) and "tokenizer_fingerprint" in state:
                    datamodule.load_state_dict(state)
        source = str(self._resuming() or "the checkpoint")
        saved_hparams = checkpoint.get("hyper_parameters")
        if isinstance(saved_hparams, dict):
            task = f"{type(self).__module__}.{type(self).__qualname__}"
            changes = check_resume_settings(saved_hparams, dict(self.hparams), self.FIXED_ON_RESUME, task, source)
            log_applied(changes, source)
        saved = checkpoint.get("model_config")
        if saved is not None:
            check_same_architecture(saved, self.config.to_dict())
        if self.model is not None and isinstance(checkpoint.get("state_dict"), dict):
            saved_lora = (checkpoint.get("hyper_parameters") or {}).get("lora")
            check_same_lora(checkpoint["state_dict"], self.state_dict(), saved_lora, self.hparams.get("lora"))


#: The one line that refuses packed batches where the GPT is split across processes.
PACKING_UNSUPPORTED = (
    "data.packing=true is not supported under tensor or pipeline parallelism ({strategy}): their split model does "
    "not carry the per-document attention mask. Set data.packing=false, or use lit_ddp, lit_fsdp or DeepSpeed."
)


#: Under FSDP, build a model whole on its device only while it takes at most this share of the device's memory.
WHOLE_MODEL_SHARE = 0.25


def _too_big_to_build_whole(meta_model: GPTModel, device: torch.device) -> bool:
    """Whether the model in float32 would take more than :data:`WHOLE_MODEL_SHARE` of ``device``'s memory."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        import os

        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf (Windows): build on meta
            return True
    return 4 * sum(p.numel() for p in meta_model.parameters()) > WHOLE_MODEL_SHARE * memory


def sdpa_backend_context(backend: SdpaBackend) -> contextlib.AbstractContextManager:
    """Use one fused-attention kernel instead of PyTorch's choice (``auto``).

    ``flash`` and ``cudnn`` exclude each other; the memory-efficient and math kernels stay as fallbacks for inputs the
    chosen kernel does not support. Entered around the (compiled) call, so the compiler traces the chosen kernel.
    """
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]
    fallbacks = [b for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != chosen]
    return sdpa_kernel([chosen, *fallbacks], set_priority=True)


def check_same_architecture(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`~lit_llm.errors.CheckpointError` listing every shape field that differs."""
    from lit_llm.errors import CheckpointError

    shape_fields = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "bias",
                    "tie_weights", "pad_vocab_multiple")
    diffs = [f"{k}: checkpoint={saved.get(k)!r} config={current.get(k)!r}" for k in shape_fields
             if k in saved and saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"The checkpoint was trained with a different model architecture ({'; '.join(diffs)}): use the model "
            "settings the checkpoint was trained with (see config.yaml in its run directory)"
        )


def check_same_lora(
    saved_state: dict[str, torch.Tensor],
    current_state: dict[str, torch.Tensor],
    saved_config: dict[str, Any] | None,
    current_config: dict[str, Any] | None,
) -> None:
    """Raise :class:`~lit_llm.errors.CheckpointError` when the checkpoint's LoRA adapters differ from the model's.

    Lightning would otherwise stop with a bare list of missing/unexpected ``lora_*`` keys.
    """
    from lit_llm.errors import CheckpointError

    saved = {k.replace("_orig_mod.", ""): tuple(v.shape) for k, v in saved_state.items() if is_lora_key(k)}
    current = {k: tuple(v.shape) for k, v in current_state.items() if is_lora_key(k)}
    if saved == current:
        return
    if not saved:
        fix = "it was trained without adapters: set model.lora: null to resume it"
    elif not current:
        fix = f"set model.lora: {saved_config or 'as in its config.yaml'} to resume it"
    else:
        fix = f"it was trained with model.lora: {saved_config}, not {current_config}; resume with the same setting"
    raise CheckpointError(f"the checkpoint's LoRA adapters do not match the model's ({len(saved)} vs {len(current)} "
                          f"lora entries, or other shapes): {fix}. To start a new LoRA run from its weights, use "
                          "model.init_weights instead of --ckpt_path")


def _as_config(model: GPTConfig | dict | None) -> GPTConfig:
    if model is None:
        return GPTConfig()
    if isinstance(model, GPTConfig):
        return model
    if isinstance(model, dict):
        return GPTConfig.from_dict(model)
    if dataclasses.is_dataclass(model):  # a GPTConfig from another import path (e.g. reloaded module)
        return GPTConfig.from_dict(dataclasses.asdict(model))
    raise ConfigError(f"model must be a GPTConfig or a mapping of its fields, got {type(model).__name__}")
