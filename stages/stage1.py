"""Stage 1, alignment: only the generation adapter and head learn; the LLM and ViT stay frozen."""

from stages.base import WallarooStage


class Stage1(WallarooStage):
    """Text-to-image alignment (ImageNet class names in English and Chinese, 384x384 at 7B)."""

    TRAINABLE = ("gen_adapter", "gen_head")
    TASKS = ("t2i",)
