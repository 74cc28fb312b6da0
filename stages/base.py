"""``WallarooStage``: what every training stage shares.

A stage subclass states three things: which parts train (``TRAINABLE``, names from
``wallaroo.freezing.PARTS``), which tasks it mixes (``TASKS``), and which modules it creates
(``CREATES``: allowed to be missing from ``init_from``). Everything else lives here: building the model
in ``configure_model``, ``init_from`` loading, freezing, the per-task steps, optimiser groups by rule,
warm-up + constant/cosine schedules, logging, sample previews, and skipping steps whose loss or gradients
are not finite (``max_bad_steps``).

Batches are dicts ``{task: sub_batch}`` (one sub-batch per task, see ``datamodules``). A sub-batch follows
the ``WallarooModel`` batch contract, plus ``target_images`` / ``source_images`` ``[B, 3, H, W]`` in
[-1, 1] when codes and latents are to be computed on the fly by the frozen VQ tokenizer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import Tensor

from wallaroo.cli_errors import RunStopped
from wallaroo.config import WallarooConfig, get_preset
from wallaroo.freezing import PARTS, part_modules, set_trainable
from wallaroo.model import WallarooModel
from wallaroo.parallel import ParallelConfig
from wallaroo.vq import VQModel, build_vq

log = logging.getLogger(__name__)
SKIPPED_STEPS_KEY = "wallaroo_skipped_steps"  # checkpoint entry: non-finite steps skipped so far in the run


SCHEDULES = ("constant", "cosine", "wsd")


@dataclass
class OptimConfig:
    """AdamW with warm-up and a constant, cosine or warm-up-stable-decay schedule (the paper: betas (0.9, 0.95), no
    decay). ``wsd`` holds the LR until the last ``decay_fraction`` of the horizon, then follows a cosine down to
    ``min_lr_ratio``."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    total_steps: int | None = None
    # With ``trainer.max_time`` set, the schedule's progress is the larger of its step progress and the training
    # time spent over ``max_time``, so a run that its time limit stops ends annealed (step-only schedules stop
    # mid-decay). Ranks share rank 0's clock. Off: the schedule follows steps only.
    time_horizon: bool = False
    # Per-part LR multipliers of a Wallaroo model ({"vit": 0.1}: the ViT and merger at a tenth of ``lr``); parts
    # are those of wallaroo.freezing. Unnamed parts train at ``lr``.
    lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        self.lr_scale = {str(k): float(v) for k, v in (self.lr_scale or {}).items()}
        for part, scale in self.lr_scale.items():
            if part not in PARTS:
                raise ValueError(f"optim.lr_scale: unknown part {part!r}; parts are {', '.join(PARTS)}")
            if not scale > 0:
                raise ValueError(f"optim.lr_scale.{part} must be positive, got {scale}")


@dataclass
class PreviewConfig:
    """Samples logged to TensorBoard every ``every_n_steps`` optimiser steps (0: never)."""

    every_n_steps: int = 0
    t2i_prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle at the top left and a blue square at the center",
            "左上有一个红色圆形，中间有一个蓝色正方形",
        ]
    )
    questions: list[str] = field(default_factory=lambda: ["Describe the image.", "图中有几个图形？"])
    edit_instructions: list[str] = field(default_factory=lambda: ["Remove the circle.", "把正方形变成绿色。"])
    size: str | None = None
    cfg_scale: float = 3.0
    top_k: int = 0
    seed: int = 0
    max_new_tokens: int = 48


