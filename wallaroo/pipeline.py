"""``WallarooPipeline``: prompts and images in, images and answers out.

The one place that turns user-level requests into prompt batches (``wallaroo.sequences``), runs the
decoding engine (``wallaroo.sampling``) and turns codes back into pixels with the VQ tokenizer. Training
previews, ``wallaroo.generate`` and ``wallaroo.evaluate`` all go through it, so they sample exactly alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from wallaroo.config import WallarooConfig
from wallaroo.images import VitImageProcessor
from wallaroo.model import WallarooModel
from wallaroo.sampling import SamplingConfig, generate_images, generate_text
from wallaroo.sequences import (
    BUCKET_SETS,
    Bucket,
    closest_bucket,
    collate,
    edit_prompt,
    resize_to_bucket,
    t2i_prompt,
    to_tensor_pm1,
    und_prompt,
)
from wallaroo.tokens import TokenIds, tokenizer_for
from wallaroo.vq import VQModel

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")

ImageLike = np.ndarray | Image.Image


def detect_lang(text: str) -> str:
    """``"zh"`` when the text holds CJK characters, else ``"en"`` (selects the template language)."""
    return "zh" if _CJK.search(text) else "en"


def to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """``[B, 3, H, W]`` in [-1, 1] -> list of ``uint8 [H, W, 3]``."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [p.permute(1, 2, 0).cpu().numpy() for p in pixels]


@dataclass
class PipelineConfig:
    """Prompt-side choices: template index, t2i layout (``"square"`` for stage-1/2 models)."""

    template_index: int = 0
    layout: str | None = None
    max_new_tokens: int = 64


