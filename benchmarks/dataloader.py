"""Data-loading throughput per DataLoader worker: 512-px JPEG shards -> decode, bucket, build, batch.

Shards are made in a temporary directory from scikit-image's photos, centre-cropped to seven aspect ratios
around 512x512 (1:1, 4:3, 3:4, 3:2, 2:3, 16:9, 9:16 at about 512^2 pixels) and stored as JPEG (quality 90):
``t2i`` (image + English or Chinese caption), ``und`` (image + a two-turn conversation), ``edit`` (source +
mirrored target + instruction). Each task is read by the real ``WallarooDataModule`` configured for the 7B
stage-4 recipe (``qwen2.5-vl-7b`` preset ids and 19 aspect buckets, the real Qwen tokenizer from
``wallaroo.tokens.load_qwen_tokenizer``, ViT pixels up to 188,160, batch sizes 4 / 4 / 2), with one worker
per task: samples/s is what one worker delivers (decode, validation, bucketing, resize + crop, ViT
preprocessing, sequence building, collation, transfer to the main process), measured after a warm-up. The
same work in the main process (``num_workers=0``) is measured too: the difference is the cost of moving
the batches between processes (float32 images, four times their uint8 size).

Ratios in the same run: ``pipeline_over_decode`` (samples/s of the whole pipeline over samples/s of only
decoding the same JPEGs with PIL: the cost of everything after decoding), and ``workers_per_gpu``: workers
needed to feed one GPU with the stage-4 mix, from the measured per-sample costs and the tokens/s a 7B
training step reaches at ``--gpu-tflops`` achieved bf16 TFLOP/s (6 x 7.7B trainable parameters per token;
an assumption, stated in the output).

    python benchmarks/dataloader.py [--json] [--batches 30] [--samples 48]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ASPECTS = [1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16]  # w / h
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "cat", "retina"]
RECIPE = {"t2i": (4, 1632), "und": (4, 1504), "edit": (2, 2624)}  # batch size, max_length (stage4.yaml)
MIX = {"und": 4, "t2i": 4, "edit": 2}  # samples per training step
VIT_MAX_PIXELS = 188_160
TRAINABLE_7B = 7_797_396_992  # stage 4 (DESIGN.md)
CAPTIONS = {
    "en": "a photograph of {} in natural light, sharp focus, high detail, realistic colours",
    "zh": "一张{}的照片，自然光，清晰对焦，细节丰富，色彩真实",
}


def photos() -> list[np.ndarray]:
    from skimage import data

    out = []
    for name in PHOTOS:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3]))
    return out


def crop_to(img: np.ndarray, aspect: float, area: int = 512 * 512) -> Image.Image:
    """Centre crop to ``aspect`` (w/h), then resize to about ``area`` pixels (sides multiples of 16)."""
    h, w = img.shape[:2]
    if w / h > aspect:
        cw, ch = int(h * aspect), h
    else:
        cw, ch = w, int(w / aspect)
    x, y = (w - cw) // 2, (h - ch) // 2
    pil = Image.fromarray(img[y : y + ch, x : x + cw])
    tw = max(16, round((area * aspect) ** 0.5 / 16) * 16)
    th = max(16, round((area / aspect) ** 0.5 / 16) * 16)
    return pil.resize((tw, th), Image.BICUBIC)


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, samples: int, per_shard: int = 16) -> dict[str, list[bytes]]:
    """``root/{task}/shard-*.tar``; returns the JPEG bytes of every sample (for the decode-only baseline)."""
    import webdataset as wds

    base = photos()
    images: dict[str, list[bytes]] = {"t2i": [], "und": [], "edit": []}
    for task in images:
        (root / task).mkdir(parents=True, exist_ok=True)
        writer = None
        for i in range(samples):
            if i % per_shard == 0:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(str(root / task / f"shard-{i // per_shard:06d}.tar"))
            img = crop_to(base[i % len(base)], ASPECTS[(i // len(base)) % len(ASPECTS)])
            lang = "en" if i % 3 else "zh"
            subject = PHOTOS[i % len(base)].replace("_", " ")
            rec: dict[str, Any] = {"__key__": f"{task}{i:06d}"}
            if task == "t2i":
                rec["jpg"] = jpeg(img)
                rec["json"] = json.dumps({f"caption_{lang}": CAPTIONS[lang].format(subject)}, ensure_ascii=False)
                images[task].append(rec["jpg"])
            elif task == "und":
                rec["0.jpg"] = jpeg(img)
                rec["json"] = json.dumps({"conversations": [
                    {"role": "user", "content": "<image>\nWhat is shown in this picture?"},
                    {"role": "assistant", "content": f"It shows {subject}, photographed in natural light."},
                    {"role": "user", "content": "Describe the colours."},
                    {"role": "assistant", "content": "Mostly muted tones with a few saturated highlights."},
                ]})  # fmt: skip
                images[task].append(rec["0.jpg"])
            else:
                rec["src.jpg"] = jpeg(img)
                rec["tgt.jpg"] = jpeg(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
                instruction = "Mirror the image." if lang == "en" else "把图片左右翻转。"
                rec["json"] = json.dumps({f"instruction_{lang}": instruction}, ensure_ascii=False)
                images[task] += [rec["src.jpg"], rec["tgt.jpg"]]
            writer.write(rec)
        if writer is not None:
            writer.close()
    return images


def decode_rate(blobs: list[bytes], per_sample: int, seconds: float = 2.0) -> float:
    """Samples/s of decoding only (``per_sample`` JPEGs per sample), one thread."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in blobs:
            with Image.open(io.BytesIO(b)) as im:
                im.convert("RGB")
            n += 1
    return n / per_sample / (time.perf_counter() - t0)