def lr_lambda(
    step: int,
    warmup: int,
    total: int | None,
    schedule: str,
    min_ratio: float,
    time_progress: float = 0.0,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then constant, cosine to ``min_ratio``, or (``wsd``)
    constant and a cosine over the last ``decay_fraction`` of the horizon. The progress is the larger of the step
    progress and ``time_progress`` (a fraction of a time budget)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or ((not total or total <= warmup) and time_progress <= 0):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup) if total and total > warmup else 0.0
    progress = min(1.0, max(progress, time_progress))
    if schedule == "wsd":
        progress = max(0.0, progress - (1 - decay_fraction)) / decay_fraction
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(
    module: torch.nn.Module, weight_decay: float, lr: float = 0.0, lr_scale: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Trainable parameters in groups by rule: decay for matrices, none for ``ndim <= 1`` (norms, biases);
    with ``lr_scale`` ({part: multiplier}, parts of ``wallaroo.freezing`` of a ``WallarooModel``), each scaled
    part in groups of its own at ``lr * multiplier``. Asserts the groups partition the trainable parameters."""
    scaled: dict[int, str] = {}
    if lr_scale:
        if not lr > 0 or not isinstance(module, WallarooModel):
            raise ValueError("optim.lr_scale needs a positive lr and a Wallaroo model (parts of wallaroo.freezing)")
        parts = part_modules(module)
        for part in lr_scale:
            for m in parts.get(part, []):
                scaled.update({id(p): part for p in m.parameters()})
    buckets: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {}
    for p in module.parameters():
        if p.requires_grad:
            buckets.setdefault((scaled.get(id(p)), p.ndim > 1), []).append(p)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    grouped = [id(p) for ps in buckets.values() for p in ps]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, "optimiser groups must partition"
    groups = []
    for part in [None, *sorted(lr_scale or {})]:
        for decays in (True, False):
            if ps := buckets.get((part, decays)):
                g: dict[str, Any] = {"params": ps, "weight_decay": weight_decay if decays else 0.0}
                if part is not None:
                    g.update(lr=lr * lr_scale[part], part=part)
                groups.append(g)
    return groups


def clean_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A dotted CLI override of a ``dict[str, Any]`` value (``--model.init_args.overrides.vq_path null``)
    arrives as the string ``"None"``; it means null."""
    return {k: None if v in ("None", "null") else v for k, v in (overrides or {}).items()}


def build_optimizer(
    module: torch.nn.Module, o: OptimConfig, max_steps: int, time_progress: Callable[[], float] | None = None
) -> dict[str, Any]:
    """AdamW over ``param_groups`` and a per-step LambdaLR; the cosine horizon defaults to ``max_steps``.
    ``time_progress`` (the fraction of a time budget spent, for ``OptimConfig.time_horizon``) is read at every
    scheduler step."""
    groups = param_groups(module, o.weight_decay, o.lr, o.lr_scale)
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    total = o.total_steps or (max_steps if max_steps > 0 else None)
    memo: dict[str, float] = {}  # LambdaLR asks once per param group: one multiplier (one clock read) per step

    def multiplier(step: int) -> float:
        if memo.get("step") != step:
            spent = time_progress() if time_progress is not None else 0.0
            value = lr_lambda(step, o.warmup_steps, total, o.schedule, o.min_lr_ratio, spent, o.decay_fraction)
            memo.update(step=step, value=value)
        return memo["value"]

    sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WallarooStage(L.LightningModule):
    """Base of the four Wallaroo stages (and of the ShapesWorld VLM pre-training step)."""

    TRAINABLE: ClassVar[tuple[str, ...]] = ()
    TASKS: ClassVar[tuple[str, ...]] = ()
    CREATES: ClassVar[tuple[str, ...]] = ()
    EDIT: ClassVar[bool] = False

    @classmethod
    def trainable_parts(cls, init_args: dict[str, Any]) -> tuple[str, ...]:
        """The parts a stage built with these ``__init__`` arguments trains (``TRAINABLE`` unless a
        subclass lets an argument change it); ``wallaroo.summary`` asks this of a recipe."""
        return cls.TRAINABLE

    def __init__(
        self,
        preset: str = "tiny",
        overrides: dict[str, Any] | None = None,
        init_from: str | None = None,
        optim: OptimConfig | None = None,
        loss_weights: dict[str, float] | None = None,
        preview: PreviewConfig | None = None,
        parallel: ParallelConfig | None = None,
        max_bad_steps: int = 20,
    ) -> None:
        """
        Args:
            preset: model preset (``wallaroo.config.PRESETS``).
            overrides: model config fields to replace (e.g. ``pretrained``, ``vq_path``, ``backbone.<f>``).
            init_from: weights of the previous stage (a Lightning checkpoint, a ``.safetensors`` file of
                our keys, or an official Wallaroo checkpoint). A new run starts from them; use
                ``--ckpt_path`` instead to resume this run.
            optim: optimiser and schedule.
            loss_weights: per-task loss weights (default 1 for every task of the stage).
            preview: sample previews logged to TensorBoard.
            parallel: distribution (``fsdp2`` with ``ModelParallelStrategy``, ``fsdp``, ``ddp``) and
                activation checkpointing; see ``wallaroo.parallel``.
            max_bad_steps: a step whose loss or gradients are not finite (on any rank) is skipped: no
                optimiser or scheduler step, gradients zeroed, ``train/skipped_steps`` counts it. After this
                many in a row the run stops (``wallaroo.cli_errors.RunStopped``) naming the step and the last
                checkpoint; 0 never stops.
        """
        super().__init__()
        self.optim = optim or OptimConfig()
        self.preview = preview or PreviewConfig()
        self.parallel = parallel or ParallelConfig()
        if int(max_bad_steps) < 0:
            raise ValueError(f"max_bad_steps must be >= 0 (0: never stop), got {max_bad_steps}")
        self.max_bad_steps = int(max_bad_steps)
        # Plain values only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "preset": preset,
                "overrides": clean_overrides(overrides),
                "init_from": init_from,
                "optim": asdict(self.optim),
                "loss_weights": dict(loss_weights or {}),
                "preview": asdict(self.preview),
                "parallel": asdict(self.parallel),
                "max_bad_steps": self.max_bad_steps,
            }
        )
        self.preset = preset
        self.overrides = clean_overrides(overrides)
        self.init_from = init_from
        weights = {t: 1.0 for t in self.TASKS}
        unknown = set(loss_weights or {}) - set(self.TASKS)
        if unknown:
            raise ValueError(f"loss_weights for tasks {sorted(unknown)} that {type(self).__name__} lacks")
        weights.update(loss_weights or {})
        self.loss_weights = weights
        # Fails before any heavy work on an unknown preset or field.
        self.model_config: WallarooConfig = self.build_config()
        self.model: WallarooModel | None = None
        self.vq: VQModel | None = None
        self.counts: dict[str, int] = {}
        self._last_time: float | None = None
        # Non-finite steps (see skip_nonfinite_step).
        self.skipped_steps = 0  # in the whole run (kept in checkpoints)
        self.bad_steps_in_a_row = 0
        self._good_weights_step: int | None = None  # global step whose weights are the last good ones
        self._last_ckpt_step: int | None = None
        self._bad_loss: Tensor | None = None  # since the last optimiser step: a non-finite loss went to backward
        self._bad_task: dict[str, Tensor] = {}  # ... a task's loss was not finite
        self._batch_tasks: list[str] = []
        self._skip_scheduler = False

    # ------------------------------------------------------------------------------ building
    def build_config(self) -> WallarooConfig:
        cfg = get_preset(self.preset, **self.overrides)
        if self.EDIT:
            cfg.edit = True
        return cfg

    def configure_model(self) -> None:
        """Build model and VQ (idempotent). Under a strategy with an empty-init context this runs on the
        meta device and the strategy materialises the weights."""
        if self.model is not None:
            return
        if self.device_mesh is not None:
            # ModelParallelStrategy: FSDP2 builds (rank 0 loads the weights), freezes, shards, broadcasts.
            from wallaroo.parallel import parallelize_stage

            parallelize_stage(self)
            return
        self.model = WallarooModel(self.model_config)
        self.vq = build_vq(self.model_config.vq)
        self.vq.requires_grad_(False)
        self.vq.eval()
        if not next(self.model.parameters()).is_meta:
            self.load_initial_weights()
        self.counts = set_trainable(self.model, self.TRAINABLE)
        from wallaroo.parallel import configure_unsharded

        configure_unsharded(self)  # strategy check + activation checkpointing (DDP / FSDP1 / one device)

    def load_initial_weights(self) -> None:
        """``init_from`` (previous stage: a Lightning checkpoint, a weights directory, a consolidated
        ``.safetensors`` file or an official checkpoint) and ``vq_path`` (LlamaGen or a tokenizer
        checkpoint), strictly: only the modules this stage creates may be missing, nothing unexpected."""
        from wallaroo.vq import VQ_PRESETS
        from wallaroo.weights import load_any, load_vq_file

        cfg = self.model_config
        # The modules this stage creates that init_from does not carry (all of them without init_from).
        self.created_fresh: tuple[str, ...] = self.CREATES
        if self.init_from:
            loaded = load_any(self.init_from, config=cfg)
            created = tuple(f"{c}." for c in self.CREATES)
            result = self.model.load_state_dict(loaded.model_state, strict=False)
            self.created_fresh = tuple(
                c for c in self.CREATES if any(k.startswith(f"{c}.") for k in result.missing_keys)
            )
            missing = [k for k in result.missing_keys if not k.startswith(created)]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"init_from={self.init_from} does not fit {type(self).__name__}: missing keys "
                    f"{missing[:8]} ({len(missing)} in all), unexpected keys {result.unexpected_keys[:8]}"
                )
            if loaded.vq_state and not cfg.vq_path:
                self.vq.load_state_dict(loaded.checked_vq_state(self.vq.config), strict=True)
        if cfg.vq_path:
            self.vq.load_state_dict(load_vq_file(cfg.vq_path, VQ_PRESETS[cfg.vq]), strict=True)

    def on_fit_start(self) -> None:
        self.log_counts()

    def on_train_start(self) -> None:
        self._good_weights_step = self.global_step
        self.bad_steps_in_a_row = 0

    def log_counts(self) -> None:
        if self.logger is not None and self.counts:
            for k, v in self.counts.items():
                self.logger.log_metrics({f"params/{k}": float(v)}, step=0)

    # ------------------------------------------------------------------------------ steps
    @torch.no_grad()
    def tokenize_images(self, task: str, sub: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fill target codes and source latents with the frozen VQ where the shard did not carry them."""
        sub = dict(sub)
        if "target_images" in sub:
            codes, _ = self.vq.encode(sub.pop("target_images").to(self.vq_dtype))
            gen = sub["input_ids"] == self.model.gen_pad_id
            labels = sub["image_labels"].clone()
            labels[gen] = codes.reshape(-1).to(labels.dtype)
            sub["image_labels"] = labels
        if "source_images" in sub:
            _, latents = self.vq.encode(sub.pop("source_images").to(self.vq_dtype))
            sub["pixel_latents"] = latents.reshape(-1, latents.shape[-1])
        return sub

    @property
    def vq_dtype(self) -> torch.dtype:
        return next(self.vq.parameters()).dtype

    @property
    def codebook(self) -> Tensor:
        return self.vq.quantize.embedding.weight

    def shared_step(self, batch: dict[str, dict[str, Tensor]], split: str) -> Tensor:
        total: Tensor | None = None
        n_tokens = 0
        n_samples = 0
        for task, sub in batch.items():
            if task not in self.TASKS:
                raise ValueError(f"{type(self).__name__} got a {task!r} batch; its tasks are {self.TASKS}")
            sub = self.tokenize_images(task, sub)
            out = self.model(sub, task, self.codebook)
            weighted = self.loss_weights[task] * out.loss
            total = weighted if total is None else total + weighted
            if split == "train":  # read by skip_nonfinite_step, without a host sync here
                bad = ~torch.isfinite(out.loss.detach())
                self._bad_task[task] = bad if task not in self._bad_task else self._bad_task[task] | bad
            bs = sub["input_ids"].shape[0]
            n_tokens += int(sub["attention_mask"].sum())
            n_samples += bs
            on_step = split == "train"
            parts = {"": out.loss, "_text": out.text if out.image is not None else None, "_image": out.image}
            for suffix, value in parts.items():
                if value is not None:
                    self.log(
                        f"{split}/loss_{task}{suffix}",
                        value,
                        batch_size=bs,
                        on_step=on_step,
                        on_epoch=not on_step,
                    )
        assert total is not None, "empty batch"
        self.log(f"{split}/loss", total, prog_bar=True, on_step=split == "train", on_epoch=split != "train")
        if split == "train":
            self._log_throughput(n_tokens, n_samples)
        return total

    def _log_throughput(self, n_tokens: int, n_samples: int) -> None:
        now = time.perf_counter()
        if self._last_time is not None:
            dt = max(now - self._last_time, 1e-9)
            self.log("train/tokens_per_s", n_tokens / dt)
            self.log("train/samples_per_s", n_samples / dt)
        self._last_time = now

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        self._batch_tasks += [t for t in batch if t not in self._batch_tasks]
        loss = self.shared_step(batch, "train")
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("train/lr", sched.get_last_lr()[0], prog_bar=True)
        skipped = getattr(self.trainer.datamodule, "skipped_counts", None) if self._trainer else None
        if callable(skipped):
            for task, n in skipped().items():
                self.log(f"data/skipped_{task}", float(n))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.preview.every_n_steps
        if n > 0 and self.global_step % n == 0:
            from wallaroo.parallel import gathered

            with gathered(self.model):  # every rank enters (sharded weights are gathered), rank 0 samples
                if self.trainer.is_global_zero:
                    self.log_previews()

    @torch.no_grad()
    def log_previews(self) -> None:
        """Generated images for fixed EN and ZH prompts, an edit and answers to fixed questions, logged to
        TensorBoard as images and text. The source image is a fixed ShapesWorld scene."""
        from datamodules.shapes_world import ShapeObject, make_scene, render
        from wallaroo.pipeline import WallarooPipeline
        from wallaroo.sampling import SamplingConfig

        writer = getattr(self.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_image"):
            return
        p = self.preview
        pipe = WallarooPipeline(self.model, self.vq)
        size = pipe.bucket(p.size) if p.size else next(iter(pipe.buckets.values()))
        sampling = SamplingConfig(cfg_scale=p.cfg_scale, top_k=p.top_k or None, seed=p.seed)
        step = self.global_step
        scene = make_scene([ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "square", (1, 1))])
        source = render(scene, size.w, size.h)
        was_training = self.model.training
        try:
            if "t2i" in self.TASKS:
                for i, (prompt, image) in enumerate(
                    zip(p.t2i_prompts, pipe.text_to_image(p.t2i_prompts, size, sampling), strict=True)
                ):
                    writer.add_image(f"preview/t2i_{i}", image, step, dataformats="HWC")
                    writer.add_text(f"preview/t2i_{i}_prompt", prompt, step)
            if "edit" in self.TASKS:
                edited = pipe.edit([source] * len(p.edit_instructions), p.edit_instructions, sampling)
                for i, (instruction, image) in enumerate(zip(p.edit_instructions, edited, strict=True)):
                    pair = np.concatenate([source, image], axis=1)
                    writer.add_image(f"preview/edit_{i}", pair, step, dataformats="HWC")
                    writer.add_text(f"preview/edit_{i}_instruction", instruction, step)
            if "und" in self.TASKS:
                answers = pipe.understand(
                    [source] * len(p.questions), p.questions, max_new_tokens=p.max_new_tokens
                )
                writer.add_image("preview/und_image", source, step, dataformats="HWC")
                lines = [f"**{q}** → {a}" for q, a in zip(p.questions, answers, strict=True)]
                writer.add_text("preview/und_answers", "  \n".join(lines), step)
        finally:
            self.model.train(was_training)

    def validation_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        return self.shared_step(batch, "val")

    def on_before_backward(self, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after backward and before gradient clipping and the optimiser step.
        params = [p for p in self.model.parameters() if p.grad is not None]
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            self.log("train/grad_norm", norm)
        self.skip_nonfinite_step(optimizer, params)

    # ------------------------------------------------------------------------------ non-finite steps
    def skip_nonfinite_step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> bool:
        """Skip this optimiser step when the loss or a gradient is not finite on any rank; returns whether.

        Each rank checks its own loss(es) and its own (local shards of the) gradients; one all-reduce of the
        flags gives every rank the same decision, so DDP/FSDP ranks never diverge and never wait for each
        other in different places. A skipped step zeroes the gradients (set to ``None``: AdamW leaves the
        weights and its state untouched, clipping finds nothing), skips the scheduler step
        (``lr_scheduler_step``), counts ``train/skipped_steps`` and logs the step with the tasks of its batch.
        The batch is consumed and the step counts towards ``trainer.max_steps``. After ``max_bad_steps`` in a
        row, raises :class:`~wallaroo.cli_errors.RunStopped`.
        """
        tasks = list(self.TASKS) or sorted(self._bad_task)
        flags = [self._bad_loss, self._local_grads_nonfinite(params)] + [self._bad_task.get(t) for t in tasks]
        vector = torch.stack(
            [torch.zeros((), device=self.device) if f is None else f.to(self.device, torch.float32) for f in flags]
        )
        if self._trainer is not None:
            vector = self.trainer.strategy.reduce(vector, reduce_op="sum")
        counts = [int(round(float(v))) for v in vector.tolist()]  # one host sync per step
        batch_tasks = list(self._batch_tasks)
        self._bad_loss, self._bad_task, self._batch_tasks = None, {}, []
        if not any(counts):
            self.bad_steps_in_a_row = 0
            self._skip_scheduler = False
            self._good_weights_step = self.global_step + 1
            self.log("train/skipped_steps", float(self.skipped_steps))
            return False
        optimizer.zero_grad(set_to_none=True)
        self._skip_scheduler = True
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        self.log("train/skipped_steps", float(self.skipped_steps))
        world = self.trainer.world_size if self._trainer is not None else 1

        def where(n: int) -> str:
            return f" on {n} of {world} ranks" if world > 1 else ""

        what = [f"loss of {t}{where(n)}" for t, n in zip(tasks, counts[2:], strict=True) if n]
        if counts[0] and not what:
            what.append(f"loss{where(counts[0])}")
        if counts[1]:
            what.append(f"gradients{where(counts[1])}")
        step = self.global_step
        message = (
            f"step {step}: non-finite {' and '.join(what)} (batch of {', '.join(batch_tasks) or '?'}); optimiser "
            f"and scheduler step skipped, gradients zeroed ({self.bad_steps_in_a_row} in a row, "
            f"{self.skipped_steps} in the run)"
        )
        if self._trainer is None or self.trainer.is_global_zero:
            log.warning("%s", message)
            writer = getattr(self.logger, "experiment", None)
            if writer is not None and hasattr(writer, "add_text"):
                writer.add_text("train/skipped_steps", message, step)
        if self.max_bad_steps and self.bad_steps_in_a_row >= self.max_bad_steps:
            raise RunStopped(self._stop_message(step, what))
        return True

    def _local_grads_nonfinite(self, params: list[torch.nn.Parameter]) -> Tensor | None:
        """Whether this rank's gradients (local shards of ``DTensor`` ones) hold an inf or a NaN; ``None``
        without gradients or under fp16 loss scaling (the GradScaler skips and rescales those steps itself)."""
        from torch.distributed.tensor import DTensor

        if not params or getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None) is not None:
            return None
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
        # A total norm is finite exactly when every element is (foreach kernels: a few launches, no sync).
        return ~torch.isfinite(torch.nn.utils.get_total_norm(grads))

    def _stop_message(self, step: int, what: list[str]) -> str:
        good = self._good_weights_step
        path, ckpt_step = self._last_checkpoint()
        if path is None:
            where = "no checkpoint of this run exists yet"
        else:
            at = f" (global step {ckpt_step})" if ckpt_step is not None else ""
            current = ckpt_step is not None and good is not None and ckpt_step >= good
            same = ", whose weights are the last good ones" if current else ""
            where = f"the last checkpoint is {path}{at}{same}"
        return (
            f"stopped at global step {step}: {self.bad_steps_in_a_row} steps in a row had a non-finite loss or "
            f"gradient (max_bad_steps={self.max_bad_steps}; the last: {' and '.join(what)}); no update was "
            f"applied since global step {good}; {where}"
        )

    def _last_checkpoint(self) -> tuple[str | None, int | None]:
        """The newest checkpoint of this run (a ModelCheckpoint's, else the one it resumed from) and its step."""
        if self._trainer is None:
            return None, None
        for cb in self.trainer.checkpoint_callbacks:
            path = getattr(cb, "_last_checkpoint_saved", "") or getattr(cb, "last_model_path", "")
            if path:
                return str(path), self._last_ckpt_step
        if self.trainer.ckpt_path:
            return str(self.trainer.ckpt_path), self._last_ckpt_step
        return None, None

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if self._skip_scheduler:  # the optimiser step was skipped (skip_nonfinite_step)
            return
        super().lr_scheduler_step(scheduler, metric)

    # ------------------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.trainer.max_steps if self._trainer else -1
        return build_optimizer(self.model, self.optim, max_steps, self._time_progress())

    def _time_progress(self) -> Callable[[], float] | None:
        """For ``optim.time_horizon``: training time spent over the trainer's ``max_time`` (rank 0's clock,
        broadcast), or ``None`` without a time limit."""
        if not self.optim.time_horizon or not self._trainer:
            return None
        from lightning.pytorch.callbacks import Timer

        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None]
        if not timers:
            return None
        timer, strategy = timers[0], self.trainer.strategy
        budget = timer.time_elapsed() + (timer.time_remaining() or 0.0)  # max_time, in seconds
        return lambda: float(strategy.broadcast(min(1.0, timer.time_elapsed() / budget) if budget > 0 else 1.0))

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.vq is not None:
            from wallaroo.vq import VQ_STAMP_KEY, vq_stamp

            checkpoint[VQ_STAMP_KEY] = vq_stamp(self.vq.config)
        checkpoint[SKIPPED_STEPS_KEY] = self.skipped_steps
        self._last_ckpt_step = int(checkpoint.get("global_step", self.global_step))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming (--ckpt_path) restores every weight from the checkpoint: build first if needed.
        self.configure_model()
        self.skipped_steps = int(checkpoint.get(SKIPPED_STEPS_KEY, 0))
        if "global_step" in checkpoint:
            self._last_ckpt_step = int(checkpoint["global_step"])
