"""ShapesWorld only: pre-train the small Qwen2.5-VL on understanding.

At 7B this step is Qwen's own: its Instruct checkpoint. The laptop demo has no pretrained backbone, so it
trains one: the LLM always, the ViT (with its merger) unless ``train_vit=False``, in which case the ViT
keeps its random initialisation for good (every later stage freezes it too).
"""

from typing import Any

from stages.base import WallarooStage


class VLMPretrain(WallarooStage):
    """Understanding only; the LLM and (``train_vit``) the ViT and merger train."""

    TRAINABLE = ("vit", "llm")
    TASKS = ("und",)

    @classmethod
    def trainable_parts(cls, init_args: dict[str, Any]) -> tuple[str, ...]:
        return cls.TRAINABLE if init_args.get("train_vit", True) else ("llm",)

    def __init__(self, *args: Any, train_vit: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_vit = bool(train_vit)
        self.hparams["train_vit"] = self.train_vit
        self.TRAINABLE = self.trainable_parts({"train_vit": self.train_vit})
