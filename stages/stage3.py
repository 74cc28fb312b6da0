"""Stage 3, high resolution: as stage 2, at 512x512 and then the 19 aspect buckets around it."""

from stages.base import WallarooStage


class Stage3(WallarooStage):
    """Same trainable parts and tasks as stage 2; the recipes change resolution, layout and LR."""

    TRAINABLE = ("llm", "gen_adapter", "gen_head")
    TASKS = ("t2i", "und")
