"""Which parts of a Wallaroo model train: one idempotent, name-based function.

Parts are named by role, not by substring lists:

| part | modules |
|---|---|
| ``vit`` | ``backbone.model.visual`` (ViT + merger) |
| ``llm`` | ``backbone.model.language_model`` (embeddings, layers, norm) and ``backbone.lm_head`` |
| ``gen_adapter``, ``gen_head`` | the generation pathway |
| ``pixel_adapter``, ``edit_adapter``, ``edit_head`` | the editing pathway (stage 4) |

Every parameter belongs to exactly one part; ``set_trainable`` sets ``requires_grad`` on all of them and puts
frozen towers in eval mode (open_clip's ``lock``), so calling it twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

PARTS = ("vit", "llm", "gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head")


def part_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each part present in ``model`` (a ``WallarooModel``)."""
    parts: dict[str, list[nn.Module]] = {
        "vit": [model.backbone.model.visual],
        "llm": [model.backbone.model.language_model, model.backbone.lm_head],
    }
    for name in PARTS[2:]:
        if hasattr(model, name):
            parts[name] = [getattr(model, name)]
    return parts


def set_trainable(model: nn.Module, trainable: Iterable[str]) -> dict[str, int]:
    """Make exactly the parts in ``trainable`` trainable; return ``{"trainable": n, "frozen": m}``.

    Unknown part names fail. A trainable part that the model lacks fails too (a stage that trains the
    editing modules must create them first). Frozen parts are switched to eval mode and stay there: the
    model's ``frozen_parts`` is consulted by ``WallarooModel.train``.
    """
    wanted = set(trainable)
    unknown = wanted - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; parts are {PARTS}")
    parts = part_modules(model)
    missing = wanted - set(parts)
    if missing:
        raise ValueError(f"trainable part(s) {sorted(missing)} are not in this model (edit modules missing?)")
    seen: set[int] = set()
    for name, modules in parts.items():
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(name in wanted)
                seen.add(id(p))
    orphans = [n for n, p in model.named_parameters() if id(p) not in seen]
    if orphans:
        raise RuntimeError(f"parameters outside every part: {orphans[:5]}")
    model.frozen_parts = tuple(sorted(set(parts) - wanted))
    model.train(model.training)
    return trainable_counts(model)


def trainable_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}


def apply_eval_to_frozen(model: nn.Module) -> None:
    """Keep frozen towers in eval mode whatever mode the rest of the model is in."""
    parts = part_modules(model)
    for name in getattr(model, "frozen_parts", ()):
        for module in parts.get(name, []):
            module.eval()
