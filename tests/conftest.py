"""Shared fixtures: the official tiny golden case (``../shared/reference/official_tiny``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The reference data lives in shared/, next to the checkout (CI) or inside it; WALLAROO_REFERENCE overrides.
_SHARED = next((p for p in (REPO.parent / "shared", REPO / "shared") if (p / "reference").is_dir()), REPO / "shared")
REFERENCE = Path(os.environ.get("WALLAROO_REFERENCE", _SHARED / "reference"))
OFFICIAL_TINY = REFERENCE / "official_tiny"

torch.set_num_threads(min(2, torch.get_num_threads()))


def need_reference() -> Path:
    if not OFFICIAL_TINY.is_dir():
        pytest.skip(f"reference data not found at {OFFICIAL_TINY} (set WALLAROO_REFERENCE)")
    return OFFICIAL_TINY


@pytest.fixture(scope="session")
def golden_cases() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(need_reference() / "cases.safetensors"))


@pytest.fixture(scope="session")
def golden_codebook() -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(need_reference() / "vq_codebook.safetensors"))["quantize.embedding.weight"]


@pytest.fixture(scope="session")
def golden_model():
    """The official tiny stage-4 weights loaded strictly into ``WallarooModel`` (tiny preset shapes)."""
    from wallaroo.checkpoints import convert_official_state_dict, load_weights_file
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel

    cfg = get_preset("tiny", codebook_size=16384, edit=True, attn_implementation="sdpa")
    model = WallarooModel(cfg)
    state = convert_official_state_dict(load_weights_file(str(need_reference() / "model.safetensors")))
    model.load_state_dict(state, strict=True)
    return model.eval()
