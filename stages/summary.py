"""Parameter counts of a stage file, on the meta device (``python -m wallaroo.summary --stage ...``)."""

from __future__ import annotations

import importlib
from typing import Any

import torch
import yaml

from wallaroo.fit import resolve_stage_path
from wallaroo.freezing import set_trainable
from wallaroo.model import WallarooModel, parameter_summary


def stage_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"model.class_path {class_path!r} is not a dotted path")
    return getattr(importlib.import_module(module), name)


def summarize_stage(path: str) -> dict[str, Any]:
    """Build the stage's model on the meta device, freeze as the stage does, count per module.

    Only ``model.class_path`` and ``model.init_args`` are read (interpolations elsewhere, such as
    weight paths in environment variables, need not resolve)."""
    from stages.base import WallarooStage

    resolved = resolve_stage_path(path)
    with open(resolved, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    model_section = raw.get("model") or {}
    cls = stage_class(model_section.get("class_path", ""))
    if not (isinstance(cls, type) and issubclass(cls, WallarooStage)):
        raise ValueError(f"{resolved}: model.class_path {cls} is not a WallarooStage")
    init_args = model_section.get("init_args") or {}
    preset = init_args.get("preset", "tiny")
    from wallaroo.config import get_preset

    cfg = get_preset(preset)
    cfg.edit = cfg.edit or cls.EDIT
    with torch.device("meta"):
        model = WallarooModel(cfg)
    counts = set_trainable(model, cls.trainable_parts(init_args))
    return {
        "stage": str(resolved),
        "class": f"{cls.__module__}.{cls.__name__}",
        "preset": preset,
        "edit": cfg.edit,
        "trainable": counts["trainable"],
        "frozen": counts["frozen"],
        "modules": parameter_summary(model),
    }
