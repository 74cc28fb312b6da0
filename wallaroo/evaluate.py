"""``python -m wallaroo.evaluate``: ShapesEval, standard benchmark outputs, and image fidelity.

    python -m wallaroo.evaluate shapes --ckpt CKPT --out DIR [--samples 240 --seed 1234 --cfg 1]
    python -m wallaroo.evaluate geneval --ckpt CKPT --prompts evaluation_metadata.jsonl --out DIR
    python -m wallaroo.evaluate dpg --ckpt CKPT --prompts dpg_bench.csv --out DIR
    python -m wallaroo.evaluate imgedit --ckpt CKPT --edits basic_edit.json --images ROOT --out DIR
    python -m wallaroo.evaluate fid --generated DIR --reference DIR [--inception PATH] [--clip PATH]

``shapes`` generates, answers and edits on a fresh ShapesWorld evaluation set (its seed differs from the
training data's), prints a table, and writes ``metrics.json`` (``t2i_accuracy``, ``und_accuracy``,
``edit_accuracy``, ``tokenizer_ceiling`` and the breakdowns), ``grid.png`` and ``failures.json``. The
benchmark sub-commands write the layouts the official scorers read, with the paper's settings as
defaults, and skip finished items when re-run. Mistakes (a missing file, a size outside the buckets) end in
one line and exit status 2; ``--debug`` shows the traceback (``wallaroo.cli_errors``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from wallaroo.cli_errors import require_path, run_cli
from wallaroo.generate import DTYPES, checked_bucket, load_pipeline
from wallaroo.pipeline import WallarooPipeline
from wallaroo.sampling import SamplingConfig

CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
)


# ------------------------------------------------------------------------------------------ shapes

# ShapesEval's default sampling (the demo, and the CLI's defaults): greedy (top-k 1) without guidance (CFG 1).
# In ShapesWorld v2 a prompt fixes every code of a 48x48 scene (and all but a one-step offset on 72x48 / 48x72:
# after a white code where the object could start, it must start at the next), so sampling at temperature 1
# only adds wrong codes, and guidance has nothing to sharpen: measured on one stage-3 checkpoint (200 prompts,
# seed 1234), text-to-image 0.255 at CFG 1, 0.24 at CFG 2, 0.075 at CFG 3 (the paper's default), which drew
# extra objects and half objects. (v1 sampled with top-k 50: its jitter spread each object's first code over 25
# places, where white was always the single likeliest code and greedy drew blank canvases.)
SHAPES_SAMPLING = {"cfg_scale": 1.0, "top_k": 1, "top_p": 1.0, "temperature": 1.0}


def evaluate_shapes(
    pipe: WallarooPipeline,
    out: Path,
    samples: int = 240,
    seed: int = 1234,
    sampling: SamplingConfig | None = None,
    tasks: list[str] | None = None,
    batch_size: int = 48,
    log: Any = print,
) -> dict[str, Any]:
    """ShapesEval of one model: t2i, und, edit (where the model has the task) and the tokenizer ceiling.

    Only the sizes the model generates (its buckets) are asked for; the report says which."""
    from datamodules.shapes_world import edit_samples, t2i_samples, und_samples
    from metrics.shapes_eval import EditAccuracy, T2IAccuracy, UndAccuracy, tokenizer_ceiling

    sampling = sampling or SamplingConfig(**SHAPES_SAMPLING, seed=seed)
    tasks = tasks or default_tasks(pipe)
    sizes = [(b.w, b.h) for b in pipe.buckets.values()]
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "seed": seed,
        "samples_per_task": samples,
        "sizes": [f"{w}x{h}" for w, h in sizes],
        "sampling": {k: v for k, v in sampling.__dict__.items() if k not in ("static_cache", "compile")},
        "tasks": tasks,
    }
    failures: dict[str, Any] = {}
    shown: dict[str, list[dict[str, Any]]] = {"t2i": [], "edit": []}

    def wanted(stream: Any, n: int) -> list[dict[str, Any]]:
        # Every size of the model gets an equal share; other sizes are left out.
        picked = []
        for s in stream(10 * n, seed):
            if s["size"] in sizes:
                picked.append(s)
            if len(picked) == n:
                break
        return picked

    t0 = time.perf_counter()
    ceiling_metric = T2IAccuracy()

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        codes, _ = pipe.vq.encode(x.to(pipe.device))
        return pipe.vq.decode_codes(codes)

    if "t2i" in tasks or "edit" in tasks:  # an understanding-only model's tokenizer is not its concern
        with torch.no_grad():
            report["tokenizer_ceiling"] = tokenizer_ceiling(
                roundtrip, samples, seed, batch_size=batch_size, metric=ceiling_metric
            )
        log(f"  tokenizer ceiling {report['tokenizer_ceiling']:.3f}")

    if "t2i" in tasks:
        items = wanted(t2i_samples, samples)
        metric = T2IAccuracy()
        for size in sizes:
            group = [s for s in items if s["size"] == size]
            if not group:
                continue
            images = pipe.text_to_image(
                [s["caption"] for s in group], f"{size[0]}x{size[1]}", sampling, batch_size=batch_size
            )
            metric.update(images, [s["scene"] for s in group], [size] * len(group), [s["lang"] for s in group],
                          keys=[s["key"] for s in group])  # fmt: skip
            shown["t2i"] += [dict(s, output=img) for s, img in zip(group[:4], images[:4], strict=False)]
        report["t2i"] = _floats(metric.compute())
        report["t2i_accuracy"] = report["t2i"]["accuracy"]
        failures["t2i"] = metric.failures[:200]
        log(f"  t2i accuracy {report['t2i_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)")

    if "und" in tasks:
        items = wanted(und_samples, samples)
        preds = pipe.understand([s["image"] for s in items], [s["question"] for s in items],
                                batch_size=batch_size)  # fmt: skip
        metric = UndAccuracy()
        metric.update(preds, [s["answer"] for s in items], [s["qtype"] for s in items],
                      [s["lang"] for s in items], [s["scene"] for s in items])  # fmt: skip
        report["und"] = _floats(metric.compute())
        report["und_accuracy"] = report["und"]["accuracy"]
        failures["und"] = [dict(f, question=items[f["index"]]["question"]) for f in metric.failures[:200]]
        log(f"  und accuracy {report['und_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)")

    if "edit" in tasks:
        items = wanted(edit_samples, samples)
        outputs = pipe.edit([s["src"] for s in items], [s["instruction"] for s in items], sampling,
                            batch_size=batch_size)  # fmt: skip
        metric = EditAccuracy()
        metric.update(outputs, [s["target_scene"] for s in items], [s["size"] for s in items],
                      [s["op"] for s in items], [s["lang"] for s in items])  # fmt: skip
        report["edit"] = _floats(metric.compute())
        report["edit_accuracy"] = report["edit"]["accuracy"]
        failures["edit"] = metric.failures[:200]
        shown["edit"] = [dict(s, output=img) for s, img in zip(items[:6], outputs[:6], strict=False)]
        log(f"  edit accuracy {report['edit_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)")

    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "failures.json").write_text(json.dumps(failures, indent=1, ensure_ascii=False, default=str))
    sample_grid(shown).save(out / "grid.png")
    return report


def default_tasks(pipe: WallarooPipeline) -> list[str]:
    return ["t2i", "und"] + (["edit"] if pipe.model.has_edit else [])


def _floats(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


def _font(size: int) -> ImageFont.ImageFont:
    for path in CJK_FONTS:
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def _has_cjk_font() -> bool:
    return any(Path(p).exists() for p in CJK_FONTS)


def _label(sample: dict[str, Any], key: str) -> str:
    from datamodules.shapes_world import caption

    text = sample[key]
    if sample["lang"] == "zh" and not _has_cjk_font():
        # Without a CJK font the Chinese text would draw as boxes: show the scene in English instead.
        scene = sample["scene"] if key == "caption" else sample["target_scene"]
        return "[zh] " + caption(scene, "en")
    return text


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for ch in text.replace(" ", " \0").split("\0"):
        if len(line) + len(ch) > width and line:
            lines.append(line.rstrip())
            line = ""
        line += ch
    return lines + [line.rstrip()] if line else lines


def sample_grid(shown: dict[str, list[dict[str, Any]]], scale: int = 2) -> Image.Image:
    """One row of generated images (prompt under each; EN and ZH; every size) and one row of edits as
    before/after pairs (instruction under each)."""
    font = _font(11)
    cell_w, text_h = 96 * scale * 2 + 8, 64
    tiles: list[Image.Image] = []
    for s in shown.get("t2i", []):
        tiles.append(_tile([s["output"]], _label(s, "caption"), scale, cell_w, text_h, font))
    for s in shown.get("edit", []):
        tiles.append(_tile([s["src"], s["output"]], _label(s, "instruction"), scale, cell_w, text_h, font))
    if not tiles:
        return Image.new("RGB", (cell_w, text_h), "white")
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    h = max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * cell_w, rows * h), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * cell_w, (i // cols) * h))
    return grid


def _tile(images: list[np.ndarray], text: str, scale: int, width: int, text_h: int, font: Any) -> Image.Image:
    pics = [Image.fromarray(i).resize((i.shape[1] * scale, i.shape[0] * scale), Image.NEAREST) for i in images]
    h = 96 * scale
    tile = Image.new("RGB", (width, h + text_h), "white")
    x = 4
    for p in pics:
        tile.paste(p, (x, 0))
        x += p.width + 4
    draw = ImageDraw.Draw(tile)
    for j, line in enumerate(_wrap(text, 40)[:4]):
        draw.text((4, h + 2 + 13 * j), line, fill="black", font=font)
    return tile


def print_shapes_table(report: dict[str, Any]) -> None:
    print(f"ShapesEval (seed {report['seed']}, {report['samples_per_task']} per task, sizes "
          f"{', '.join(report['sizes'])}, sampling {report['sampling']})")  # fmt: skip
    for key in ("tokenizer_ceiling", "t2i_accuracy", "und_accuracy", "edit_accuracy"):
        if key in report:
            print(f"  {key:<18} {report[key]:.3f}")
    for task in ("t2i", "und", "edit"):
        if task in report:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in report[task].items() if k != "accuracy" and v == v)
            print(f"  {task}: {parts}")


# ------------------------------------------------------------------------------------------ benchmarks
def _generate_fn(pipe: WallarooPipeline, size: str, sampling: SamplingConfig, batch_size: int) -> Any:
    def generate(prompts: list[str], n: int) -> list[Image.Image]:
        images = pipe.text_to_image(prompts, size, sampling, num_images=n, batch_size=batch_size)
        return [Image.fromarray(i) for i in images]

    return generate


def cmd_shapes(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.ckpt, args.device, args.dtype, args.qwen, args.vq)
    sampling = SamplingConfig(
        cfg_scale=args.cfg, top_k=args.top_k or None, top_p=args.top_p, temperature=args.temperature,
        seed=args.seed,
    )  # fmt: skip
    tasks = args.tasks.split(",") if args.tasks else None
    report = evaluate_shapes(pipe, Path(args.out), args.samples, args.seed, sampling, tasks, args.batch_size)
    print_shapes_table(report)
    return 0


def cmd_geneval(args: argparse.Namespace) -> int:
    from metrics.benchmarks import run_geneval

    require_path(args.prompts, "--prompts", "file")
    pipe = load_pipeline(args.ckpt, args.device, args.dtype, args.qwen, args.vq)
    checked_bucket(pipe, args.size)
    sampling = SamplingConfig(cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    counts = run_geneval(args.prompts, args.out, _generate_fn(pipe, args.size, sampling, args.batch_size),
                         n_images=args.num_images)  # fmt: skip
    print(json.dumps(counts, indent=1, default=str))
    return 0


def cmd_dpg(args: argparse.Namespace) -> int:
    from metrics.benchmarks import run_dpg_bench

    require_path(args.prompts, "--prompts")
    pipe = load_pipeline(args.ckpt, args.device, args.dtype, args.qwen, args.vq)
    sampling = SamplingConfig(cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    tile = checked_bucket(pipe, args.size).w
    counts = run_dpg_bench(args.prompts, args.out, _generate_fn(pipe, args.size, sampling, args.batch_size),
                           tile_size=tile)  # fmt: skip
    print(json.dumps(counts, indent=1, default=str))
    return 0


def cmd_imgedit(args: argparse.Namespace) -> int:
    from metrics.benchmarks import run_imgedit

    require_path(args.edits, "--edits", "file")
    require_path(args.images, "--images", "dir")
    pipe = load_pipeline(args.ckpt, args.device, args.dtype, args.qwen, args.vq)
    sampling = SamplingConfig(cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    def edit(images: list[Image.Image], instructions: list[str]) -> list[Image.Image]:
        return [Image.fromarray(i) for i in pipe.edit(images, instructions, sampling, args.batch_size)]

    counts = run_imgedit(args.edits, args.images, args.out, edit, batch_size=args.batch_size)
    print(json.dumps(counts, indent=1, default=str))
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from metrics.fidelity import build_feature_extractor, clip_score, compute_fidelity, load_image_folder

    require_path(args.generated, "--generated", "dir")
    require_path(args.reference, "--reference", "dir")
    try:
        features = build_feature_extractor("inception", args.inception)
        logits = build_feature_extractor("inception-logits", args.inception)
    except RuntimeError as e:
        raise SystemExit(str(e)) from e
    scores = compute_fidelity(
        load_image_folder(args.generated, size=args.resize), load_image_folder(args.reference, size=args.resize),
        features, kid_subset_size=args.kid_subset_size, is_feature_extractor=logits,
    )  # fmt: skip
    if args.clip:
        prompts = json.loads(Path(args.prompts).read_text(encoding="utf-8")) if args.prompts else None
        if not prompts:
            raise SystemExit("--clip needs --prompts FILE.json mapping image file names to their prompts")
        files = sorted(prompts)
        images = [torch.from_numpy(np.asarray(Image.open(Path(args.generated) / f).convert("RGB"))) for f in files]
        scores["clip_score"] = clip_score([i.permute(2, 0, 1) for i in images], [prompts[f] for f in files],
                                          args.clip)  # fmt: skip
    print(json.dumps(scores, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(scores, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wallaroo.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser, cfg: float, top_k: int | None, top_p: float) -> None:
        p.add_argument("--ckpt", required=True)
        p.add_argument("--qwen", help="Qwen2.5-VL directory (official checkpoints only)")
        p.add_argument("--vq", help="VQ weights when the checkpoint has none")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--cfg", type=float, default=cfg)
        p.add_argument("--top-k", type=int, default=top_k)
        p.add_argument("--top-p", type=float, default=top_p)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--out", required=True)

    shapes = sub.add_parser("shapes", help="ShapesEval on a fresh ShapesWorld evaluation set")
    model_args(shapes, SHAPES_SAMPLING["cfg_scale"], SHAPES_SAMPLING["top_k"], SHAPES_SAMPLING["top_p"])
    shapes.set_defaults(seed=1234, batch_size=48)
    shapes.add_argument("--samples", type=int, default=240, help="prompts per task")
    shapes.add_argument("--temperature", type=float, default=SHAPES_SAMPLING["temperature"])
    shapes.add_argument("--tasks", help="comma-separated subset of t2i,und,edit (default: what the model has)")
    shapes.set_defaults(func=cmd_shapes)

    geneval = sub.add_parser("geneval", help="GenEval output layout (CFG 3, top-k 1000, 4 images, 512x512)")
    model_args(geneval, 3.0, 1000, 1.0)
    geneval.add_argument("--prompts", required=True, help="evaluation_metadata.jsonl")
    geneval.add_argument("--size", default="512x512")
    geneval.add_argument("--num-images", type=int, default=4)
    geneval.set_defaults(func=cmd_geneval)

    dpg = sub.add_parser("dpg", help="DPG-Bench output layout (CFG 4, top-p 0.95, 2x2 grids)")
    model_args(dpg, 4.0, 1000, 0.95)
    dpg.add_argument("--prompts", required=True, help="dpg_bench.csv or a folder of <item_id>.txt")
    dpg.add_argument("--size", default="512x512")
    dpg.set_defaults(func=cmd_dpg)

    imgedit = sub.add_parser("imgedit", help="ImgEdit output layout (CFG 3, closest 512 bucket)")
    model_args(imgedit, 3.0, 1000, 1.0)
    imgedit.add_argument("--edits", required=True, help="ImgEdit basic-bench JSON")
    imgedit.add_argument("--images", required=True, help="root folder of the source images")
    imgedit.set_defaults(func=cmd_imgedit)

    fid = sub.add_parser("fid", help="FID / KID / IS of two image folders (and CLIP score)")
    fid.add_argument("--generated", required=True)
    fid.add_argument("--reference", required=True)
    fid.add_argument("--inception", help="torch-fidelity Inception weights file (never downloaded)")
    fid.add_argument("--clip", help="local CLIP model directory for CLIP score")
    fid.add_argument("--prompts", help="JSON {image file name: prompt} for CLIP score")
    fid.add_argument("--resize", type=int, default=None)
    fid.add_argument("--kid-subset-size", type=int, default=1000)
    fid.add_argument("--out", help="write the scores as JSON here too")
    fid.set_defaults(func=cmd_fid)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def cli(argv: list[str] | None = None) -> int:
    """The command line: ``main`` with one-line errors (``wallaroo.cli_errors``); returns the exit status."""
    return run_cli(main, argv, prog="python -m wallaroo.evaluate")


if __name__ == "__main__":
    sys.exit(cli())
