"""ShapesWorld only: pre-train the small Qwen2.5-VL (ViT included) on understanding.

At 7B this step is Qwen's own: its Instruct checkpoint. The laptop demo has no pretrained backbone, so it
trains one; this is the one stage in which the ViT learns.
"""

from stages.base import WallarooStage


class VLMPretrain(WallarooStage):
    """Understanding only; ViT, merger and LLM all train."""

    TRAINABLE = ("vit", "llm")
    TASKS = ("und",)
