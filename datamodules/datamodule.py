"""``WallarooDataModule``: per-task webdataset streams mixed into one batch per step.

A training batch is ``{task: sub_batch}`` with one sub-batch per task of the stage (Lightning's
``CombinedLoader`` in ``min_size`` mode); per-task batch sizes set the mix. A sub-batch follows the
``WallarooModel`` batch contract (``input_ids``, ``attention_mask``, ``labels``, ``image_labels``,
``mm_token_type_ids``; ``pixel_values`` + ``image_grid_thw`` for und/edit) plus, in [-1, 1]:

- ``target_images`` ``[B, 3, H, W]`` (t2i and edit) when the target codes are to be computed by the
  frozen VQ; t2i samples whose shard carries ``codes.npy`` have the codes in ``image_labels`` instead and
  no ``target_images`` (the two kinds never share a batch);
- ``source_images`` ``[B, 3, H, W]`` (edit), whose VQ latents become ``pixel_latents``.

With ``images_only=True`` (tokenizer training) a sub-batch is just ``{"target_images": [B, 3, H, W]}``.
Skipped-sample bookkeeping travels from the workers with each batch and is removed in the main process
(:meth:`WallarooDataModule.skipped_counts`), so the stage receives exactly the keys above.

Everything model-dependent (tokenizer, special ids, buckets, VQ downsampling, ViT pixel bounds, the
stage's tasks) comes from the LightningModule in :meth:`WallarooDataModule.setup`, or from
:meth:`WallarooDataModule.configure` when there is no Trainer.

Resuming (``--ckpt_path``) continues at the same data position: each task's loader is stateful
(:class:`ResumableLoader`); Lightning stores its ``state_dict`` in the checkpoint and hands it back
before the first batch after the restart.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from datamodules.webdata import N_SKIPPED, TASKS, WORKER_ID, TaskSpec, TaskStream, expand_shards
from wallaroo.config import WallarooConfig
from wallaroo.sequences import BUCKET_SETS
from wallaroo.tokens import TokenIds

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """Data of one task (``--data.t2i.batch_size 4`` on the command line).

    Attributes:
        shards: webdataset shards: brace patterns, local paths, globs or directories (or a list of them).
        batch_size: most samples per batch (images per batch in images-only mode).
        max_tokens: token budget per batch: ``samples x padded length <= max_tokens`` (None: no budget).
        max_length: longest sample in tokens; longer ones are skipped and counted.
        epoch_samples: nominal samples per epoch and rank; an epoch is ``epoch_samples // batch_size``
            batches (at least 1) on every rank, so ranks step together; batches cut short by
            ``max_tokens`` make an epoch hold fewer samples. A mix of tasks takes the shortest task's
            number of batches for all of them.
        buckets: bucket set name (``wallaroo.sequences.BUCKET_SETS``); default: the model config's.
        layout: t2i sequence layout, ``"square"`` (no EOL/indicators) or ``"aspect"``; default: the model
            config's ``t2i_layout``.
        max_crop: largest share of an image's area the centre crop to its bucket may remove; images that
            would lose more are dropped (not counted as bad). 1.0 keeps everything; the square ShapesWorld
            stages use a small value so wide and tall scenes are not cut to squares that miss objects.
        langs: caption/instruction languages to use (und: samples whose json ``lang`` is another one are
            dropped).
        cfg_drop: classifier-free-guidance dropout in training: the t2i prompt becomes ``""`` (template
            kept); the edit instruction becomes ``""`` and the source image black in both streams.
        templates: t2i/edit samples draw their instruction template from the first this many of each
            language's list (None: all; evaluation uses the first). The ShapesWorld recipes use 1.
        val_shards: validation shards (read in order, not resampled).
        val_samples: validation samples: the first ones of ``val_shards``.
        shuffle_buffer: raw samples in the shuffle buffer of each worker (<= 1: no shuffling).
    """

    shards: str | list[str] | None = None
    batch_size: int = 8
    max_tokens: int | None = None
    max_length: int | None = None
    epoch_samples: int = 10_000
    buckets: str | None = None
    layout: str | None = None
    max_crop: float = 1.0
    langs: list[str] = field(default_factory=lambda: ["en", "zh"])
    cfg_drop: float = 0.1
    templates: int | None = None
    val_shards: str | list[str] | None = None
    val_samples: int = 64
    shuffle_buffer: int = 256

    @property
    def n_batches(self) -> int:
        """Training batches per epoch and rank."""
        return max(1, self.epoch_samples // self.batch_size)


def _as_task_data(value: TaskData | dict[str, Any] | None) -> TaskData | None:
    return TaskData(**value) if isinstance(value, dict) else value


# ----------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------


class ResumableLoader:
    """A training ``DataLoader`` over a :class:`~datamodules.webdata.TaskStream` that knows its position.

    Each ``iter()`` is one epoch (nothing starts before the first ``next()``, so Lightning's probing
    ``iter()`` calls cost nothing). :meth:`state_dict` records the epoch and the batches consumed in it;
    after :meth:`load_state_dict` the next epoch started is that epoch again, with the consumed batches
    skipped by the workers: they are still read and built (the order depends on every sample before
    them) but not collated or sent, so resuming costs about the data time of those batches. A position
    at the end of an epoch resumes at the start of the next one. ``consumed`` counts the batches handed
    out; Lightning does not prefetch from a sized CombinedLoader, so at a checkpoint it equals the
    batches trained on.

    The loader also strips the workers' ``n_skipped``/``worker_id`` keys from each sub-batch and keeps the
    count of skipped samples (:attr:`skipped`).
    """

    def __init__(self, task: str, loader: DataLoader, stream: TaskStream) -> None:
        assert stream.n_batches is not None
        if loader.num_workers > 0 and loader.persistent_workers:
            raise ValueError("persistent workers would not see the epoch and resume position; turn them off")
        self.task = task
        self.loader = loader
        self.stream = stream
        self.n_batches = stream.n_batches
        self.epoch = -1  # the epoch being (or last) iterated; -1 before the first
        self.consumed = 0  # batches of that epoch handed out
        self._resume: tuple[int, int] | None = None
        self._skipped_before = 0  # skipped samples in the epochs before the current one
        self._skipped_now: dict[int, int] = {}  # worker -> its latest count in the current epoch
        # Lightning's CombinedLoader.reset() shuts down the workers of `_iterator` when it is a
        # multiprocessing iterator; we keep the inner one there for that.
        self._iterator: Any = None

    def __len__(self) -> int:
        return self.n_batches

    @property
    def skipped(self) -> int:
        """Samples skipped so far in this run (all epochs, all workers of this rank)."""
        return self._skipped_before + sum(self._skipped_now.values())

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self._epoch()

    def _epoch(self) -> Iterator[dict[str, Tensor]]:
        if self._resume is not None:
            epoch, skip = self._resume
            self._resume = None
            if skip >= self.n_batches:  # saved at the end of an epoch: go on with the next one
                epoch, skip = epoch + 1, 0
        else:
            epoch, skip = self.epoch + 1, 0
        self._skipped_before = self.skipped
        self._skipped_now = {}
        self.epoch, self.consumed = epoch, skip
        # Read by the workers when they start (at iter(loader)), hence non-persistent workers.
        self.stream.epoch, self.stream.skip_batches = epoch, skip
        self._iterator = iter(self.loader)
        for batch in self._iterator:
            worker = int(batch.pop(WORKER_ID))
            self._skipped_now[worker] = int(batch.pop(N_SKIPPED))
            self.consumed += 1
            yield batch
        self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        """The position: ``{"task", "epoch", "consumed", "n_batches", "num_workers", "skipped",
        "skipped_epoch"}`` (plain ints and a string: safe for ``torch.load(weights_only=True)``)."""
        return {
            "task": self.task,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "n_batches": self.n_batches,
            "num_workers": self.loader.num_workers,
            "skipped": self._skipped_before,
            "skipped_epoch": sum(self._skipped_now.values()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position on the next ``iter()`` (see the class docstring)."""
        if state.get("task") != self.task:
            raise ValueError(
                f"loader state of task {state.get('task')!r} given to the {self.task!r} loader; the tasks of "
                "the run changed since the checkpoint"
            )
        if int(state["n_batches"]) != self.n_batches:
            log.warning(
                "%s: the checkpoint's epoch had %s batches, now %s; resuming at batch %s of epoch %s",
                self.task, state["n_batches"], self.n_batches, state["consumed"], state["epoch"],
            )  # fmt: skip
        workers = int(state.get("num_workers", self.loader.num_workers))
        if workers != self.loader.num_workers:
            # The order is a function of the workers' seeds: another worker count is another order.
            log.warning(
                "%s: the checkpoint was written with num_workers=%d, this run has %d; the data order after "
                "resuming differs from an uninterrupted run (the position in the epoch is kept)",
                self.task, workers, self.loader.num_workers,
            )  # fmt: skip
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        self._resume = (epoch, consumed) if epoch >= 0 else None
        # The workers re-read the resumed epoch from its start, so its skips are counted again.
        finished = epoch >= 0 and consumed >= self.n_batches
        self._skipped_before = int(state.get("skipped", 0)) + (
            int(state.get("skipped_epoch", 0)) if finished else 0
        )
        self._skipped_now = {}
        self.epoch = epoch


