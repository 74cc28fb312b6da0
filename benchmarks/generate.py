"""Throughput of the decoding engine (``wallaroo/sampling.py``) on random weights.

For the ``tiny`` and ``shapes`` presets:
- text-to-image, an 8x8 grid (64 codes + 7 forced end-of-line steps; 64x64 px at the 8x VQ of ``shapes``),
  CFG on (2B rows): one prompt at a time with the default growing ``DynamicCache`` (the baseline), a
  batch of 16 prompts with the ``DynamicCache`` and with the ``StaticCache``;
- understanding, 128 new tokens after a prompt with one image (no early stop): the KV cache vs re-running
  the whole sequence, ViT included, for every token (the released ``mmu_generate``).

    python benchmarks/generate.py [--json] [--presets tiny shapes] [--threads 1]

``--json`` prints one JSON object; ``t2i_batch16_speedup`` (batch-16 images/s over one-at-a-time
images/s) and ``und_cache_speedup`` (cached over recompute tokens/s) are those of the ``shapes`` preset.
Throughputs are wall-clock. With one thread (the default) the speedups are ratios of process CPU time,
which on a busy machine excludes the time spent waiting for a core; ``*_speedup_wall`` give the wall-clock
ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wallaroo.config import get_preset  # noqa: E402
from wallaroo.model import WallarooModel  # noqa: E402
from wallaroo.sampling import SamplingConfig, generate_images, generate_text, left_pad_batches  # noqa: E402

GRID = (8, 8)
BATCH = 16
UND_NEW_TOKENS = 128


def t2i_prompts(model: WallarooModel, n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` left-padded prompts of ``length - 4 .. length`` ids ending at ``<|generate_start|>``: the
    shape of a real template prompt (system block, instruction, ``<|im_start|>assistant\\n``)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, cfg.special_base - 1, (length - (i % 5),), generator=g)
        ids[0], ids[-4], ids[-1] = (
            cfg.special_id("im_start"),
            cfg.special_id("im_start"),
            cfg.special_id("generate_start"),
        )
        rows.append(
            {
                "input_ids": ids[None],
                "attention_mask": torch.ones_like(ids)[None],
                "mm_token_type_ids": torch.zeros_like(ids)[None],
            }
        )
    return left_pad_batches(rows, cfg.special_id("pad"))


def und_prompt(model: WallarooModel, text_len: int = 40, seed: int = 0) -> dict[str, torch.Tensor]:
    """One question with a 112x112 image (8x8 patches -> 16 ViT tokens) and ``text_len`` text ids."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor([[1, 8, 8]])
    n_vit = int(grid.prod()) // 4
    text = torch.randint(1, cfg.special_base - 1, (text_len,), generator=g)
    ids = torch.cat(
        [
            text[:14],
            torch.tensor([cfg.special_id("vision_start")]),
            torch.full((n_vit,), cfg.special_id("image_pad")),
            torch.tensor([cfg.special_id("vision_end")]),
            text[14:],
        ]
    )[None]
    types = (ids == cfg.special_id("image_pad")).long()
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": types,
        "pixel_values": torch.randn(int(grid.prod()), 1176, generator=g),
        "image_grid_thw": grid,
    }


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, float]:
    """Best wall time and best process CPU time over ``repeat`` runs (callers warm up beforehand)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - w0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def bench_preset(name: str) -> dict[str, float]:
    """All figures of one preset (random weights, random codebook)."""
    torch.manual_seed(0)
    model = WallarooModel(get_preset(name)).eval()
    codebook = torch.randn(model.cfg.codebook_size, model.cfg.codebook_dim)
    codes_per_image = GRID[0] * GRID[1]
    sampling = SamplingConfig(cfg_scale=3.0, top_k=1000, seed=0)
    cond = t2i_prompts(model, BATCH, 40, seed=1)
    uncond = t2i_prompts(model, BATCH, 30, seed=2)
    und = und_prompt(model)
    no_stop: set[int] = set()
    greedy = SamplingConfig(top_k=1)

    def one_at_a_time(n: int = BATCH) -> None:
        for i in range(n):
            c = _trim({k: v[i : i + 1] for k, v in cond.items()})
            u = _trim({k: v[i : i + 1] for k, v in uncond.items()})
            generate_images(model, codebook, c, u, GRID, "t2i", sampling)

    def batched(static: bool) -> None:
        s = SamplingConfig(cfg_scale=3.0, top_k=1000, seed=0, static_cache=static)
        generate_images(model, codebook, cond, uncond, GRID, "t2i", s)

    # Warm-up (allocator, kernels, lazy imports) with short runs of every path.
    one_at_a_time(1)
    generate_text(model, und, 4, no_stop, greedy)
    generate_text(model, und, 2, no_stop, greedy, full_recompute=True)

    # Best of a few runs on both sides of every ratio: load spikes on a shared machine only ever slow a run.
    one = timed(one_at_a_time, repeat=2)
    b16 = timed(lambda: batched(False), repeat=3)
    b16_static = timed(lambda: batched(True), repeat=3)
    und_cache = timed(lambda: generate_text(model, und, UND_NEW_TOKENS, no_stop, greedy), repeat=3)
    und_full = timed(
        lambda: generate_text(model, und, UND_NEW_TOKENS, no_stop, greedy, full_recompute=True), repeat=2
    )

    # Speedups from CPU time when single-threaded: on a shared machine the wall clock also counts the time
    # spent waiting for a core, which swings a ratio of two runs taken seconds apart. Both are reported.
    k = 1 if torch.get_num_threads() == 1 else 0
    out = {}
    for key, (wall, _) in [("t2i_batch1", one), ("t2i_batch16", b16), ("t2i_batch16_static", b16_static)]:
        out[f"{key}_images_per_s"] = BATCH / wall
        out[f"{key}_tokens_per_s"] = BATCH * codes_per_image / wall
    out["t2i_batch16_speedup"] = one[k] / b16[k]
    out["t2i_batch16_speedup_wall"] = one[0] / b16[0]
    out["und_cache_tokens_per_s"] = UND_NEW_TOKENS / und_cache[0]
    out["und_recompute_tokens_per_s"] = UND_NEW_TOKENS / und_full[0]
    out["und_cache_speedup"] = und_full[k] / und_cache[k]
    out["und_cache_speedup_wall"] = und_full[0] / und_cache[0]
    out["speedups_from"] = "cpu_time" if k else "wall_time"  # type: ignore[assignment]
    return out


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the left-pad columns a one-row slice of a padded batch still carries."""
    keep = batch["attention_mask"].bool().any(0)
    return {k: v[:, keep] for k, v in batch.items()}


