"""Webdataset shards -> validated, bucketed, token-budgeted batches, one stream per task.

Shard schema (one webdataset sample = the files sharing a key; extra fields are ignored):

- ``t2i``: an image (``png`` | ``jpg`` | ``jpeg`` | ``webp``) and ``json`` = ``{"caption_en": str and/or
  "caption_zh": str}``. Optional ``codes.npy``: the target's VQ codes, an integer array ``[rows, cols]``
  (``rows = h / downsample``); when present it is used instead of encoding the image (the image may
  then be absent) and its shape fixes the bucket, which must belong to the bucket set.
- ``und``: images ``0.png``, ``1.png``, ... (any of the image extensions; a single bare ``png``/``jpg`` is
  image 0) and ``json`` = ``{"conversations": [{"role": "user", "content": "<image>\\n..."},
  {"role": "assistant", "content": "..."}, ...]}``: one ``<image>`` per image, in order (untagged
  images go before the first user text). An optional ``"lang"`` outside the task's ``langs`` filters the
  sample out (silently: it is a choice, not an error).
- ``edit``: ``src.png`` and ``tgt.png`` (any image extension) and ``json`` = ``{"instruction_en": str
  and/or "instruction_zh": str}``.

Per sample (inside the DataLoader workers): decode with PIL, validate, pick the language among the
caption/instruction fields allowed by ``langs``, pick the bucket (closest aspect in the bucket set),
resize to cover + centre crop, apply classifier-free-guidance dropout, build the token sequence with
``wallaroo.sequences``. A sample that fails any of this is skipped, counted, and logged with its shard
and key; it never stops the run. Only a stream that yields no usable sample at all raises.

Batching: samples wait in per-bucket buffers (also keyed by "carries codes" and a length bin of a
quarter octave, so the padding in a batch stays under ~19%); a buffer is emitted as a batch when it
holds ``batch_size`` samples or when one more sample would make ``samples x padded length`` exceed
``max_tokens``. Order is a pure function of (seed, epoch, rank, worker): every random choice (shard
draw, shuffle buffer, language, template, CFG dropout) comes from generators seeded by those numbers.

Training streams are resampled (shards drawn with replacement, each (rank, worker) with its own seed,
so no node/worker splitting of the shard list is needed and any shard count works); an epoch is a
fixed number of batches per rank, split between the workers so that the DataLoader's round-robin
order is exact (batch ``j`` of an epoch comes from worker ``j % num_workers``), which is what lets a
resumed run skip exactly the consumed batches. The order therefore also depends on ``num_workers`` and
the number of ranks: resume with the same ones to continue the same sequence. Validation streams
read the shards in sorted order, take the first ``max_samples`` samples and split them between the
workers sample by sample; they are *not* split between ranks, so every rank evaluates the same
batches (the same number of steps on every rank, which sharded strategies need).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase
from webdataset.filters import shuffle as wds_shuffle
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from datamodules.shapes_world import SPEC_VERSION
from wallaroo.images import VitImageProcessor
from wallaroo.sequences import (
    BUCKET_SETS,
    EDIT_TEMPLATES,
    GENERATE_TEMPLATES,
    LANGS,
    LAYOUTS,
    Bucket,
    BuiltSample,
    build_edit,
    build_t2i,
    build_und,
    closest_bucket,
    collate,
    resize_to_bucket,
)
from wallaroo.tokens import TokenIds

# Pixel tensors wait in the batching buffers as uint8 (a quarter of float32: a 512x512 image is 0.75 MB)
# and become [-1, 1] floats when a batch is collated.


def to_uint8_chw(img: Image.Image) -> Tensor:
    """RGB image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_to_pm1(x: Tensor) -> Tensor:
    """uint8 [..., 3, H, W] -> float32 in [-1, 1], with the same operations (so the same values) as
    ``wallaroo.sequences.to_tensor_pm1``."""
    return x.to(torch.float32).div_(255.0).sub_(0.5).div_(0.5)


