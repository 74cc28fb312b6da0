"""ShapesWorld only: train the small VQ image tokenizer from scratch (reconstruction + codebook +
commitment losses). At 7B this step is LlamaGen's own ``vq_ds16_t2i.pt``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
from torch import Tensor

from stages.base import OptimConfig, build_optimizer
from wallaroo.vq import VQModel, build_vq


class TokenizerStage(L.LightningModule):
    """Trains a ``VQModel``; its checkpoint (keys ``vq.*``) is what later stages take as ``vq_path``."""

    def __init__(
        self,
        vq: str = "shapes-ds8",
        vq_overrides: dict[str, Any] | None = None,
        optim: OptimConfig | None = None,
    ) -> None:
        super().__init__()
        self.optim = optim or OptimConfig(lr=2e-3)
        # Plain values only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {"vq": vq, "vq_overrides": dict(vq_overrides or {}), "optim": asdict(self.optim)}
        )
        self.vq: VQModel = build_vq(vq, **(vq_overrides or {}))

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        total = None
        for sub in batch.values():
            out = self.vq(sub["target_images"])
            total = out.loss if total is None else total + out.loss
            self.log("train/vq_recon", out.recon_loss)
            self.log("train/vq_codebook", out.codebook_loss)
            self.log("train/vq_commit", out.commit_loss)
        self.log("train/loss", total, prog_bar=True)
        self.log("train/codebook_usage", self.vq.usage(), prog_bar=True)
        return total

    def validation_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> None:
        for sub in batch.values():
            out = self.vq(sub["target_images"])
            self.log("val/vq_recon", out.recon_loss)

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self.vq, self.optim, self.trainer.max_steps)
