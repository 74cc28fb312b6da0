"""``python -m wallaroo.generate``: text-to-image, editing and understanding from any checkpoint.

    python -m wallaroo.generate t2i --ckpt CKPT --prompt "a red circle at the top left" --size 72x48 \\
        --num-images 4 --cfg 3 --top-k 1000 --seed 0 --out samples/
    python -m wallaroo.generate edit --ckpt CKPT --image in.png --instruction "Remove the circle." --out out/
    python -m wallaroo.generate understand --ckpt CKPT --image in.png --question "Describe the image." [--json]

``CKPT`` is a Lightning checkpoint of any stage, a weights directory (``wallaroo.convert``), a consolidated
``.safetensors`` file or an official Wallaroo checkpoint (with ``--qwen``). Sizes are width x height and
must be one of the model's buckets. Every run writes its PNGs and a ``settings.json`` recording every
setting, so any image can be reproduced. Mistakes (a missing file, a size outside the buckets) end in one
line and exit status 2; ``--debug`` shows the traceback (``wallaroo.cli_errors``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wallaroo.cli_errors import UsageError, require_path, run_cli
from wallaroo.pipeline import PipelineConfig, WallarooPipeline
from wallaroo.sampling import SamplingConfig
from wallaroo.sequences import Bucket

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(
    ckpt: str,
    device: str = "cpu",
    dtype: str = "float32",
    qwen: str | None = None,
    vq: str | None = None,
    layout: str | None = None,
) -> WallarooPipeline:
    """A ``WallarooPipeline`` over any loadable weights; fails clearly when no VQ tokenizer is known."""
    from wallaroo.weights import build_from_weights

    require_path(ckpt, "--ckpt")
    for path, option in ((qwen, "--qwen"), (vq, "--vq")):
        if path is not None:
            require_path(path, option)
    model, vq_model, tok, ids = build_from_weights(
        ckpt, device=device, dtype=DTYPES[dtype], qwen_dir=qwen, vq_path=vq
    )
    if vq_model is None:
        raise SystemExit(f"{ckpt} carries no VQ tokenizer weights: pass --vq (e.g. LlamaGen's vq_ds16_t2i.pt)")
    return WallarooPipeline(model.eval(), vq_model, tok, ids, PipelineConfig(layout=layout))


def checked_bucket(pipe: WallarooPipeline, size: str) -> Bucket:
    """``pipe.bucket(size)``, a ``UsageError`` (listing the model's sizes) for a size it does not have."""
    try:
        return pipe.bucket(size)
    except ValueError as e:
        raise UsageError(f"--size {size}: {e}") from e


def sampling_from_args(args: argparse.Namespace, greedy_default: bool = False) -> SamplingConfig:
    temperature = args.temperature if args.temperature is not None else (0.0 if greedy_default else 1.0)
    return SamplingConfig(
        cfg_scale=args.cfg,
        top_k=args.top_k or None,
        top_p=args.top_p,
        temperature=temperature,
        seed=args.seed,
        static_cache=args.static_cache,
        compile=args.compile,
    )


def save_images(images: list[np.ndarray], out: Path, stem: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out / f"{stem}_{i:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def write_settings(out: Path, args: argparse.Namespace, sampling: SamplingConfig, extra: dict[str, Any]) -> None:
    record = {k: v for k, v in vars(args).items() if k != "func"}
    record["sampling"] = sampling.__dict__
    record.update(extra)
    (out / "settings.json").write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")


def cmd_t2i(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.prompts_file):
        raise SystemExit("give exactly one of --prompt or --prompts-file")
    prompts = [args.prompt] if args.prompt else read_prompts(args.prompts_file)
    pipe = load_pipeline(args.ckpt, args.device, args.dtype, args.qwen, args.vq, args.layout)
    bucket = checked_bucket(pipe, args.size)
    sampling = sampling_from_args(args)
    images = pipe.text_to_image(prompts, bucket, sampling, args.num_images, args.batch_size)
    out = Path(args.out)
    paths = save_images(images, out, "t2i")
    items = [
        {"prompt": prompts[i // args.num_images], "image": p, "index": i % args.num_images}
        for i, p in enumerate(paths)
    ]
    write_settings(out, args, sampling, {"size": str(bucket), "items": items})
    print(f"wrote {len(paths)} images to {out}")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    require_path(args.image, "--image", "file")
    pipe = load_pipeline(args.ckpt, args.device, args.dtype, args.qwen, args.vq, args.layout)
    source = read_image(args.image)
    sampling = sampling_from_args(args)
    images = pipe.edit([source] * args.num_images, [args.instruction] * args.num_images, sampling)
    out = Path(args.out)
    paths = save_images(images, out, "edit")
    write_settings(out, args, sampling, {"items": [{"image": p} for p in paths]})
    print(f"wrote {len(paths)} edited images to {out}")
    return 0


def cmd_understand(args: argparse.Namespace) -> int:
    require_path(args.image, "--image", "file")
    pipe = load_pipeline(args.ckpt, args.device, args.dtype, args.qwen, args.vq)
    sampling = sampling_from_args(args, greedy_default=True)
    answer = pipe.understand([read_image(args.image)], [args.question], sampling, args.max_new_tokens)[0]
    if args.json:
        print(json.dumps({"question": args.question, "answer": answer, "image": args.image}, ensure_ascii=False))
    else:
        print(answer)
    return 0


def read_prompts(path: str) -> list[str]:
    require_path(path, "--prompts-file", "file")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise SystemExit(f"{path} holds no prompts (one per line)")
    return prompts


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read image {path}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wallaroo.generate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, cfg: float) -> None:
        p.add_argument("--ckpt", required=True, help="checkpoint, weights directory or .safetensors file")
        p.add_argument("--qwen", help="Qwen2.5-VL directory (official checkpoints only)")
        p.add_argument("--vq", help="VQ weights when the checkpoint has none (LlamaGen vq_ds16_t2i.pt)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        p.add_argument("--cfg", type=float, default=cfg, help="classifier-free guidance scale")
        p.add_argument("--top-k", type=int, default=1000, help="0 disables")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--static-cache", action="store_true", help="pre-allocated KV cache (GPU)")
        p.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")

    t2i = sub.add_parser("t2i", help="text-to-image")
    common(t2i, 3.0)
    t2i.add_argument("--prompt")
    t2i.add_argument("--prompts-file", help="one prompt per line")
    t2i.add_argument("--size", required=True, help="WxH, one of the model's sizes")
    t2i.add_argument("--num-images", type=int, default=1)
    t2i.add_argument("--batch-size", type=int, default=16)
    t2i.add_argument("--layout", choices=["square", "aspect"], help="override the checkpoint's t2i layout")
    t2i.add_argument("--out", required=True)
    t2i.set_defaults(func=cmd_t2i)

    edit = sub.add_parser("edit", help="instruction image editing")
    common(edit, 3.0)
    edit.add_argument("--image", required=True)
    edit.add_argument("--instruction", required=True)
    edit.add_argument("--num-images", type=int, default=1)
    edit.add_argument("--layout", choices=["square", "aspect"], help=argparse.SUPPRESS)
    edit.add_argument("--out", required=True)
    edit.set_defaults(func=cmd_edit)

    und = sub.add_parser("understand", help="answer a question about an image")
    common(und, 1.0)
    und.add_argument("--image", required=True)
    und.add_argument("--question", required=True)
    und.add_argument("--max-new-tokens", type=int, default=128)
    und.add_argument("--json", action="store_true", help="print one JSON object")
    und.set_defaults(func=cmd_understand)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def cli(argv: list[str] | None = None) -> int:
    """The command line: ``main`` with one-line errors (``wallaroo.cli_errors``); returns the exit status."""
    return run_cli(main, argv, prog="python -m wallaroo.generate")


if __name__ == "__main__":
    sys.exit(cli())