log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("t2i", "und", "edit")
IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
# Keys the workers add for the main process's bookkeeping (see datamodules.datamodule).
N_SKIPPED = "n_skipped"
WORKER_ID = "worker_id"
# Length bins per octave: samples in one batch differ in length by at most 2**(1/4) ~ 19%.
_BINS_PER_OCTAVE = 4
# Skip warnings: the first few in full, then at powers of two, so a broken dataset cannot flood the log.
_LOG_FIRST = 10
_UND_IMAGE_RE = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTS) + r")$")


# ----------------------------------------------------------------------------------------------------
# Shard lists
# ----------------------------------------------------------------------------------------------------


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a de-duplicated list of URLs, in the order given (directories and globs
    sorted).

    ``spec`` is one string or a list; each entry may be a webdataset brace pattern
    (``data/t2i-{000000..000099}.tar``, ``::``-separated lists), a local glob (``data/**/*.tar``), a
    local directory (every ``.tar``/``.tar.gz``/``.tgz`` below it, recursively) or any URL webdataset's
    ``gopen`` opens (``pipe:``, ``http(s)://``, ``file:``). Raises ``FileNotFoundError`` for a plain
    local path that does not exist and ``ValueError`` when nothing is left.
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise TypeError(f"shard entries must be strings, got {type(entry).__name__}")
        for url in expand_urls(entry):
            if os.path.isdir(url):
                found = [
                    os.path.join(root, f)
                    for root, _, files in os.walk(url)
                    for f in files
                    if f.endswith(SHARD_SUFFIXES)
                ]
                urls += sorted(found)
            elif glob.has_magic(url) and ":" not in url.split("/", 1)[0]:
                urls += sorted(glob.glob(url, recursive=True))
            elif "://" not in url and not url.startswith(("pipe:", "file:")) and not os.path.exists(url):
                raise FileNotFoundError(f"shard {url!r} (from {entry!r}) does not exist")
            else:
                urls.append(url)
    urls = list(dict.fromkeys(urls))
    if not urls:
        raise ValueError(f"shard spec {spec!r} matched no shards")
    return urls


# ----------------------------------------------------------------------------------------------------
# Task spec, skip accounting, seeding
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """Everything a worker needs to turn one task's shards into batches (picklable, model-independent
    apart from the numbers copied in from the model config).

    ``bucket_set`` names a set in ``wallaroo.sequences.BUCKET_SETS``; ``downsample`` is the VQ's pixels
    per code; ``max_tokens`` bounds ``samples x padded length`` per batch; ``max_length`` bounds one
    sample (longer ones are skipped). ``images_only`` makes batches of ``target_images`` alone (each
    image counts as one of ``batch_size``). ``codebook_size`` (optional) range-checks ``codes.npy``.
    """

    task: str
    urls: tuple[str, ...]
    bucket_set: str
    downsample: int
    batch_size: int = 8
    max_tokens: int | None = None
    max_length: int | None = None
    layout: str = "aspect"
    langs: tuple[str, ...] = LANGS
    cfg_drop: float = 0.1
    templates: int | None = None
    max_crop: float = 1.0
    shuffle_buffer: int = 256
    images_only: bool = False
    codebook_size: int | None = None
    vit_min_pixels: int = 3136
    vit_max_pixels: int = 254_016
    vit_image_mean: tuple[float, ...] | None = None
    vit_image_std: tuple[float, ...] | None = None
    vit_scale: float | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if not self.urls:
            raise ValueError(f"{self.task}: no shards")
        if self.bucket_set not in BUCKET_SETS:
            raise ValueError(f"unknown bucket set {self.bucket_set!r}; expected one of {sorted(BUCKET_SETS)}")
        if self.batch_size < 1:
            raise ValueError(f"{self.task}: batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{self.task}: {name} must be >= 1 or None, got {value}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.task}: layout must be one of {LAYOUTS}, got {self.layout!r}")
        bad = [lang for lang in self.langs if lang not in LANGS]
        if bad or not self.langs:
            raise ValueError(
                f"{self.task}: langs must be a non-empty subset of {LANGS}, got {list(self.langs)}"
            )
        if not 0.0 <= self.cfg_drop <= 1.0:
            raise ValueError(f"{self.task}: cfg_drop must be in [0, 1], got {self.cfg_drop}")
        if self.templates is not None and self.templates < 1:
            raise ValueError(f"{self.task}: templates must be >= 1 or None (all), got {self.templates}")
        buckets = list(BUCKET_SETS[self.bucket_set].values())
        for b in buckets:
            b.grid(self.downsample)  # raises naming the bucket when the VQ cannot tile it
        if self.task == "t2i" and self.layout == "square" and any(b.w != b.h for b in buckets):
            raise ValueError(
                f"t2i layout='square' needs a square bucket set, but {self.bucket_set!r} has "
                f"{[str(b) for b in buckets if b.w != b.h]}; use layout='aspect' or a square set"
            )

    @property
    def token_limit(self) -> int | None:
        """The longest sample that can ever be batched: ``min(max_length, max_tokens)``."""
        limits = [x for x in (self.max_length, self.max_tokens) if x is not None]
        return min(limits) if limits else None


class SampleError(Exception):
    """A sample that cannot be used (undecodable, missing or ill-typed field, too long): skipped and
    counted."""


class StaleShardError(Exception):
    """A ShapesWorld shard written under another version of the spec: its pixels and scenes follow another
    contract, so the run stops (skipping would silently train on nothing) and says how to rewrite it."""


class SampleFiltered(Exception):
    """A valid sample this configuration does not want (e.g. a language outside ``langs``): dropped
    silently."""


class SkipCounter:
    """Counts and logs skipped samples of one task in one worker (rate-limited)."""

    def __init__(self, task: str, worker: int) -> None:
        self.task = task
        self.worker = worker
        self.count = 0

    def skip(self, url: str, key: str | None, reason: str) -> None:
        self.count += 1
        n = self.count
        if n <= _LOG_FIRST or (n & (n - 1)) == 0:
            what = f"sample {key!r}" if key is not None else "data"
            extra = "" if n <= _LOG_FIRST else " (further skip warnings are rate-limited)"
            log.warning(
                "skipping %s %s from shard %s: %s [%d skipped so far by worker %d]%s",
                self.task, what, url, reason, n, self.worker, extra,
            )  # fmt: skip


def seeded_rng(*parts: int) -> random.Random:
    """A ``random.Random`` seeded from integers through numpy's SeedSequence (well mixed, and unlike
    ``hash()`` of strings the same in every process)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def worker_share(total: int, worker: int, n_workers: int) -> int:
    """How many of ``total`` round-robin items (item ``j`` to worker ``j % n_workers``) go to ``worker``."""
    if total <= worker:
        return 0
    return (total - worker + n_workers - 1) // n_workers


def length_bin(length: int) -> int:
    """Quarter-octave bin of a sequence length (samples of one bin differ by at most ~19%)."""
    return int(math.floor(math.log2(max(length, 1)) * _BINS_PER_OCTAVE))


# ----------------------------------------------------------------------------------------------------
# Reading shards
# ----------------------------------------------------------------------------------------------------


def read_shard(url: str, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) of one tar shard, in file order.

    Unreadable shards, truncated archives and duplicate member names are counted as skips and logged
    with the shard; the samples read before a failure are still yielded.
    """

    def handler(exn: Exception) -> bool:
        skips.skip(url, None, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True  # continue with the next member / shard

    try:
        stream = gopen(url)
    except Exception as exn:  # noqa: BLE001 - any open failure is a skipped shard, never a crash
        handler(exn)
        return
    with contextlib.closing(stream):
        files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from group_by_keys(files, handler=handler)


# ----------------------------------------------------------------------------------------------------
# Per-sample building
# ----------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One unit of a batch: a built sequence (with its target/source images) or, in images-only mode,
    one image. ``key`` is the batching buffer it belongs to; ``length`` its token count (0 for images);
    ``target``/``source`` are uint8 ``[3, H, W]`` at the bucket's size."""

    key: tuple[Any, ...]
    length: int
    sample: BuiltSample | None = None
    target: Tensor | None = None
    source: Tensor | None = None


def decode_image(data: Any, name: str) -> Image.Image:
    """Bytes -> RGB PIL image, fully decoded (a truncated file fails here, not later in a resize)."""
    if not isinstance(data, (bytes, bytearray)):
        raise SampleError(f"{name}: expected image bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad files
        raise SampleError(f"{name}: cannot decode image ({type(exn).__name__}: {exn})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise SampleError(f"{name}: empty image")
    return rgb


def _find_image(raw: dict[str, Any], stem: str | None) -> str | None:
    """The first present field among ``{stem}.{ext}`` (or bare ``{ext}`` when stem is None)."""
    for ext in IMAGE_EXTS:
        name = ext if stem is None else f"{stem}.{ext}"
        if name in raw:
            return name
    return None


def _decode_json(raw: dict[str, Any]) -> dict[str, Any]:
    if "json" not in raw:
        raise SampleError("missing json")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, TypeError) as exn:
        raise SampleError(f"json does not parse ({exn})") from None
    if not isinstance(meta, dict):
        raise SampleError(f"json must be an object, got {type(meta).__name__}")
    if "scene" in meta and meta.get("spec") != SPEC_VERSION:  # a ShapesWorld record
        raise StaleShardError(
            f"a ShapesWorld shard of spec {meta.get('spec', 'shapes-world-v1')!r}, this package reads "
            f"{SPEC_VERSION!r}: rewrite the shards with `python -m datamodules.shapes --out DIR --samples N`"
        )
    return meta


def _pick_text(meta: dict[str, Any], field: str, langs: Sequence[str], rng: random.Random) -> tuple[str, str]:
    """``(lang, text)`` drawn among the ``{field}_{lang}`` fields present for ``lang`` in ``langs``."""
    present: list[tuple[str, str]] = []
    other = False
    for lang in LANGS:
        name = f"{field}_{lang}"
        if name not in meta or meta[name] is None:
            continue
        value = meta[name]
        if not isinstance(value, str):
            raise SampleError(f"json field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            continue
        if lang in langs:
            present.append((lang, value))
        else:
            other = True
    if not present:
        if other:
            raise SampleFiltered(f"no {field} in {list(langs)}")
        raise SampleError(f"json lacks {' / '.join(f'{field}_{lang}' for lang in LANGS)}")
    return present[0] if len(present) == 1 else rng.choice(present)


class SampleBuilder:
    """Raw webdataset sample -> list of :class:`Item` for one task (one item, or one per image in
    images-only mode). Raises :class:`SampleError` / :class:`SampleFiltered`; never anything else for
    bad data (unexpected exceptions from the builders are wrapped into ``SampleError``)."""

    def __init__(
        self, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase | None, ids: TokenIds | None
    ) -> None:
        if not spec.images_only and (tokenizer is None or ids is None):
            raise ValueError("a tokenizer and its TokenIds are needed unless images_only=True")
        self.spec = spec
        self.tok = tokenizer
        self.ids = ids
        self.buckets = BUCKET_SETS[spec.bucket_set]
        self.bucket_sizes = {(b.w, b.h) for b in self.buckets.values()}
        self.vit: VitImageProcessor | None = None
        if not spec.images_only and spec.task in ("und", "edit"):
            self.vit = VitImageProcessor(
                spec.vit_min_pixels, spec.vit_max_pixels, image_mean=spec.vit_image_mean, image_std=spec.vit_image_std,
                scale=spec.vit_scale,
            )

    def __call__(self, raw: dict[str, Any], rng: random.Random, *, train: bool) -> list[Item]:
        try:
            if self.spec.task == "t2i":
                return self._t2i(raw, rng, train)
            if self.spec.task == "und":
                return self._und(raw)
            return self._edit(raw, rng, train)
        except (SampleError, SampleFiltered):
            raise
        except StaleShardError as exn:
            raise StaleShardError(f"{raw.get('__url__')} (sample {raw.get('__key__')}): {exn}") from None
        except Exception as exn:  # noqa: BLE001 - bad data must never stop the run
            raise SampleError(f"{type(exn).__name__}: {exn}") from None

    # ------------------------------------------------------------------------------ helpers
    def _bucket(self, img: Image.Image) -> Bucket:
        """The closest bucket; images whose centre crop to it would remove more than ``max_crop`` of their
        area are filtered out."""
        bucket = closest_bucket(img.width, img.height, self.buckets)
        if self.spec.max_crop < 1.0:
            scale = max(bucket.w / img.width, bucket.h / img.height)
            kept = (bucket.w * bucket.h) / (img.width * img.height * scale * scale)
            if 1.0 - kept > self.spec.max_crop + 1e-9:
                raise SampleFiltered(f"{img.width}x{img.height} -> {bucket} would crop {1 - kept:.0%}")
        return bucket

    def _image_item(self, img: Image.Image, bucket: Bucket | None = None) -> Item:
        bucket = bucket or self._bucket(img)
        return Item(key=("image", bucket), length=0, target=to_uint8_chw(resize_to_bucket(img, bucket)))

    def _seq_item(self, sample: BuiltSample, key: tuple[Any, ...], **images: Tensor | None) -> Item:
        n = len(sample)
        limit = self.spec.token_limit
        if limit is not None and n > limit:
            raise SampleError(f"{n} tokens > limit {limit} (max_length={self.spec.max_length}, "
                              f"max_tokens={self.spec.max_tokens})")  # fmt: skip
        return Item(key=(*key, length_bin(n)), length=n, sample=sample, **images)

    def _vit(self, images: Sequence[Image.Image]) -> tuple[Tensor, Tensor, list[int]]:
        assert self.vit is not None
        pixel_values, grid = self.vit(list(images))
        merge = self.vit.merge_size**2
        return pixel_values, grid, [int(g.prod()) // merge for g in grid]

    def _codes(self, raw: dict[str, Any]) -> Tensor:
        try:
            arr = np.load(io.BytesIO(raw["codes.npy"]), allow_pickle=False)
        except Exception as exn:  # noqa: BLE001
            raise SampleError(f"codes.npy does not load ({type(exn).__name__}: {exn})") from None
        if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.size == 0:
            raise SampleError(f"codes.npy must be a 2-D integer array, got {arr.dtype} {arr.shape}")
        k = self.spec.codebook_size
        if arr.min() < 0 or (k is not None and arr.max() >= k):
            raise SampleError(f"codes.npy values must be in [0, {k}), got [{arr.min()}, {arr.max()}]")
        return torch.from_numpy(arr.astype(np.int64))

    # ------------------------------------------------------------------------------ tasks
    def _n_templates(self, templates: list[str]) -> int:
        """How many of one language's templates training draws from (``TaskSpec.templates``, None: all)."""
        return min(len(templates), self.spec.templates or len(templates))

    def _t2i(self, raw: dict[str, Any], rng: random.Random, train: bool) -> list[Item]:
        spec = self.spec
        has_codes = "codes.npy" in raw and not spec.images_only
        image_name = _find_image(raw, None)
        if spec.images_only:
            if image_name is None:
                raise SampleError(f"missing image ({'/'.join(IMAGE_EXTS)})")
            return [self._image_item(decode_image(raw[image_name], image_name))]
        meta = _decode_json(raw)
        lang, prompt = _pick_text(meta, "caption", spec.langs, rng)
        template = rng.randrange(self._n_templates(GENERATE_TEMPLATES[lang]))
        drop = train and rng.random() < spec.cfg_drop
        codes: Tensor | None = None
        target: Tensor | None = None
        if has_codes:
            # The codes fix the target: its grid gives the bucket; the image is not needed.
            codes = self._codes(raw)
            rows, cols = codes.shape
            bucket = Bucket(w=cols * spec.downsample, h=rows * spec.downsample)
            if (bucket.w, bucket.h) not in self.bucket_sizes:
                raise SampleError(
                    f"codes.npy grid {rows}x{cols} is {bucket}, not a bucket of {spec.bucket_set!r}"
                )
        else:
            if image_name is None:
                raise SampleError(f"missing image ({'/'.join(IMAGE_EXTS)}) and no codes.npy")
            img = decode_image(raw[image_name], image_name)
            bucket = self._bucket(img)
            target = to_uint8_chw(resize_to_bucket(img, bucket))
        sample = build_t2i(
            self.tok, self.ids, prompt, bucket, codes, lang=lang, template_index=template, layout=spec.layout,
            ds=spec.downsample, drop_prompt=drop,
        )  # fmt: skip
        return [self._seq_item(sample, ("t2i", bucket, has_codes), target=target)]

    def _und_images(self, raw: dict[str, Any]) -> list[Image.Image]:
        numbered: dict[int, str] = {}
        for name in raw:
            m = _UND_IMAGE_RE.match(name)
            if m is not None:
                index = int(m.group(1))
                if index in numbered:
                    raise SampleError(f"two files for image {index}: {numbered[index]}, {name}")
                numbered[index] = name
        if not numbered:
            bare = _find_image(raw, None)
            return [decode_image(raw[bare], bare)] if bare is not None else []
        if sorted(numbered) != list(range(len(numbered))):
            raise SampleError(f"images must be numbered 0..n-1, got {sorted(numbered)}")
        return [decode_image(raw[numbered[i]], numbered[i]) for i in range(len(numbered))]

    def _und(self, raw: dict[str, Any]) -> list[Item]:
        if self.spec.images_only:
            images = self._und_images(raw)
            if not images:
                raise SampleError("no image")
            return [self._image_item(img) for img in images]
        meta = _decode_json(raw)
        lang = meta.get("lang")
        if isinstance(lang, str) and lang in LANGS and lang not in self.spec.langs:
            raise SampleFiltered(f"lang {lang!r} not in {list(self.spec.langs)}")
        conversation = meta.get("conversations")
        if not isinstance(conversation, list) or not conversation:
            raise SampleError("json lacks a non-empty 'conversations' list")
        images = self._und_images(raw)
        pixel_values = grid = None
        n_vit: list[int] = []
        if images:
            pixel_values, grid, n_vit = self._vit(images)
        sample = build_und(self.tok, self.ids, conversation, n_vit)
        sample.pixel_values, sample.image_grid_thw = pixel_values, grid
        bucket = self._bucket(images[0]) if images else None
        return [self._seq_item(sample, ("und", bucket))]

    def _edit(self, raw: dict[str, Any], rng: random.Random, train: bool) -> list[Item]:
        spec = self.spec
        src_name, tgt_name = _find_image(raw, "src"), _find_image(raw, "tgt")
        if src_name is None or tgt_name is None:
            missing = [s for s, n in (("src", src_name), ("tgt", tgt_name)) if n is None]
            raise SampleError(f"missing {' and '.join(missing)} image")
        src = decode_image(raw[src_name], src_name)
        tgt = decode_image(raw[tgt_name], tgt_name)
        bucket = self._bucket(src)  # the output has the source's aspect
        if spec.images_only:
            return [self._image_item(src, bucket), self._image_item(tgt, bucket)]
        meta = _decode_json(raw)
        lang, instruction = _pick_text(meta, "instruction", spec.langs, rng)
        template = rng.randrange(self._n_templates(EDIT_TEMPLATES[lang]))
        drop = train and rng.random() < spec.cfg_drop
        if drop:
            # The reference CFG null sample: empty instruction AND a black source in both streams.
            src = Image.new("RGB", src.size, (0, 0, 0))
        pixel_values, grid, n_vit = self._vit([src])
        sample = build_edit(
            self.tok, self.ids, instruction, bucket, None, n_vit[0], lang=lang, template_index=template,
            ds=spec.downsample, drop_prompt=drop,
        )  # fmt: skip
        sample.pixel_values, sample.image_grid_thw = pixel_values, grid
        return [
            self._seq_item(
                sample,
                ("edit", bucket),
                source=to_uint8_chw(resize_to_bucket(src, bucket)),
                target=to_uint8_chw(resize_to_bucket(tgt, bucket)),
            )
        ]


# ----------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------


class BucketBatcher:
    """Per-key buffers; :meth:`add` returns the batches that became ready, in a deterministic order.

    A buffer is emitted when it holds ``batch_size`` items, or before adding an item that would push
    ``items x max length`` over ``max_tokens`` (the buffer is emitted first, the item starts a new one).
    """

    def __init__(self, batch_size: int, max_tokens: int | None) -> None:
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.buffers: dict[tuple[Any, ...], list[Item]] = {}

    def add(self, item: Item) -> list[list[Item]]:
        ready: list[list[Item]] = []
        buf = self.buffers.setdefault(item.key, [])
        if buf and self.max_tokens is not None:
            padded = max(item.length, max(it.length for it in buf))
            if (len(buf) + 1) * padded > self.max_tokens:
                ready.append(buf[:])
                buf.clear()
        buf.append(item)
        if len(buf) >= self.batch_size:
            ready.append(buf[:])
            buf.clear()
        return ready

    def flush(self) -> list[list[Item]]:
        """The partial buffers, in the order their keys first appeared."""
        ready = [buf[:] for buf in self.buffers.values() if buf]
        self.buffers.clear()
        return ready


def collate_items(items: Sequence[Item], pad_id: int | None, *, images_only: bool) -> dict[str, Tensor]:
    """One sub-batch. Sequences: ``wallaroo.sequences.collate`` (right padding with ``pad_id``) plus
    ``target_images`` / ``source_images`` ``[B, 3, H, W]`` when the items carry them (items of one buffer
    share a bucket, so they stack). Images only: ``{"target_images": [B, 3, H, W]}``."""
    if images_only:
        return {"target_images": uint8_to_pm1(torch.stack([it.target for it in items]))}
    assert pad_id is not None
    batch = collate([it.sample for it in items], pad_id)
    for name, attr in (("target_images", "target"), ("source_images", "source")):
        tensors = [getattr(it, attr) for it in items]
        if any(t is not None for t in tensors):
            # Buffers are keyed by "carries codes", so an item never lacks what its batch mates have.
            batch[name] = uint8_to_pm1(torch.stack(tensors))
    return batch


# ----------------------------------------------------------------------------------------------------
# The stream
# ----------------------------------------------------------------------------------------------------


class TaskStream(IterableDataset):
    """One task's batches, for a ``DataLoader(batch_size=None)``.

    Training (``train=True``): resampled shards, an epoch of ``n_batches`` batches for this rank, split
    over the workers; the main process sets :attr:`epoch` and :attr:`skip_batches` (batches of this
    epoch already consumed, for resuming) before each ``iter()`` — so DataLoader workers must not be
    persistent. Skipped batches are still read and built, only not collated or sent (the data order
    depends on every sample before them). Validation (``train=False``): the first ``max_samples``
    samples of the shards in order, no CFG dropout, every partial buffer flushed at the end.

    Each sub-batch carries ``n_skipped`` (0-d long: this worker's count of skipped samples in this
    epoch) and ``worker_id`` (0-d long), which the main-process wrapper records and removes.
    """

    def __init__(
        self,
        spec: TaskSpec,
        tokenizer: PreTrainedTokenizerBase | None,
        ids: TokenIds | None,
        *,
        seed: int,
        train: bool,
        n_batches: int | None = None,
        max_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if train and (n_batches is None or n_batches < 1):
            raise ValueError("a training stream needs n_batches >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.spec = spec
        self.tokenizer = tokenizer
        self.ids = ids
        self.seed = int(seed)
        self.train = train
        self.n_batches = n_batches
        self.max_samples = max_samples
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0
        self._builder = SampleBuilder(spec, tokenizer, ids)

    def _rng(self, worker: int, purpose: int) -> random.Random:
        task_index = TASKS.index(self.spec.task)
        return seeded_rng(self.seed, task_index, self.epoch, self.rank, worker, purpose)

    def _resampled(
        self, rng: random.Random, skips: SkipCounter, built: list[int]
    ) -> Iterator[dict[str, Any]]:
        """Shards drawn with replacement, forever; raises if many shards in a row give nothing usable."""
        urls = self.spec.urls
        # The shuffle buffer delays building by up to shuffle_buffer samples (one shard each at worst).
        patience = 2 * len(urls) + self.spec.shuffle_buffer + 16
        dry, last_built = 0, built[0]
        while True:
            yield from read_shard(urls[rng.randrange(len(urls))], skips)
            dry = dry + 1 if built[0] == last_built else 0
            last_built = built[0]
            if dry > patience:
                raise RuntimeError(
                    f"{self.spec.task}: no usable sample in the last {dry} shards drawn from {len(urls)} "
                    f"(first: {urls[0]}); {skips.count} samples were skipped (see the warnings above), the "
                    f"rest filtered out (langs={list(self.spec.langs)})"
                )

    def _ordered(self, worker: int, n_workers: int, skips: SkipCounter) -> Iterator[dict[str, Any]]:
        """The first ``max_samples`` samples of the shards in order; this worker's every n-th one, each
        tagged with its index (``__index__``) in the whole ordered stream."""
        index = 0
        for url in self.spec.urls:
            for raw in read_shard(url, skips):
                if self.max_samples is not None and index >= self.max_samples:
                    return
                if index % n_workers == worker:
                    raw["__index__"] = index
                    yield raw
                index += 1

    def _items(self, raws: Iterator[dict[str, Any]], rng: random.Random, skips: SkipCounter,
               built: list[int]) -> Iterator[Item]:  # fmt: skip
        task_index = TASKS.index(self.spec.task)
        for raw in raws:
            if "__index__" in raw:
                # Validation: the choices of a sample depend on its place in the ordered stream only, so
                # the batches hold the same sequences whatever the number of workers.
                rng = seeded_rng(self.seed, task_index, raw["__index__"], 3)
            try:
                items = self._builder(raw, rng, train=self.train)
            except SampleFiltered:
                continue
            except SampleError as exn:
                skips.skip(str(raw.get("__url__")), str(raw.get("__key__")), str(exn))
                continue
            built[0] += 1
            yield from items

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            # Many workers x many intra-op threads oversubscribe the cores; our per-sample work is small.
            torch.set_num_threads(1)
        skips = SkipCounter(self.spec.task, worker)
        built = [0]  # samples built so far (a list: shared with the raw-stream generator)
        spec = self.spec
        if self.train:
            assert self.n_batches is not None
            # Batch j of the epoch belongs to logical worker j % n_workers. After k consumed batches the
            # DataLoader's round robin starts again at worker 0, which must serve batch k: physical
            # worker p plays logical worker (p + k) % n_workers. Seeds and shares follow the logical id.
            logical = (worker + self.skip_batches) % n_workers
            quota = worker_share(self.n_batches, logical, n_workers)
            skip = worker_share(self.skip_batches, logical, n_workers)
            raws: Iterator[dict[str, Any]] = self._resampled(self._rng(logical, 0), skips, built)
            if spec.shuffle_buffer > 1:
                raws = wds_shuffle(
                    spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=self._rng(logical, 1)
                )(raws)
            build_rng = self._rng(logical, 2)
        else:
            quota, skip = None, 0
            raws = self._ordered(worker, n_workers, skips)
            build_rng = self._rng(worker, 2)  # unused: validation seeds each sample by its index
        items = self._items(raws, build_rng, skips, built)
        batcher = BucketBatcher(spec.batch_size, None if spec.images_only else spec.max_tokens)
        pad_id = self.ids.pad if self.ids is not None else None

        def batches() -> Iterator[list[Item]]:
            for item in items:
                yield from batcher.add(item)
            if not self.train:
                yield from batcher.flush()

        if quota == 0:
            return
        emitted = 0
        for group in batches():
            emitted += 1
            if emitted > skip:
                batch = collate_items(group, pad_id, images_only=spec.images_only)
                batch[N_SKIPPED] = torch.tensor(skips.count, dtype=torch.long)
                batch[WORKER_ID] = torch.tensor(worker, dtype=torch.long)
                yield batch
            if quota is not None and emitted >= quota:
                return
