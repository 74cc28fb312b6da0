"""GPU figures on one lent GPU (an H200): training MFU at the 3B shape, decode latency at the 7B shape.

1. **MFU**: a stage-2 training step (t2i x8 at 384x384 + und x4 with a 448x448 image; LLM and generation
   pathway trainable, ViT frozen; fused AdamW) of a ``qwen2.5-vl-3b``-shaped model with random weights in
   bf16. Model FLOPs are counted analytically for the work the step needs:
   ``6 x (decoder-layer parameters) x tokens`` + causal attention ``6 x layers x hidden x sum(len^2)`` +
   the heads at their labelled positions (``6 x H x V`` per text label, ``6 x (H^2 + H x K)`` per image label)
   + the generation adapter + the frozen ViT's forward (``2 x ViT parameters x patches``, no backward).
   ``mfu`` divides the achieved FLOP/s by the GPU's dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM);
   ``mfu_vs_matmul`` by the rate of a large bf16 matmul measured in the same run.
2. **Decode**: milliseconds per decode step of text-to-image sampling at the ``qwen2.5-vl-7b`` shape (random
   bf16 weights), batch 1 with classifier-free guidance (2 rows), a 512x512 image (32x32 codes + 31 forced
   end-of-line steps) through ``wallaroo.sampling.generate_images`` with the KV cache; the prefill is timed
   separately and subtracted. The floor is the memory-bandwidth bound: the bytes every step must read
   (decoder layers, final norm, image head and adapter in bf16, plus the KV cache at half length) over the
   device-to-device copy bandwidth measured in the same run (``2 x bytes / time`` of a large copy).
   ``decode_ratio`` = measured / floor.

    python benchmarks/gpu.py [--json] [--compile]     # on the GPU
    python benchmarks/gpu.py --dry-run [--json]        # the same code at tiny sizes on the CPU (< 1 min)

``--json`` prints one JSON object with ``mfu``, ``decode_ms_per_step``, ``decode_floor_ms``, ``decode_ratio``
and the details. ``--compile`` decodes with a static cache and a compiled step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wallaroo.config import WallarooConfig, get_preset  # noqa: E402
from wallaroo.model import WallarooModel  # noqa: E402

DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
TINY_BACKBONE: dict[str, Any] = {
    "backbone.hidden_size": 64,
    "backbone.intermediate_size": 128,
    "backbone.num_hidden_layers": 2,
    "backbone.num_attention_heads": 4,
    "backbone.num_key_value_heads": 2,
    "backbone.mrope_section": [2, 3, 3],
    "backbone.vision_depth": 2,
    "backbone.vision_hidden_size": 32,
    "backbone.vision_intermediate_size": 64,
    "backbone.vision_num_heads": 2,
    "backbone.vision_fullatt_block_indexes": [0, 1],
}


@dataclass(frozen=True)
class Sizes:
    """What one run builds: full shapes on the GPU, tiny ones for ``--dry-run``."""

    overrides: dict[str, Any]
    t2i_batch: int
    t2i_grid: int  # codes per side (384 px / 16)
    und_batch: int
    und_image: int  # pixels per side
    decode_grid: int
    steps: int
    warmup: int
    copy_bytes: int
    matmul: int


FULL = Sizes({}, t2i_batch=8, t2i_grid=24, und_batch=4, und_image=448, decode_grid=32, steps=5, warmup=2,
             copy_bytes=4 << 30, matmul=8192)  # fmt: skip
DRY = Sizes(TINY_BACKBONE, t2i_batch=2, t2i_grid=4, und_batch=1, und_image=112, decode_grid=4, steps=1, warmup=1,
            copy_bytes=16 << 20, matmul=256)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> float:
    """Mean seconds of ``fn`` over ``repeat`` calls (synchronised)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: WallarooConfig, device: torch.device) -> WallarooModel:
    """Random bf16 weights, initialised on ``device`` (a 7B init on the host would take minutes)."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        return WallarooModel(cfg)


# ------------------------------------------------------------------------------------------- bandwidth, peak
def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s moved by a device-to-device copy (read + write: ``2 x nbytes`` per copy)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: dst.copy_(src), device, repeat=10)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, n: int) -> float:
    """FLOP/s of an ``n x n x n`` bf16 matmul."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    seconds = timed(lambda: a @ b, device, repeat=10)
    return 2 * n**3 / seconds


