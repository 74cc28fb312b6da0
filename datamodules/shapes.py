"""Write ShapesWorld samples as webdataset shards in the project's shard schema.

Usage::

    python -m datamodules.shapes --out DIR --samples N --seed S [--shard-size 1000]
        [--tasks t2i und edit] [--workers W]

Layout: ``DIR/{task}/shard-000000.tar, ...`` (N samples per task) and ``DIR/manifest.json``.

Shard schema (shared by every dataset of the project; ShapesWorld adds the extras marked *):
- t2i:  ``png`` image; ``json`` = {"caption_en" | "caption_zh", *"lang", *"scene", *"size": [w, h], *"spec"}
  (``spec`` is the spec version, ``shapes-world-v2``: readers refuse records of another version)
- und:  ``0.png`` image (one ``<image>`` placeholder per image, in order); ``json`` =
  {"conversations": [{"role": "user", "content": "<image>\\n..."}, {"role": "assistant", ...}],
  *"lang", *"qtype", *"scene", *"size"}
- edit: ``src.png``, ``tgt.png``; ``json`` = {"instruction_en" | "instruction_zh", *"lang", *"op",
  *"scene", *"target_scene", *"size"}
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from datamodules.shapes_world import (
    EDIT_OPS,
    SAMPLE_GENERATORS,
    SIZES,
    SPEC_VERSION,
    check_edit_ops,
    scene_to_json,
)

TASKS: tuple[str, ...] = ("t2i", "und", "edit")


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image. compress_level=1: flat images compress well even at the
    fastest level, and encoding dominates the writer's time."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _json_bytes(obj: dict[str, Any]) -> bytes:
    # ensure_ascii=False keeps Chinese readable in the tar; the bytes pass TarWriter's encoder as is.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def to_record(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    """Convert a generator sample (see ``datamodules.shapes_world``) into a webdataset record."""
    lang = sample["lang"]
    w, h = sample["size"]
    extras = {"lang": lang, "scene": scene_to_json(sample["scene"]), "size": [w, h], "spec": SPEC_VERSION}
    if task == "t2i":
        meta = {f"caption_{lang}": sample["caption"], **extras}
        return {"__key__": sample["key"], "png": encode_png(sample["image"]), "json": _json_bytes(meta)}
    if task == "und":
        meta = {
            "conversations": [
                {"role": "user", "content": "<image>\n" + sample["question"]},
                {"role": "assistant", "content": sample["answer"]},
            ],
            "qtype": sample["qtype"],
            **extras,
        }
        return {"__key__": sample["key"], "0.png": encode_png(sample["image"]), "json": _json_bytes(meta)}
    if task == "edit":
        meta = {
            f"instruction_{lang}": sample["instruction"],
            "op": sample["op"],
            "target_scene": scene_to_json(sample["target_scene"]),
            **extras,
        }
        return {
            "__key__": sample["key"],
            "src.png": encode_png(sample["src"]),
            "tgt.png": encode_png(sample["tgt"]),
            "json": _json_bytes(meta),
        }
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _write_shard(path: str, task: str, seed: int, start: int, count: int, edit_ops: tuple[str, ...]) -> int:
    """Write samples ``start .. start+count-1`` of ``task`` to one tar; returns the number written.
    ``edit_ops``: the op cycle of editing samples (:func:`datamodules.shapes_world.edit_samples`).

    A top-level function so that a process pool can run it; samples depend only on ``(seed, index)``
    so shards are independent jobs.
    """
    n = 0
    # mtime fixed: the same arguments give byte-identical tars.
    with wds.TarWriter(path, mtime=0.0) as writer:
        # webdataset 1.0.2 computes its USTAR default format but never hands it to tarfile, which then
        # builds PAX headers: same bytes for our short ASCII names, but twice as slow to build.
        writer.tarstream.format = tarfile.USTAR_FORMAT
        extra = {"ops": edit_ops} if task == "edit" else {}
        for sample in SAMPLE_GENERATORS[task](count, seed, start, **extra):
            writer.write(to_record(task, sample))
            n += 1
    return n


def write_shapes_shards(
    out: str | Path,
    samples: int,
    seed: int,
    tasks: Sequence[str] = TASKS,
    shard_size: int = 1000,
    workers: int | None = None,
    edit_ops: Sequence[str] = EDIT_OPS,
) -> dict[str, Any]:
    """Write ``samples`` samples of each task in ``tasks`` under ``out`` and return the manifest.

    Deterministic: the same ``(samples, seed, shard_size)`` gives byte-identical tars whatever
    ``workers`` is. Shards are written in parallel by ``workers`` processes (default: one per CPU, at
    most one per shard; 1 writes in this process). Existing ``shard-*.tar`` files in a task's folder
    are removed first so that a glob never mixes runs. The manifest (also written to
    ``out/manifest.json``) holds the spec version, seed, shard size, counts and the shard paths
    relative to ``out``. ``edit_ops``: the op cycle of the editing samples (default balanced; repeat an op to
    give it a larger share of training), recorded in the manifest.
    """
    if samples < 0:
        raise ValueError("samples must be >= 0")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected a subset of {TASKS}")
    edit_ops = check_edit_ops(edit_ops)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, int, int, int, tuple[str, ...]]] = []  # (abs path, task, seed, start, count, ops)
    shards: dict[str, list[str]] = {}
    for task in dict.fromkeys(tasks):  # de-duplicated, order kept
        task_dir = root / task
        task_dir.mkdir(parents=True, exist_ok=True)
        for old in task_dir.glob("shard-*.tar"):
            old.unlink()
        shards[task] = []
        for k, start in enumerate(range(0, samples, shard_size)):
            rel = f"{task}/shard-{k:06d}.tar"
            shards[task].append(rel)
            jobs.append((str(root / rel), task, int(seed), start, min(shard_size, samples - start), edit_ops))
    n_workers = min(len(jobs), workers if workers is not None else (os.cpu_count() or 1))
    if n_workers <= 1:
        written = [_write_shard(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            written = list(pool.map(_write_shard, *zip(*jobs, strict=True)))
    counts = {task: 0 for task in shards}
    for job, n in zip(jobs, written, strict=True):
        counts[job[1]] += n
    manifest: dict[str, Any] = {
        "dataset": "ShapesWorld",
        "spec_version": SPEC_VERSION,
        "seed": int(seed),
        "shard_size": int(shard_size),
        "sizes": [list(s) for s in SIZES],
        "counts": counts,
        "edit_ops": list(edit_ops),
        "shards": shards,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the manifest."""
    p = argparse.ArgumentParser(prog="python -m datamodules.shapes", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples", type=int, required=True, help="samples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: CPU count)")
    p.add_argument("--edit-ops", nargs="+", default=list(EDIT_OPS), choices=list(EDIT_OPS),
                   help="the op cycle of the editing samples; repeat an op to give it a larger share")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    manifest = write_shapes_shards(
        args.out, args.samples, args.seed, args.tasks, args.shard_size, workers=args.workers,
        edit_ops=args.edit_ops,
    )
    dt = time.perf_counter() - t0
    print(f"wrote {manifest['counts']} to {args.out} in {dt:.1f}s")
    return manifest


if __name__ == "__main__":
    main()