class ValLoader:
    """Validation: each task's batches in turn, as ``{task: sub_batch}`` (one task per batch).

    One task per batch rather than a CombinedLoader: the tasks have different numbers of validation
    batches, and every validation sample should count once.
    """

    def __init__(self, loaders: dict[str, DataLoader]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[dict[str, dict[str, Tensor]]]:
        for task, loader in self.loaders.items():
            for batch in loader:
                batch.pop(WORKER_ID, None)
                batch.pop(N_SKIPPED, None)
                yield {task: batch}


# ----------------------------------------------------------------------------------------------------
# The DataModule
# ----------------------------------------------------------------------------------------------------


class WallarooDataModule(L.LightningDataModule):
    """Webdataset shards of up to three tasks -> ``{task: sub_batch}`` training batches.

    Args:
        t2i: text-to-image data (image + ``caption_en``/``caption_zh``).
        und: understanding data (images + ``conversations``).
        edit: editing data (``src`` + ``tgt`` images + ``instruction_en``/``instruction_zh``).
        num_workers: DataLoader workers per task.
        seed: data seed; the sample order is a function of (seed, epoch, rank, worker).
        images_only: tokenizer training: sub-batches are ``{"target_images"}`` only (no tokenizer needed).
    """

    def __init__(
        self,
        t2i: TaskData | None = None,
        und: TaskData | None = None,
        edit: TaskData | None = None,
        num_workers: int = 2,
        seed: int = 0,
        images_only: bool = False,
    ) -> None:
        super().__init__()
        data = {"t2i": _as_task_data(t2i), "und": _as_task_data(und), "edit": _as_task_data(edit)}
        # Plain dicts in the checkpoint: dataclasses would not load under torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                **{task: (asdict(d) if d is not None else None) for task, d in data.items()},
                "num_workers": num_workers,
                "seed": seed,
                "images_only": images_only,
            }
        )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data: dict[str, TaskData | None] = data
        self.num_workers = num_workers
        self.seed = seed
        self.images_only = images_only
        self.specs: dict[str, TaskSpec] = {}
        self.val_specs: dict[str, TaskSpec] = {}
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.token_ids: TokenIds | None = None
        self.rank, self.world_size = 0, 1
        self._configured = False
        self._train_loaders: dict[str, ResumableLoader] = {}

    # ------------------------------------------------------------------------------ configuration
    def setup(self, stage: str) -> None:
        """Take the model-dependent settings from the Trainer's LightningModule (once)."""
        if self._configured:
            return
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("WallarooDataModule.setup() needs a Trainer; without one call configure()")
        module = trainer.lightning_module
        cfg = getattr(module, "model_config", None)
        rank, world = trainer.global_rank, trainer.world_size
        if isinstance(cfg, WallarooConfig):
            self.configure(cfg, getattr(module, "TASKS", None), rank=rank, world_size=world)
        elif getattr(module, "vq", None) is not None and hasattr(module.vq, "downsample"):
            # The tokenizer stage: images only, buckets default to ShapesWorld's.
            if not self.images_only:
                log.info("%s has no model_config: reading images only", type(module).__name__)
            self.configure(None, None, downsample=int(module.vq.downsample), rank=rank, world_size=world)
        else:
            raise TypeError(
                f"{type(module).__name__} has neither a `model_config` (WallarooConfig) nor a `vq`; "
                "WallarooDataModule cannot tell its tokenizer, buckets and tasks"
            )

    def configure(
        self,
        model_config: WallarooConfig | None,
        tasks: Sequence[str] | None = None,
        *,
        tokenizer: tuple[PreTrainedTokenizerBase, TokenIds] | None = None,
        downsample: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        """Resolve the tasks and build the per-task specs; usable without a Trainer (tests, notebooks).

        ``model_config`` gives the tokenizer (``wallaroo.tokens.tokenizer_for``, unless ``tokenizer`` is
        passed), buckets, VQ downsampling and ViT pixel bounds; ``None`` means images only, with
        ``downsample`` given and buckets defaulting to ``"shapes"``. ``tasks``: the stage's tasks;
        configured tasks outside them are ignored with a warning, tasks among them without shards raise.
        ``None``: every configured task. ``rank``/``world_size`` default to torch.distributed's.
        """
        from wallaroo.vq import VQ_PRESETS

        images_only = self.images_only or model_config is None
        if model_config is None and downsample is None:
            raise ValueError("configure(None, ...) (images only) needs the VQ downsample")
        if downsample is None:
            downsample = VQ_PRESETS[model_config.vq].downsample
        configured = [t for t in TASKS if self.data[t] is not None]
        if tasks is None:
            active = configured
        else:
            unknown = [t for t in tasks if t not in TASKS]
            if unknown:
                raise ValueError(f"unknown tasks {unknown}; expected a subset of {TASKS}")
            ignored = [t for t in configured if t not in tasks]
            if ignored:
                warnings.warn(
                    f"data for {ignored} is configured but the stage trains {list(tasks)}; ignoring it",
                    stacklevel=2,
                )
            active = list(tasks)
        missing = [t for t in active if self.data[t] is None or not self.data[t].shards]
        if missing:
            raise ValueError(
                "the stage trains " + ", ".join(active) + " but no shards are given for "
                + ", ".join(f"data.{t}.shards" for t in missing)
            )  # fmt: skip
        if not active:
            raise ValueError("no task to load: give data.t2i, data.und and/or data.edit shards")
        if not images_only:
            self.tokenizer, self.token_ids = (
                tokenizer if tokenizer is not None else _tokenizer_for(model_config)
            )
        default_buckets = model_config.buckets if model_config is not None else "shapes"
        self.specs, self.val_specs = {}, {}
        for task in active:
            d = self.data[task]
            assert d is not None
            common = self._spec_fields(task, d, default_buckets, downsample, model_config, images_only)
            self.specs[task] = TaskSpec(urls=tuple(expand_shards(d.shards)), **common)
            if d.val_shards:
                self.val_specs[task] = TaskSpec(urls=tuple(expand_shards(d.val_shards)), **common)
            if not images_only:
                self._check_indicators(self.specs[task])
        self.images_only = images_only
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        self.rank, self.world_size = rank, world_size
        self._configured = True

    @staticmethod
    def _spec_fields(
        task: str,
        d: TaskData,
        default_buckets: str,
        downsample: int,
        cfg: WallarooConfig | None,
        images_only: bool,
    ) -> dict[str, Any]:
        buckets = d.buckets or default_buckets
        if buckets not in BUCKET_SETS:
            raise ValueError(
                f"data.{task}.buckets={buckets!r} is not a bucket set; expected one of {sorted(BUCKET_SETS)}"
            )
        fields: dict[str, Any] = dict(
            task=task, bucket_set=buckets, downsample=downsample, batch_size=d.batch_size,
            max_tokens=d.max_tokens, max_length=d.max_length, langs=tuple(d.langs), max_crop=d.max_crop,
            layout=d.layout or (cfg.t2i_layout if cfg is not None else "aspect"),
            cfg_drop=d.cfg_drop, templates=d.templates, shuffle_buffer=d.shuffle_buffer, images_only=images_only,
        )  # fmt: skip
        if cfg is not None:
            fields.update(
                codebook_size=cfg.codebook_size,
                vit_min_pixels=cfg.vit_min_pixels,
                vit_max_pixels=cfg.vit_max_pixels,
                vit_image_mean=None if cfg.vit_image_mean is None else tuple(cfg.vit_image_mean),
                vit_image_std=None if cfg.vit_image_std is None else tuple(cfg.vit_image_std),
                vit_scale=cfg.vit_scale,
            )
        return fields

    def _check_indicators(self, spec: TaskSpec) -> None:
        """Aspect t2i and edit write ``<indicator:h><indicator:w>``: every bucket side needs its token."""
        if spec.task == "und" or (spec.task == "t2i" and spec.layout == "square"):
            return
        assert self.token_ids is not None
        sides = {s for b in BUCKET_SETS[spec.bucket_set].values() for s in (b.w, b.h)}
        lacking = sorted(sides - set(self.token_ids.indicators))
        if lacking:
            raise ValueError(
                f"data.{spec.task}.buckets={spec.bucket_set!r} has sides {lacking} without indicator tokens "
                f"(this tokenizer has {sorted(self.token_ids.indicators)})"
            )

    @property
    def tasks(self) -> list[str]:
        """The tasks being loaded (after :meth:`configure`/:meth:`setup`)."""
        return list(self.specs)

    # ------------------------------------------------------------------------------ loaders
    def _loader(self, stream: TaskStream) -> DataLoader:
        if self.num_workers > 0:
            # Workers are forked after the main process may have used the Rust tokenizer's thread pool.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DataLoader(
            stream,
            batch_size=None,  # the stream yields whole batches
            num_workers=self.num_workers,
            persistent_workers=False,  # workers must see the epoch and resume position at each iter()
            pin_memory=torch.cuda.is_available(),
            in_order=True,  # batch j of an epoch is worker j % num_workers's; resuming relies on it
        )

    def _check_configured(self) -> None:
        if not self._configured:
            raise RuntimeError("call setup() (a Trainer does) or configure() before asking for dataloaders")

    def train_dataloader(self) -> CombinedLoader:
        """``{task: ResumableLoader}`` in a ``min_size`` CombinedLoader: one sub-batch per task and step."""
        self._check_configured()
        self._train_loaders = {}
        # min_size ends the epoch with the shortest task; giving every task that length keeps the loaders'
        # epochs in step, so a position saved at an epoch's end resumes every task in the next epoch.
        n_batches = min(self.data[task].n_batches for task in self.specs)
        for task, spec in self.specs.items():
            stream = TaskStream(
                spec, self.tokenizer, self.token_ids, seed=self.seed, train=True, n_batches=n_batches,
                rank=self.rank, world_size=self.world_size,
            )  # fmt: skip
            self._train_loaders[task] = ResumableLoader(task, self._loader(stream), stream)
        return CombinedLoader(dict(self._train_loaders), mode="min_size")

    def val_dataloader(self) -> ValLoader | list[Any]:
        """Each task with ``val_shards`` in turn (the first ``val_samples`` samples, same on every rank);
        an empty list (no validation) when no task has them."""
        self._check_configured()
        loaders: dict[str, DataLoader] = {}
        for task, spec in self.val_specs.items():
            d = self.data[task]
            assert d is not None
            stream = TaskStream(
                spec, self.tokenizer, self.token_ids, seed=self.seed, train=False, max_samples=d.val_samples
            )
            loaders[task] = self._loader(stream)
        return ValLoader(loaders) if loaders else []

    def skipped_counts(self) -> dict[str, int]:
        """Training samples skipped so far on this rank, per task (latest counts seen from each worker)."""
        return {task: loader.skipped for task, loader in self._train_loaders.items()}


def _tokenizer_for(cfg: WallarooConfig) -> tuple[PreTrainedTokenizerBase, TokenIds]:
    """``wallaroo.tokens.tokenizer_for``, looked up at call time (tests may substitute it)."""
    from wallaroo import tokens

    fn = getattr(tokens, "tokenizer_for", None)
    if fn is None:
        raise RuntimeError(
            "wallaroo.tokens.tokenizer_for is missing; pass configure(..., tokenizer=(tok, ids)) meanwhile"
        )
    return fn(cfg)