def peak_flops(device: torch.device, measured: float) -> tuple[float, str]:
    """The dense bf16 peak of a known GPU, else the measured matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in DENSE_BF16_PEAK.items():
            if key in name:
                return value, f"{name} spec"
        return measured, f"{name} (unknown: measured matmul)"
    return measured, "cpu (measured matmul)"


# ------------------------------------------------------------------------------------------- training MFU
def train_batches(model: WallarooModel, sizes: Sizes) -> dict[str, dict[str, torch.Tensor]]:
    """A t2i and an und sub-batch built by the package's sequence builders and the real Qwen tokenizer."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from wallaroo.images import VitImageProcessor
    from wallaroo.sequences import Bucket, build_t2i, build_und, collate
    from wallaroo.tokens import tokenizer_for

    cfg = model.cfg
    tok, ids = tokenizer_for(cfg)
    g = torch.Generator().manual_seed(0)
    bucket = Bucket(sizes.t2i_grid * 16, sizes.t2i_grid * 16)
    prompts = ["a red bicycle leaning against a blue wall, long afternoon shadows", "一只橘猫睡在木窗台上，窗外下着雨"]
    t2i = [
        build_t2i(tok, ids, prompts[i % 2], bucket, torch.randint(0, cfg.codebook_size, (sizes.t2i_grid,) * 2,
                  generator=g), lang="zh" if i % 2 else "en", template_index=i % 3, layout="square", ds=16)
        for i in range(sizes.t2i_batch)
    ]  # fmt: skip
    proc = VitImageProcessor.for_config(cfg)
    image = Image.fromarray(np.asarray(data.astronaut())).resize((sizes.und_image, sizes.und_image))
    pixel_values, grid = proc([image])
    n_vit = int(grid.prod()) // proc.merge_size**2
    answer = " ".join(["The astronaut stands in front of a flag and holds a helmet under one arm."] * 6)
    und = []
    for _ in range(sizes.und_batch):
        conv = [{"role": "user", "content": "<image>\nDescribe the image."}, {"role": "assistant", "content": answer}]
        sample = build_und(tok, ids, conv, [n_vit])
        sample.pixel_values, sample.image_grid_thw = pixel_values, grid
        und.append(sample)
    return {"t2i": collate(t2i, ids.pad), "und": collate(und, ids.pad)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_flops(model: WallarooModel, batches: dict[str, dict[str, torch.Tensor]]) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    text_cfg = model.backbone.config.text_config
    hidden, vocab = text_cfg.hidden_size, text_cfg.vocab_size
    layers = count(model.language_model.layers) + count(model.language_model.norm)
    head = count(model.gen_head)
    adapter = count(model.gen_adapter)
    vit = count(model.visual)
    flops = 0.0
    for b in batches.values():
        lengths = b["attention_mask"].sum(1).double()
        tokens = float(lengths.sum())
        flops += 6 * layers * tokens
        flops += 6 * text_cfg.num_hidden_layers * hidden * float((lengths**2).sum())  # causal: half of 12
        flops += 6 * hidden * vocab * int((b["labels"][:, 1:] != -100).sum())
        n_image = int((b["image_labels"] != -100).sum())
        flops += 6 * head * int((b["image_labels"][:, 1:] != -100).sum()) + 6 * adapter * n_image
        if b.get("pixel_values") is not None:
            flops += 2 * vit * b["pixel_values"].shape[0]
    return flops


def measure_mfu(cfg: WallarooConfig, device: torch.device, sizes: Sizes, peak: float) -> dict[str, Any]:
    from wallaroo.freezing import set_trainable

    model = build_model(cfg, device)
    set_trainable(model, ("llm", "gen_adapter", "gen_head"))
    model.train()
    codebook = torch.nn.functional.normalize(torch.randn(cfg.codebook_size, cfg.codebook_dim, device=device), dim=-1)
    batches = {t: {k: v.to(device) for k, v in b.items()} for t, b in train_batches(model, sizes).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = sum(model(b, t, codebook).loss for t, b in batches.items())
        loss.backward()
        opt.step()

    for _ in range(sizes.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, repeat=sizes.steps)
    flops = step_flops(model, batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches.values())
    out = {
        "mfu": flops / seconds / peak,
        "train_step_s": seconds,
        "train_tokens_per_step": tokens,
        "train_tokens_per_s": tokens / seconds,
        "train_tflops_per_step": flops / 1e12,
        "train_achieved_tflops": flops / seconds / 1e12,
        "train_parameters": count(model),
        "train_trainable": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        out["train_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out  # the model and optimiser states are freed with this frame


# ------------------------------------------------------------------------------------------- decode
def decode_prompts(model: WallarooModel, grid: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Cond and uncond (empty prompt, template kept) t2i prompts for a ``grid x grid`` image, left-padded."""
    from wallaroo.sequences import Bucket, collate, t2i_prompt
    from wallaroo.tokens import tokenizer_for

    tok, ids = tokenizer_for(model.cfg)
    bucket = Bucket(grid * 16, grid * 16)
    out = []
    for drop in (False, True):
        s = t2i_prompt(tok, ids, "a lighthouse on a cliff at sunset, waves below, oil painting", bucket,
                       lang="en", template_index=0, layout="square", ds=16, drop_prompt=drop)  # fmt: skip
        out.append(collate([s], ids.pad, padding_side="left"))
    return out[0], out[1]


def decode_bytes(model: WallarooModel, prompt_len: int, grid: int) -> int:
    """Bytes one image-decode step reads at least: decoder layers, norm, image head and adapter, and the
    KV cache of both rows at the mean length."""
    weights = count(model.language_model.layers) + count(model.language_model.norm)
    weights += count(model.gen_head) + count(model.gen_adapter)
    t = model.backbone.config.text_config
    head_dim = t.hidden_size // t.num_attention_heads
    mean_len = prompt_len + (grid * grid + grid) / 2
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim * mean_len * 2  # K and V, 2 rows
    return int(2 * (weights + kv))  # bf16


def measure_decode(
    cfg: WallarooConfig, device: torch.device, sizes: Sizes, bandwidth: float, compile: bool
) -> dict[str, Any]:
    from wallaroo.sampling import SamplingConfig, generate_images

    model = build_model(cfg, device).eval()
    codebook = torch.randn(cfg.codebook_size, cfg.codebook_dim, device=device)
    cond, uncond = (
        {k: v.to(device) for k, v in b.items()} for b in decode_prompts(model, sizes.decode_grid)
    )  # fmt: skip
    sampling = SamplingConfig(cfg_scale=3.0, top_k=1000, seed=0, static_cache=compile, compile=compile)
    g = sizes.decode_grid

    def run(grid: tuple[int, int]) -> None:
        generate_images(model, codebook, cond, uncond, grid, "t2i", sampling)

    run((g, g))  # warm-up (and compilation)
    prefill = timed(lambda: run((1, 1)), device, repeat=3)
    full = timed(lambda: run((g, g)), device, repeat=2)
    steps = g * g - 1 + g - 1  # cached steps after the prefill: codes fed back + forced end-of-line
    ms = (full - prefill) / steps * 1e3
    prompt_len = max(cond["input_ids"].shape[1], uncond["input_ids"].shape[1])
    nbytes = decode_bytes(model, prompt_len, g)
    floor_ms = nbytes / bandwidth * 1e3
    return {
        "decode_ms_per_step": ms,
        "decode_floor_ms": floor_ms,
        "decode_ratio": ms / floor_ms,
        "decode_prefill_ms": prefill * 1e3,
        "decode_image_s": full,
        "decode_steps": steps,
        "decode_gb_per_step": nbytes / 1e9,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: check the script end to end")
    p.add_argument("--compile", action="store_true", help="decode with a static cache and torch.compile")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU, or pass --dry-run")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    sizes = DRY if args.dry_run else FULL
    if args.dry_run:
        torch.set_num_threads(1)  # two threads on a busy 2-core machine thrash (40x slower small ops)
    t0 = time.perf_counter()
    matmul = matmul_rate(device, sizes.matmul)
    peak, peak_source = peak_flops(device, matmul)
    bandwidth = copy_bandwidth(device, sizes.copy_bytes)
    train_cfg = get_preset("qwen2.5-vl-3b", attn_implementation="sdpa", **sizes.overrides)
    decode_cfg = get_preset("qwen2.5-vl-7b", attn_implementation="sdpa", **sizes.overrides)
    result: dict[str, Any] = {}
    result.update(measure_mfu(train_cfg, device, sizes, peak))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 3B training state is gone; room for the 7B model
    result["mfu_vs_matmul"] = result["mfu"] * peak / matmul
    result.update(measure_decode(decode_cfg, device, sizes, bandwidth, args.compile))
    result.update(
        {
            "peak_tflops": peak / 1e12,
            "peak_source": peak_source,
            "matmul_tflops": matmul / 1e12,
            "copy_bandwidth_gbs": bandwidth / 1e9,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dry_run": args.dry_run,
            "seconds": time.perf_counter() - t0,
        }
    )
    if args.json:
        print(json.dumps(result))
        return result
    what = "DRY RUN (tiny shapes on the CPU: the numbers mean nothing)" if args.dry_run else result["device"]
    print(what)
    print(f"matmul {result['matmul_tflops']:.1f} TFLOP/s, peak {result['peak_tflops']:.1f} ({peak_source}), "
          f"copy {result['copy_bandwidth_gbs']:.0f} GB/s")  # fmt: skip
    print(f"train (3B shape): {result['train_tokens_per_s']:.0f} tokens/s, {result['train_achieved_tflops']:.1f} "
          f"TFLOP/s, MFU {result['mfu']:.1%} ({result['mfu_vs_matmul']:.1%} of the measured matmul)")  # fmt: skip
    print(f"decode (7B shape, CFG batch 2): {result['decode_ms_per_step']:.2f} ms/step, floor "
          f"{result['decode_floor_ms']:.2f} ms, ratio {result['decode_ratio']:.2f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
