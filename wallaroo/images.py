"""ViT-side image preprocessing (Qwen2.5-VL's own processor, without torchvision).

``Qwen2_5_VLProcessor`` cannot be built without torchvision, so we wrap the PIL backend of the image
processor, ``Qwen2VLImageProcessorPil``, and expand ``<|image_pad|>`` ourselves (see ``sequences.py``).
It matches the reference's transformers-4.51 slow ``Qwen2VLImageProcessor`` bit for bit on the golden
cases: factor-28 ``smart_resize`` (bicubic), /255, CLIP mean/std, then 14x14 patches flattened as
(channel 3, temporal 2, y 14, x 14) = 1176 columns, rows ordered by merged 2x2 groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

if TYPE_CHECKING:
    from wallaroo.config import WallarooConfig

# Qwen2.5-VL's preprocessor_config values (used by the reference golden cases).
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 16384
TEMPORAL_PATCH_SIZE = 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalisation(
    mean: Sequence[float] | None, std: Sequence[float] | None, names: tuple[str, str] = ("image_mean", "image_std")
) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` for the ViT's /255 pixels, ``None`` meaning Qwen's CLIP values; fails
    (naming ``names``) unless each has 3 values and every std is positive."""
    m = [float(v) for v in (CLIP_MEAN if mean is None else mean)]
    s = [float(v) for v in (CLIP_STD if std is None else std)]
    if len(m) != 3 or len(s) != 3 or min(s) <= 0:
        raise ValueError(f"{names[0]} and {names[1]} need 3 values each (std > 0), got {m}, {s}")
    return m, s


class VitImageProcessor:
    """Images -> ``(pixel_values [N, 3·2·p·p], image_grid_thw [n_images, 3])`` for the Qwen ViT.

    ``min_pixels``/``max_pixels`` bound the resized area (``smart_resize`` with factor
    ``patch_size · merge_size``); the LLM sees ``grid_h·grid_w / merge_size²`` tokens per image.
    ``image_mean``/``image_std`` normalise the /255 pixels per channel (default: Qwen's CLIP values).
    ``scale`` (laptop presets) replaces ``smart_resize`` by one fixed factor for every image (nearest
    neighbour), so that the patch grid lands on a known pixel grid (ShapesWorld: 8 px -> 28 px, one merged
    token per VQ code); the scaled sides must be multiples of ``patch_size · merge_size``.
    """

    def __init__(
        self,
        min_pixels: int,
        max_pixels: int,
        patch_size: int = 14,
        merge_size: int = 2,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        scale: float | None = None,
    ) -> None:
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.image_mean, self.image_std = normalisation(image_mean, image_std)
        self.min_pixels = int(min_pixels)
        self.max_pixels = int(max_pixels)
        self.patch_size = int(patch_size)
        self.merge_size = int(merge_size)
        if scale is not None and not scale > 0:
            raise ValueError(f"vit_scale must be positive, got {scale}")
        self.scale = None if scale is None else float(scale)
        # Imported here: the processor module pulls in transformers' processing stack (seconds), which
        # code that only imports this module (e.g. for num_tokens in a config) should not pay for.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # transformers 5.x spells the bounds as size={"shortest_edge": min, "longest_edge": max}.
        self._processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
            image_mean=self.image_mean,
            image_std=self.image_std,
        )

    @classmethod
    def for_config(cls, cfg: WallarooConfig, max_pixels: int | None = None) -> VitImageProcessor:
        """The processor a model config asks for (its pixel bounds and normalisation)."""
        return cls(
            cfg.vit_min_pixels,
            cfg.vit_max_pixels if max_pixels is None else max_pixels,
            image_mean=cfg.vit_image_mean,
            image_std=cfg.vit_image_std,
            scale=cfg.vit_scale,
        )

    @property
    def factor(self) -> int:
        """Side lengths after resizing are multiples of this (28 for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Columns of ``pixel_values`` (1176 for Qwen2.5-VL)."""
        return 3 * TEMPORAL_PATCH_SIZE * self.patch_size * self.patch_size

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """``(w', h')`` the processor resizes a ``w x h`` image to."""
        if self.scale is not None:
            w2, h2 = round(w * self.scale), round(h * self.scale)
            if w2 % self.factor or h2 % self.factor:
                raise ValueError(
                    f"vit_scale {self.scale:g} makes a {w}x{h} image {w2}x{h2}; both sides must be multiples of "
                    f"{self.factor}"
                )
            return w2, h2
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h2, w2 = smart_resize(
            h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        return w2, h2

    def num_tokens(self, w: int, h: int) -> int:
        """LLM tokens (``<|image_pad|>`` count) for a ``w x h`` image, after the 2x2 merge."""
        w2, h2 = self.resized_size(w, h)
        return (w2 // self.factor) * (h2 // self.factor)

    def __call__(self, images: Sequence[Image.Image | np.ndarray]) -> tuple[Tensor, Tensor]:
        """Process images in order; ``pixel_values`` rows of image i follow those of image i-1.

        Arrays must be uint8 ``HxWx3`` (or ``HxW`` grey). Returns float32 ``pixel_values`` and long
        ``image_grid_thw`` (one ``(1, grid_h, grid_w)`` row per image).
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            raise TypeError("pass a list of images, not a single image")
        pil = [self._to_pil(img, i) for i, img in enumerate(images)]
        if not pil:
            return torch.zeros(0, self.patch_dim), torch.zeros(0, 3, dtype=torch.long)
        if self.scale is not None:  # fixed factor: resized here, the processor only normalises and patches
            pil = [img.resize(self.resized_size(*img.size), Image.Resampling.NEAREST) for img in pil]
            out = self._processor(pil, return_tensors="pt", do_resize=False)
        else:
            out = self._processor(pil, return_tensors="pt")
        pixel_values = out["pixel_values"].to(torch.float32)
        grid = out["image_grid_thw"].to(torch.long)
        return pixel_values, grid

    @staticmethod
    def _to_pil(img: Image.Image | np.ndarray, index: int) -> Image.Image:
        if isinstance(img, Image.Image):
            return img.convert("RGB")
        if isinstance(img, np.ndarray):
            # Converting ourselves avoids the processor guessing the channel axis of tiny arrays.
            if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
                raise ValueError(
                    f"image {index}: arrays must be uint8 HxW, HxWx3 or HxWx4, got {img.dtype} {img.shape}"
                )
            return Image.fromarray(img).convert("RGB")
        raise TypeError(f"image {index}: expected a PIL image or a numpy array, got {type(img).__name__}")
