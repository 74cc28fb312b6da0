"""Padding waste of bucketed batching vs padding every sequence to a fixed maximum length.

The stage-4 mix of the 7B recipe (``stages/stage4.yaml``: und x4 up to 1504 tokens, t2i x4 up to 1632, edit
x2 up to 2624; the 19 aspect buckets around 512x512; the 16x VQ; ViT images up to 188,160 pixels) for
``--steps`` training steps, one sub-batch per task and step. Samples are synthetic in their content but
built by the real code path: photo-like image sizes (aspect ratios of common formats and in between) are
mapped to buckets by ``closest_bucket``, captions, questions, answers and instructions of realistic
length distributions (English and Chinese) are turned into sequences by ``wallaroo.sequences`` with the real
Qwen tokenizer (templates, CFG dropout, size indicators, end-of-line tokens, ViT blocks sized by the Qwen
``smart_resize``), keyed like ``datamodules.webdata.SampleBuilder`` does, and batched by
``datamodules.webdata.BucketBatcher``.

- ``pad_fraction``: padded / (padded + real) tokens over all sub-batches with bucketed batching (ours);
- ``baseline_pad_fraction``: the same samples, in arrival order, ``batch_size`` at a time, every sequence
  padded to the task's fixed ``max_length`` (the released code's way);
- ``arrival_pad_fraction``: the same arrival-order batches padded only to their longest sequence (dynamic
  padding without bucketing), for reference.

    python benchmarks/padding.py [--json] [--steps 500] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.webdata import BucketBatcher, Item, SampleBuilder, TaskSpec  # noqa: E402
from wallaroo.config import get_preset  # noqa: E402
from wallaroo.images import VitImageProcessor  # noqa: E402
from wallaroo.sequences import (  # noqa: E402
    BUCKET_SETS,
    EDIT_TEMPLATES,
    GENERATE_TEMPLATES,
    build_edit,
    build_t2i,
    build_und,
    closest_bucket,
)
from wallaroo.tokens import tokenizer_for  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """One task of the stage-4 recipe."""

    batch_size: int
    max_length: int


RECIPE = {"und": Recipe(4, 1504), "t2i": Recipe(4, 1632), "edit": Recipe(2, 2624)}
BUCKETS = "aspect512"
DOWNSAMPLE = 16
VIT_MAX_PIXELS = 188_160
CFG_DROP = 0.1
# Photo formats (w/h) and how often they occur; a quarter of the images get an arbitrary aspect in between.
FORMATS = [(1.0, 0.3), (4 / 3, 0.2), (3 / 4, 0.12), (3 / 2, 0.12), (2 / 3, 0.08), (16 / 9, 0.12), (9 / 16, 0.06)]
WORDS = (
    "a the of and with in on at under over near behind front small large red blue green yellow white black "
    "old new bright dark wooden metal glass stone soft sharp tall short round square cat dog bird horse car "
    "bicycle street house window door table chair cup bowl plate flower tree river mountain sky cloud sun "
    "light shadow person woman man child hat coat dress book lamp wall floor field road bridge city village "
    "boat sea beach sand snow rain evening morning night photo painting close-up view standing sitting "
    "walking holding looking two three several many colorful detailed realistic style background foreground"
).split()
HANZI = (
    "一个在的和有上下前后小大红蓝绿黄白黑旧新明暗木金属玻璃石软尖高矮圆方猫狗鸟马车自行街房窗门桌椅杯碗盘"
    "花树河山天云日光影人女男孩帽衣书灯墙地田路桥城村船海沙雪雨晚早夜照画近看站坐走拿两三几多彩细真风格背景"
)


def image_size(rng: random.Random) -> tuple[int, int]:
    """A photo-like ``(w, h)``: a common format (or anything between 1:2.2 and 2.2:1), long side 400-1600."""
    if rng.random() < 0.25:
        aspect = math.exp(rng.uniform(math.log(1 / 2.2), math.log(2.2)))
    else:
        aspect = rng.choices([a for a, _ in FORMATS], weights=[w for _, w in FORMATS])[0]
    long_side = rng.randint(400, 1600)
    w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
    return max(16, round(w)), max(16, round(h))


def text(rng: random.Random, lang: str, lo: int, hi: int, median: float) -> str:
    """Words (English) or characters (Chinese), a log-normal count around ``median`` clipped to [lo, hi]."""
    n = int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), 0.6)))))
    if lang == "zh":
        return "".join(rng.choice(HANZI) for _ in range(int(n * 1.5)))
    return " ".join(rng.choice(WORDS) for _ in range(n))


class SampleSource:
    """Endless built samples of one task (as ``Item``s keyed like the data pipeline's)."""

    def __init__(self, task: str, tok: Any, ids: Any, vit: VitImageProcessor, seed: int) -> None:
        recipe = RECIPE[task]
        self.task = task
        self.tok, self.ids, self.vit = tok, ids, vit
        self.rng = random.Random(f"{seed}-{task}")
        self.buckets = BUCKET_SETS[BUCKETS]
        spec = TaskSpec(task=task, urls=("synthetic",), bucket_set=BUCKETS, downsample=DOWNSAMPLE,
                        batch_size=recipe.batch_size, max_length=recipe.max_length)  # fmt: skip
        self.builder = SampleBuilder(spec, tok, ids)
        self.too_long = 0

    def __iter__(self) -> Any:
        while True:
            item = self.next_item()
            if item is not None:
                yield item

    def next_item(self) -> Item | None:
        rng, tok, ids = self.rng, self.tok, self.ids
        lang = "en" if rng.random() < 0.6 else "zh"
        w, h = image_size(rng)
        bucket = closest_bucket(w, h, self.buckets)
        drop = rng.random() < CFG_DROP
        if self.task == "t2i":
            caption = text(rng, lang, 3, 200, 45)
            template = rng.randrange(len(GENERATE_TEMPLATES[lang]))
            sample = build_t2i(tok, ids, caption, bucket, None, lang=lang, template_index=template, layout="aspect",
                               ds=DOWNSAMPLE, drop_prompt=drop)  # fmt: skip
            key: tuple[Any, ...] = ("t2i", bucket, False)
        elif self.task == "edit":
            instruction = text(rng, lang, 2, 40, 9)
            template = rng.randrange(len(EDIT_TEMPLATES[lang]))
            sample = build_edit(tok, ids, instruction, bucket, None, self.vit.num_tokens(w, h), lang=lang,
                                template_index=template, ds=DOWNSAMPLE, drop_prompt=drop)  # fmt: skip
            key = ("edit", bucket)
        else:
            turns = []
            for i in range(rng.choice([1, 1, 1, 2, 3])):
                question = text(rng, lang, 3, 40, 10)
                short = rng.random() < 0.3
                answer = text(rng, lang, 1, 4, 1.5) if short else text(rng, lang, 5, 200, 40)
                turns += [{"role": "user", "content": ("<image>\n" if i == 0 else "") + question},
                          {"role": "assistant", "content": answer}]  # fmt: skip
            sample = build_und(tok, ids, turns, [self.vit.num_tokens(w, h)])
            key = ("und", bucket)
        try:
            # The data pipeline's own keying (length bin) and length limit.
            return self.builder._seq_item(sample, key)
        except Exception:  # noqa: BLE001 - SampleError: longer than max_length, skipped as in training
            self.too_long += 1
            return None


def pad_stats(groups: list[list[int]], pad_to: int | None) -> tuple[int, int]:
    """``(real, padded)`` tokens of batches of lengths, padded to ``pad_to`` or to each batch's longest."""
    real = sum(sum(g) for g in groups)
    total = sum(len(g) * (pad_to if pad_to is not None else max(g)) for g in groups)
    return real, total - real


def run(steps: int, seed: int) -> dict[str, Any]:
    cfg = get_preset("qwen2.5-vl-7b")
    tok, ids = tokenizer_for(cfg)
    vit = VitImageProcessor.for_config(cfg, max_pixels=VIT_MAX_PIXELS)
    per_task: dict[str, dict[str, Any]] = {}
    totals = {"ours": [0, 0], "baseline": [0, 0], "arrival": [0, 0]}
    for task, recipe in RECIPE.items():
        source = SampleSource(task, tok, ids, vit, seed)
        batcher = BucketBatcher(recipe.batch_size, None)
        ours: list[list[int]] = []
        arrived: list[int] = []
        items = iter(source)
        while len(ours) < steps:
            item = next(items)
            arrived.append(item.length)
            ours += [[it.length for it in batch] for batch in batcher.add(item)]
        ours = ours[:steps]
        n = sum(len(b) for b in ours)
        # The baseline sees as many samples as our batches hold, in arrival order.
        arrival = [arrived[i : i + recipe.batch_size] for i in range(0, n, recipe.batch_size)]
        stats = {
            "ours": pad_stats(ours, None),
            "baseline": pad_stats(arrival, recipe.max_length),
            "arrival": pad_stats(arrival, None),
        }
        for name, (real, pad) in stats.items():
            totals[name][0] += real
            totals[name][1] += pad
        per_task[task] = {
            **{f"{name}_pad_fraction": pad / (real + pad) for name, (real, pad) in stats.items()},
            "batches": len(ours),
            "samples": n,
            "mean_length": n and sum(map(sum, ours)) / n,
            "waiting_in_buffers": sum(len(b) for b in batcher.buffers.values()),
            "skipped_too_long": source.too_long,
        }
    frac = {name: pad / (real + pad) for name, (real, pad) in totals.items()}
    return {
        "pad_fraction": frac["ours"],
        "baseline_pad_fraction": frac["baseline"],
        "arrival_pad_fraction": frac["arrival"],
        "padded_tokens_ratio": totals["ours"][1] / totals["baseline"][1],
        "steps": steps,
        "tasks": per_task,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--steps", type=int, default=500, help="training steps (one sub-batch per task each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.steps, args.seed)
    result["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result))
        return result
    print(f"stage-4 mix, {args.steps} steps ({BUCKETS} buckets), padded share of all tokens")
    print(f"{'task':6} {'ours':>7} {'fixed max':>9} {'arrival':>8} {'mean len':>9} {'batches':>8}")
    for task, r in result["tasks"].items():
        print(f"{task:6} {r['ours_pad_fraction']:7.2%} {r['baseline_pad_fraction']:9.2%} "
              f"{r['arrival_pad_fraction']:8.2%} {r['mean_length']:9.0f} {r['batches']:8d}")  # fmt: skip
    print(f"{'all':6} {result['pad_fraction']:7.2%} {result['baseline_pad_fraction']:9.2%} "
          f"{result['arrival_pad_fraction']:8.2%}")  # fmt: skip
    print(f"padded tokens, ours / fixed-max baseline: {result['padded_tokens_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
