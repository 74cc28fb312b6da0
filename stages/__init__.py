"""Training stages: one ``LightningModule`` subclass per stage (``stages/stageN.py``), their 7B recipes
(``stages/stageN.yaml``) and the ShapesWorld laptop recipes (``stages/shapes/``)."""

from stages.base import OptimConfig, PreviewConfig, WallarooStage
from stages.pretrain import VLMPretrain
from stages.stage1 import Stage1
from stages.stage2 import Stage2
from stages.stage3 import Stage3
from stages.stage4 import Stage4

__all__ = [
    "OptimConfig",
    "PreviewConfig",
    "Stage1",
    "Stage2",
    "Stage3",
    "Stage4",
    "VLMPretrain",
    "WallarooStage",
]