def loader_rate(
    task: str, shards: Path, cfg: Any, tokenizer: Any, batches: int, warmup: int, num_workers: int = 1
) -> dict[str, float]:
    """Samples/s one worker delivers for ``task`` (after ``warmup`` batches); ``num_workers=0``: the same work
    in the main process (no inter-process transfer)."""
    from datamodules import WallarooDataModule

    batch_size, max_length = RECIPE[task]
    dm = WallarooDataModule(
        **{
            task: {
                "shards": str(shards / task),
                "batch_size": batch_size,
                "max_length": max_length,
                "epoch_samples": batch_size * (batches + warmup) * 4,
            }
        },  # fmt: skip
        num_workers=num_workers,
        seed=0,
    )
    dm.configure(cfg, [task], tokenizer=tokenizer, rank=0, world_size=1)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        batch, _, _ = next(it)
        n += batch[task]["input_ids"].shape[0]
    dt = time.perf_counter() - t0
    return {"samples_per_s": n / dt, "samples": n, "seconds": dt}


def run(batches: int, samples: int, gpu_tflops: float) -> dict[str, Any]:
    from wallaroo.config import get_preset
    from wallaroo.tokens import TokenIds, load_qwen_tokenizer

    torch.set_num_threads(1)
    cfg = get_preset("qwen2.5-vl-7b", buckets="aspect512", t2i_layout="aspect", vit_max_pixels=VIT_MAX_PIXELS)
    tok = load_qwen_tokenizer(indicator_sizes=cfg.indicator_sizes)
    tokenizer = (tok, TokenIds.from_tokenizer(tok, cfg.indicator_sizes))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        blobs = write_shards(root, samples)
        write_s = time.perf_counter() - t0
        tasks: dict[str, dict[str, float]] = {}
        for task in RECIPE:
            r = loader_rate(task, root, cfg, tokenizer, batches, warmup=3)
            r["decode_only_samples_per_s"] = decode_rate(blobs[task], 2 if task == "edit" else 1)
            r["pipeline_over_decode"] = r["samples_per_s"] / r["decode_only_samples_per_s"]
            inline = loader_rate(task, root, cfg, tokenizer, batches, warmup=3, num_workers=0)
            r["in_process_samples_per_s"] = inline["samples_per_s"]
            tasks[task] = r
    # One worker per task; a training step of the mix costs sum(samples / rate) worker-seconds.
    worker_s_per_step = sum(MIX[t] / tasks[t]["samples_per_s"] for t in MIX)
    step_tokens = 4 * 330 + 4 * 1126 + 2 * 2334  # mean lengths of the mix (benchmarks/padding.py)
    gpu_steps_per_s = gpu_tflops * 1e12 / (6 * TRAINABLE_7B * step_tokens)
    mix_rate = sum(MIX.values()) / worker_s_per_step
    decode_mix = sum(MIX.values()) / sum(MIX[t] / tasks[t]["decode_only_samples_per_s"] for t in MIX)
    return {
        "samples_per_s_per_worker": mix_rate,
        "decode_only_samples_per_s": decode_mix,
        "pipeline_over_decode": mix_rate / decode_mix,
        "workers_per_gpu": worker_s_per_step * gpu_steps_per_s,
        "gpu_samples_per_s_assumed": gpu_steps_per_s * sum(MIX.values()),
        "gpu_tflops_assumed": gpu_tflops,
        "tasks": tasks,
        "shard_samples_per_task": samples,
        "write_seconds": write_s,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batches", type=int, default=30, help="timed batches per task (after 3 warm-up batches)")
    p.add_argument("--samples", type=int, default=48, help="samples per task in the shards (read resampled)")
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s of one GPU (assumed)")
    args = p.parse_args(argv)
    result = run(args.batches, args.samples, args.gpu_tflops)
    if args.json:
        print(json.dumps(result))
        return result
    print("one DataLoader worker per task, 512-px JPEG shards, 7B stage-4 recipe (aspect512, Qwen tokenizer)")
    print(f"{'task':6} {'samples/s':>10} {'decode-only':>12} {'pipeline/decode':>16} {'in-process':>11}")
    for task, r in result["tasks"].items():
        print(f"{task:6} {r['samples_per_s']:10.1f} {r['decode_only_samples_per_s']:12.1f} "
              f"{r['pipeline_over_decode']:16.3f} {r['in_process_samples_per_s']:11.1f}")  # fmt: skip
    print(f"{'mix':6} {result['samples_per_s_per_worker']:10.1f} {result['decode_only_samples_per_s']:12.1f} "
          f"{result['pipeline_over_decode']:16.3f}   (und 4 : t2i 4 : edit 2)")  # fmt: skip
    print(f"workers per GPU: {result['workers_per_gpu']:.2f} (assuming {args.gpu_tflops:.0f} achieved TFLOP/s on "
          f"7B = {result['gpu_samples_per_s_assumed']:.1f} samples/s per GPU)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
