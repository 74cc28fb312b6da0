"""Stage 2, pre-training: the whole LLM learns with the generation pathway; the ViT stays frozen."""

from stages.base import WallarooStage


class Stage2(WallarooStage):
    """Text-to-image and understanding together (384x384 at 7B)."""

    TRAINABLE = ("llm", "gen_adapter", "gen_head")
    TASKS = ("t2i", "und")
