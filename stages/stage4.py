"""Stage 4, unified: understanding, generation and editing; creates the editing modules."""

from stages.base import WallarooStage


class Stage4(WallarooStage):
    """Adds ``pixel_adapter``, ``edit_adapter`` and ``edit_head`` (new, so ``init_from`` may lack them)."""

    TRAINABLE = ("llm", "gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head")
    TASKS = ("und", "t2i", "edit")
    CREATES = ("pixel_adapter", "edit_adapter", "edit_head")
    EDIT = True
