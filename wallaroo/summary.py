"""``python -m wallaroo.summary``: parameter counts per top-level module, built on the meta device.

No weights are read and no memory is allocated, so the 7B preset is summarised in seconds on a laptop.

    python -m wallaroo.summary --preset qwen2.5-vl-7b [--edit] [--json]
    python -m wallaroo.summary --stage stages/stage4.yaml [--json]   # trainable counts of a stage
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from wallaroo.config import get_preset
from wallaroo.model import WallarooModel, parameter_summary

LABELS = {
    "backbone": "Qwen2.5-VL backbone",
    "backbone.visual": "  ViT with merger",
    "backbone.llm": "  LLM (embeddings, layers, norm, lm_head)",
    "gen_adapter": "gen_adapter",
    "gen_head": "gen_head",
    "pixel_adapter": "pixel_adapter",
    "edit_adapter": "edit_adapter",
    "edit_head": "edit_head",
    "model": "model",
}


def summarize_preset(preset: str, edit: bool = False, **overrides: Any) -> dict[str, Any]:
    cfg = get_preset(preset, **overrides)
    if edit:
        cfg.edit = True
    with torch.device("meta"):
        model = WallarooModel(cfg)
    return {"preset": preset, "edit": cfg.edit, "modules": parameter_summary(model)}


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'module':<44}{'total':>16}{'trainable':>16}"]
    for key, counts in report["modules"].items():
        rows.append(f"{LABELS.get(key, key):<44}{counts['total']:>16,}{counts['trainable']:>16,}")
    head = f"preset {report['preset']}" + (f", stage {report['stage']}" if report.get("stage") else "")
    return head + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wallaroo.summary", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset name (tiny, shapes, qwen2.5-vl-3b, qwen2.5-vl-7b)")
    src.add_argument("--stage", help="a stage YAML (bare names resolve against stages/)")
    parser.add_argument("--edit", action="store_true", help="include the stage-4 editing modules")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.stage:
        from stages.summary import summarize_stage

        report = summarize_stage(args.stage)
    else:
        report = summarize_preset(args.preset, edit=args.edit)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
