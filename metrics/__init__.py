"""Evaluation: the ShapesWorld detector and ShapesEval, fidelity (FID/KID/IS/CLIP), free-form VQA accuracy,
and writers for official benchmark layouts (GenEval, DPG-Bench, ImgEdit).

Names are exported lazily (PEP 562): ``import metrics.detector`` stays pure numpy, and torch/torchmetrics
are imported only when a metric is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # detector (pure numpy)
    "detect": "metrics.detector",
    "image_matches": "metrics.detector",
    "scene_set": "metrics.detector",
    # ShapesEval
    "T2IAccuracy": "metrics.shapes_eval",
    "UndAccuracy": "metrics.shapes_eval",
    "EditAccuracy": "metrics.shapes_eval",
    "tokenizer_ceiling": "metrics.shapes_eval",
    "to_uint8": "metrics.shapes_eval",
    # free-form VQA
    "VQAAccuracy": "metrics.vqa",
    "normalize_answer": "metrics.vqa",
    "vqa_score": "metrics.vqa",
    # fidelity
    "build_feature_extractor": "metrics.fidelity",
    "compute_fidelity": "metrics.fidelity",
    "clip_score": "metrics.fidelity",
    "load_image_folder": "metrics.fidelity",
    "InceptionFeatures": "metrics.fidelity",
    "INCEPTION_WEIGHTS_FILE": "metrics.fidelity",
    # benchmark writers
    "WriteCounts": "metrics.benchmarks",
    "run_geneval": "metrics.benchmarks",
    "run_dpg_bench": "metrics.benchmarks",
    "run_imgedit": "metrics.benchmarks",
    "read_geneval_prompts": "metrics.benchmarks",
    "read_dpg_prompts": "metrics.benchmarks",
    "read_imgedit_items": "metrics.benchmarks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
