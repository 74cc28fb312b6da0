"""The ViT's patch embedding: transformers' ``Conv3d`` against the matrix product Wallaroo runs instead.

    python benchmarks/patch_embed.py [--json] [--repeats 50]

``wallaroo.model.patch_embed_as_linear`` makes the Qwen2.5-VL ViT's patch embedding one matrix product over each
flattened 3x2x14x14 patch (kernel = stride, so the result is the same). Timed here, forward and backward as a
frozen ViT runs it (forward only, under ``no_grad``), on two inputs: the ShapesWorld stage-4 batch of the
``shapes`` preset (24 edit + 8 understanding images, 72x48, the preset's ViT scale) and one 448x448 image for the
7B ViT (1280 wide). Printed per case: milliseconds a call of each, ``ratio`` (product / Conv3d, below 1 is faster)
and the largest difference between their outputs. fp32 and, on a CPU with AMX or a GPU, bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        start = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - start) / repeats * 1e3


def case(name: str, embed_dim: int, pixels: torch.Tensor, repeats: int, dtype: torch.dtype | None) -> dict[str, Any]:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    from wallaroo.model import _linear_patch_forward

    torch.manual_seed(0)
    embed = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=embed_dim)

    def conv(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return Qwen2_5_VisionPatchEmbed.forward(embed, x)

    def product(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return _linear_patch_forward(embed, x)

    with torch.no_grad():
        diff = float((conv(pixels).float() - product(pixels).float()).abs().max())
    conv_ms, product_ms = _time(conv, pixels, repeats), _time(product, pixels, repeats)
    return {
        "case": name, "dtype": str(dtype or torch.float32).replace("torch.", ""), "patches": pixels.shape[0],
        "conv3d_ms": round(conv_ms, 3), "product_ms": round(product_ms, 3),
        "ratio": round(product_ms / conv_ms, 3), "max_abs_diff": diff,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)

    import numpy as np

    from datamodules import shapes_world as sw
    from wallaroo.config import get_preset
    from wallaroo.images import VitImageProcessor

    cfg = get_preset("shapes")
    rng = np.random.default_rng(0)
    images = [sw.render(sw.random_scene(rng, size=(72, 48)), 72, 48) for _ in range(32)]
    shapes_pixels, _ = VitImageProcessor.for_config(cfg)(images)
    big_pixels = torch.randn(32 * 32, 3 * 2 * 14 * 14)  # 448x448: 32 x 32 patches of 14 px
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    dtypes: list[torch.dtype | None] = [None] + ([torch.bfloat16] if amx else [])
    rows = []
    for dtype in dtypes:
        rows.append(case("shapes stage-4 batch (32 images)", cfg.backbone.vision_hidden_size, shapes_pixels,
                         args.repeats, dtype))  # fmt: skip
        rows.append(case("7B ViT, one 448x448 image", 1280, big_pixels, args.repeats, dtype))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['case']:<34} {r['dtype']:<9} {r['patches']:>5} patches  Conv3d {r['conv3d_ms']:8.3f} ms  "
                  f"product {r['product_ms']:8.3f} ms  ratio {r['ratio']:.3f}  max diff {r['max_abs_diff']:.1e}")
    return rows


if __name__ == "__main__":
    main()