def print_preset(name: str, r: dict[str, float]) -> None:
    """The human-readable block of one preset."""
    print(f"[{name}] ({r['wall_s']:.1f}s)")
    print(f"  t2i {GRID[0]}x{GRID[1]}, CFG (2B rows):")
    rows = [
        ("one at a time", "t2i_batch1"),
        (f"batch {BATCH}", "t2i_batch16"),
        (f"batch {BATCH} static", "t2i_batch16_static"),
    ]
    for label, key in rows:
        images, codes = r[key + "_images_per_s"], r[key + "_tokens_per_s"]
        line = f"    {label:<16}: {images:8.2f} images/s {codes:9.1f} codes/s"
        if key == "t2i_batch16":
            speedup, wall = r["t2i_batch16_speedup"], r["t2i_batch16_speedup_wall"]
            line += f"  ({speedup:.1f}x one at a time; wall clock {wall:.1f}x)"
        print(line)
    print(f"  und, {UND_NEW_TOKENS} new tokens:")
    speedup, wall = r["und_cache_speedup"], r["und_cache_speedup_wall"]
    print(
        f"    {'KV cache':<16}: {r['und_cache_tokens_per_s']:8.1f} tokens/s"
        f"  ({speedup:.1f}x recompute; wall clock {wall:.1f}x)"
    )
    print(f"    {'recompute':<16}: {r['und_recompute_tokens_per_s']:8.1f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--presets", nargs="+", default=["tiny", "shapes"])
    # One thread by default: at these widths an op takes microseconds, so intra-op threads only add
    # synchronisation, and on a busy 2-core machine two OpenMP threads slow decoding down several-fold.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, object] = {
        "grid": list(GRID),
        "batch": BATCH,
        "und_new_tokens": UND_NEW_TOKENS,
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    for name in args.presets:
        t0 = time.perf_counter()
        r = bench_preset(name)
        r["wall_s"] = time.perf_counter() - t0
        results[name] = r
        if not args.json:
            print_preset(name, r)
    main_preset = "shapes" if "shapes" in results else args.presets[-1]
    results["t2i_batch16_speedup"] = results[main_preset]["t2i_batch16_speedup"]  # type: ignore[index]
    results["und_cache_speedup"] = results[main_preset]["und_cache_speedup"]  # type: ignore[index]
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
