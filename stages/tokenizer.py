"""ShapesWorld only: train the small VQ image tokenizer from scratch (reconstruction + codebook +
commitment losses). At 7B this step is LlamaGen's own ``vq_ds16_t2i.pt``.

``foreground_weight`` re-weights the reconstruction loss towards pixels that are not background white:
ShapesWorld objects cover 5-20% of a canvas, so with a plain mean the white background dominates the
loss and small objects decode as colourless blurs for hundreds of steps. With weight ``w`` a
foreground pixel counts ``1 + w`` times a background one (the weighted mean keeps the loss scale;
``train/vq_recon`` logs the weighted loss).
In 800-step trials on the shapes-ds8 network, the tokenizer ceiling went from 0.01 (``w = 0``) to
0.23 (``w = 10``).

``edge_weight`` adds weight on the pixels at an object's outline (either side of a foreground /
background boundary). The detector tells shapes apart by their outlines (a square whose corners decode
rounded reads as a circle), and with foreground weighting alone the outlines stay soft longest. In
1400-step trials (foreground weight 10, batch 16, 200 scenes) the ceiling went from 0.23 (``edge_weight =
0``) to 0.74 (10); 30 gave 0.61.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor

from stages.base import OptimConfig, build_optimizer
from wallaroo.vq import VQ_STAMP_KEY, VQModel, build_vq, vq_stamp


class TokenizerStage(L.LightningModule):
    """Trains a ``VQModel``; its checkpoint (keys ``vq.*``) is what later stages take as ``vq_path``."""

    def __init__(
        self,
        vq: str = "shapes-ds8",
        vq_overrides: dict[str, Any] | None = None,
        optim: OptimConfig | None = None,
        foreground_weight: float = 0.0,
        edge_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.optim = optim or OptimConfig(lr=2e-3)
        if foreground_weight < 0:
            raise ValueError(f"foreground_weight must be >= 0, got {foreground_weight}")
        if edge_weight < 0:
            raise ValueError(f"edge_weight must be >= 0, got {edge_weight}")
        self.foreground_weight = float(foreground_weight)
        self.edge_weight = float(edge_weight)
        # Plain values only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "vq": vq,
                "vq_overrides": dict(vq_overrides or {}),
                "optim": asdict(self.optim),
                "foreground_weight": self.foreground_weight,
                "edge_weight": self.edge_weight,
            }
        )
        self.vq: VQModel = build_vq(vq, **(vq_overrides or {}))

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        total = None
        for sub in batch.values():
            images = sub["target_images"]
            out = self.vq(images, self.pixel_weight(images))
            total = out.loss if total is None else total + out.loss
            self.log("train/vq_recon", out.recon_loss)
            self.log("train/vq_codebook", out.codebook_loss)
            self.log("train/vq_commit", out.commit_loss)
        self.log("train/loss", total, prog_bar=True)
        self.log("train/codebook_usage", self.vq.usage(), prog_bar=True)
        return total

    def pixel_weight(self, images: Tensor) -> Tensor | None:
        """Per-pixel loss weights ``[B, 1, H, W]``, or None when both weights are 0: 1, plus
        ``foreground_weight`` on foreground pixels, plus ``edge_weight`` on outline pixels (those whose
        3x3 neighbourhood holds both foreground and background).

        Foreground: any channel more than 0.05 below white (images in [-1, 1]; ShapesWorld pixels are
        either exactly white or a palette colour)."""
        if self.foreground_weight == 0 and self.edge_weight == 0:
            return None
        fg = (images < 1.0 - 0.05).any(dim=1, keepdim=True).to(images.dtype)
        weight = 1.0 + self.foreground_weight * fg
        if self.edge_weight:
            dilated = F.max_pool2d(fg, 3, stride=1, padding=1)
            eroded = -F.max_pool2d(-fg, 3, stride=1, padding=1)
            weight = weight + self.edge_weight * (dilated - eroded)
        return weight

    def weighted_recon(self, recon: Tensor, images: Tensor) -> Tensor:
        """The VQ's pixel loss (``VQConfig.recon_loss``) with this stage's pixel weights."""
        return self.vq._recon_loss(recon, images, self.pixel_weight(images))

    def validation_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> None:
        for sub in batch.values():
            out = self.vq(sub["target_images"])
            self.log("val/vq_recon", out.recon_loss)

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self.vq, self.optim, self.trainer.max_steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[VQ_STAMP_KEY] = vq_stamp(self.vq.config)