class WallarooPipeline:
    """Inference over one model + VQ tokenizer + text tokenizer."""

    def __init__(
        self,
        model: WallarooModel,
        vq: VQModel,
        tokenizer: object | None = None,
        ids: TokenIds | None = None,
        options: PipelineConfig | None = None,
    ) -> None:
        self.model = model
        self.vq = vq
        self.cfg: WallarooConfig = model.cfg
        if tokenizer is None or ids is None:
            tokenizer, ids = tokenizer_for(self.cfg)
        self.tok = tokenizer
        self.ids = ids
        self.options = options or PipelineConfig()
        self.vit = VitImageProcessor.for_config(self.cfg)
        self.buckets = BUCKET_SETS[self.cfg.buckets]
        self._black_sources: dict[tuple[int, int], tuple[Bucket, Tensor, Tensor, Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layout(self) -> str:
        return self.options.layout or self.cfg.t2i_layout

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    def bucket(self, size: str | Bucket) -> Bucket:
        """A ``WxH`` size that must be one of the model's buckets (the error lists them)."""
        if isinstance(size, Bucket):
            bucket = size
        else:
            from wallaroo.sequences import parse_size

            bucket = parse_size(size)
        valid = list(self.buckets.values())
        if bucket not in valid:
            raise ValueError(f"size {bucket} is not one of this model's sizes: {', '.join(map(str, valid))}")
        return bucket

    # ----------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(self, codes: Tensor) -> list[np.ndarray]:
        return to_uint8(self.vq.decode_codes(codes.to(self.device)))

    # ----------------------------------------------------------------------------- t2i
    @torch.no_grad()
    def text_to_image(
        self,
        prompts: Sequence[str],
        size: str | Bucket,
        sampling: SamplingConfig | None = None,
        num_images: int = 1,
        batch_size: int = 16,
    ) -> list[np.ndarray]:
        """``num_images`` images per prompt (prompt-major order) at ``size`` (``WxH``, one of the buckets)."""
        bucket = self.bucket(size)
        sampling = sampling or SamplingConfig()
        ds = self.vq.downsample
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            kw = dict(template_index=self.options.template_index, layout=self.layout, ds=ds)
            cond = [t2i_prompt(self.tok, self.ids, p, bucket, lang=detect_lang(p), **kw) for p in chunk]
            uncond = [
                t2i_prompt(self.tok, self.ids, "", bucket, lang=detect_lang(p), drop_prompt=True, **kw)
                for p in chunk
            ]
            step = SamplingConfig(**{**sampling.__dict__, "seed": _chunk_seed(sampling.seed, start)})
            codes = generate_images(
                self.model,
                self.vq.quantize.embedding.weight,
                self._to_device(collate(cond, self.ids.pad, "left")),
                self._to_device(collate(uncond, self.ids.pad, "left")),
                (bucket.rows(ds), bucket.cols(ds)),
                "t2i",
                step,
                num_images=num_images,
                eol=self.layout == "aspect",  # the square layout (stages 1-2) is trained without EOL
            )
            out += self.decode(codes)
        return out

    # ----------------------------------------------------------------------------- editing
    def _source(self, image: ImageLike, black: bool) -> tuple[Bucket, Tensor, Tensor, Tensor]:
        """Bucket, VQ latents ``[R*C, D]``, ViT ``pixel_values`` and grid of one source image (or of an
        all-black image of its size, the unconditional branch's source; cached per size)."""
        pil = to_pil(image)
        if black:
            key = pil.size
            if key not in self._black_sources:
                self._black_sources[key] = self._source(Image.new("RGB", pil.size), black=False)
            return self._black_sources[key]
        bucket = closest_bucket(pil.width, pil.height, self.buckets)
        cropped = to_tensor_pm1(resize_to_bucket(pil, bucket))[None].to(self.device)
        _, latents = self.vq.encode(cropped.to(next(self.vq.parameters()).dtype))
        pixel_values, grid = self.vit([pil])
        return bucket, latents.reshape(-1, latents.shape[-1]), pixel_values, grid

    @torch.no_grad()
    def edit(
        self,
        images: Sequence[ImageLike],
        instructions: Sequence[str],
        sampling: SamplingConfig | None = None,
        batch_size: int = 16,
    ) -> list[np.ndarray]:
        """One edited image per (source, instruction); output size = the source's closest bucket."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        sampling = sampling or SamplingConfig()
        ds = self.vq.downsample
        merge = self.vit.merge_size**2
        # Batches need one grid: group by bucket, keep the caller's order in the output.
        by_bucket: dict[Bucket, list[int]] = {}
        for i, image in enumerate(images):
            pil = to_pil(image)
            by_bucket.setdefault(closest_bucket(pil.width, pil.height, self.buckets), []).append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for bucket, indices in by_bucket.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                rows = {True: [], False: []}
                for i in chunk:
                    text = instructions[i]
                    for black in (False, True):
                        _, latents, pv, grid = self._source(images[i], black)
                        sample = edit_prompt(
                            self.tok,
                            self.ids,
                            "" if black else text,
                            bucket,
                            int(grid.prod()) // merge,
                            lang=detect_lang(text),
                            template_index=self.options.template_index,
                            ds=ds,
                            drop_prompt=black,
                        )
                        sample.pixel_values, sample.image_grid_thw, sample.pixel_latents = pv, grid, latents
                        rows[black].append(sample)
                step = SamplingConfig(**{**sampling.__dict__, "seed": _chunk_seed(sampling.seed, start)})
                codes = generate_images(
                    self.model,
                    self.vq.quantize.embedding.weight,
                    self._to_device(collate(rows[False], self.ids.pad, "left")),
                    self._to_device(collate(rows[True], self.ids.pad, "left")),
                    (bucket.rows(ds), bucket.cols(ds)),
                    "edit",
                    step,
                )
                for i, img in zip(chunk, self.decode(codes), strict=True):
                    out[i] = img
        return [img for img in out if img is not None]

    # ----------------------------------------------------------------------------- understanding
    @torch.no_grad()
    def understand(
        self,
        images: Sequence[ImageLike | Sequence[ImageLike]],
        questions: Sequence[str | list[dict[str, str]]],
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 16,
    ) -> list[str]:
        """Answers to questions about images. A question is a string (one user turn; ``<image>`` is
        prepended when absent) or a whole conversation ending with a user turn (multi-turn)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        sampling = sampling or SamplingConfig(temperature=0.0)
        limit = max_new_tokens or self.options.max_new_tokens
        answers: list[str] = []
        merge = self.vit.merge_size**2
        for start in range(0, len(images), batch_size):
            samples = []
            for imgs, question in zip(
                images[start : start + batch_size], questions[start : start + batch_size], strict=True
            ):
                imgs = [imgs] if isinstance(imgs, np.ndarray | Image.Image) else list(imgs)
                pils = [to_pil(i) for i in imgs]
                pv, grid = self.vit(pils)
                if isinstance(question, str):
                    content = question if "<image>" in question else "<image>\n" * len(pils) + question
                    conversation = [{"role": "user", "content": content}]
                else:
                    conversation = question
                n_vit = [int(g.prod()) // merge for g in grid]
                sample = und_prompt(self.tok, self.ids, conversation, n_vit)
                sample.pixel_values, sample.image_grid_thw = pv, grid
                samples.append(sample)
            batch = self._to_device(collate(samples, self.ids.pad, "left"))
            out = generate_text(self.model, batch, limit, {self.ids.im_end, self.ids.pad}, sampling)
            answers += [self.tok.decode(ids, skip_special_tokens=True).strip() for ids in out]
        return answers


def _chunk_seed(seed: int | None, start: int) -> int | None:
    """Each chunk of a long prompt list gets its own seed so chunks do not repeat each other's draws; the
    same seed and batch size reproduce the same images."""
    return None if seed is None else int(seed) + start
