"""Stage 4, unified: understanding, generation and editing; creates the editing modules."""

from typing import Any

import torch

from stages.base import WallarooStage

# Which trained module each new editing module copies when ``edit_from_gen`` is on: both adapters embed 8-d
# L2-normalised VQ vectors (codebook entries, or the source's continuous latents), both heads predict codes.
EDIT_FROM_GEN = {"edit_adapter": "gen_adapter", "pixel_adapter": "gen_adapter", "edit_head": "gen_head"}


class Stage4(WallarooStage):
    """Adds ``pixel_adapter``, ``edit_adapter`` and ``edit_head`` (new, so ``init_from`` may lack them)."""

    TRAINABLE = ("llm", "gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head")
    TASKS = ("und", "t2i", "edit")
    CREATES = ("pixel_adapter", "edit_adapter", "edit_head")
    EDIT = True

    def __init__(self, *args: Any, edit_from_gen: bool = False, **kwargs: Any) -> None:
        """
        Args:
            edit_from_gen: start the editing modules that ``init_from`` lacks as copies of the trained
                ``gen_adapter`` / ``gen_head`` (``EDIT_FROM_GEN``) instead of a random initialisation, so
                the edit head can already draw codes and the adapters already embed them. Off by default
                (the 7B recipe creates them fresh); the ShapesWorld recipe turns it on.
        """
        super().__init__(*args, **kwargs)
        self.edit_from_gen = bool(edit_from_gen)
        self.hparams["edit_from_gen"] = self.edit_from_gen

    def load_initial_weights(self) -> None:
        super().load_initial_weights()
        if self.edit_from_gen:
            with torch.no_grad():
                for name in self.created_fresh:
                    getattr(self.model, name).load_state_dict(getattr(self.model, EDIT_FROM_GEN[name]).state_dict())
