"""Writers for the official output layouts of GenEval, DPG-Bench and ImgEdit (basic bench).

Each writer reads the benchmark's own prompt file, calls a generation callable (so the writers are
testable with a fake generator and independent of the model code), and writes images exactly where the
benchmark's scorer looks for them. All writers are resumable (finished items are skipped), write each
image atomically (temporary file + rename, so an interrupted run never leaves a truncated PNG that would
count as finished), can be sharded over processes (``shard=(rank, world_size)`` handles the items whose
index ``i`` has ``i % world_size == rank``), and return :class:`WriteCounts`.

Callables:

- ``generate(prompts, n) -> images``: ``len(prompts) * n`` images, prompt-major (the ``n`` images of
  ``prompts[0]`` first); images are ``PIL.Image`` or ``uint8 [H, W, 3]`` arrays;
- ``edit(sources, instructions) -> images``: one edited image per ``(source PIL.Image, instruction)``.

Seeding and sampling settings belong to the callable (e.g. a closure over the model and a seed).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image

__all__ = [
    "WriteCounts",
    "read_dpg_prompts",
    "read_geneval_prompts",
    "read_imgedit_items",
    "run_dpg_bench",
    "run_geneval",
    "run_imgedit",
]

log = logging.getLogger(__name__)

GenerateFn = Callable[[list[str], int], Sequence[Any]]
EditFn = Callable[[list[Image.Image], list[str]], Sequence[Any]]


class WriteCounts(TypedDict):
    """What a writer did: items ``written`` now, ``skipped_existing`` (finished by an earlier run),
    ``failed`` (bad input; the run went on), and ``failures``: ``[{"id", "reason"}]`` for the failed ones."""

    written: int
    skipped_existing: int
    failed: int
    failures: list[dict[str, str]]


def _counts() -> WriteCounts:
    return {"written": 0, "skipped_existing": 0, "failed": 0, "failures": []}


def _fail(counts: WriteCounts, item_id: str, reason: str) -> None:
    log.warning("benchmark item %s failed: %s", item_id, reason)
    counts["failed"] += 1
    counts["failures"].append({"id": item_id, "reason": reason})


def _in_shard(i: int, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    return i % world == rank


def _as_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
        raise TypeError(f"images must be PIL images or uint8 [H, W, 3] arrays, got {a.dtype} {a.shape}")
    return Image.fromarray(a, "RGB")


def _save_png(img: Image.Image, path: Path) -> None:
    # Same directory, hidden name without a .png suffix: scorers that glob "*.png" or "\d+\.png" never see
    # it, and os.replace is atomic on one filesystem.
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _generate(generate: GenerateFn, prompts: list[str], n: int) -> list[list[Image.Image]]:
    images = list(generate(prompts, n))
    if len(images) != len(prompts) * n:
        raise ValueError(f"generate({len(prompts)} prompts, {n}) returned {len(images)} images, "
                         f"expected {len(prompts) * n}")
    return [[_as_pil(im) for im in images[i * n:(i + 1) * n]] for i in range(len(prompts))]


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    if size <= 0:
        raise ValueError(f"batch size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _grid(images: Sequence[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Images on a black canvas with ``pad`` pixels around each (torchvision ``make_grid`` style)."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad))
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        tile = im.resize((w, h)) if im.size != (w, h) else im
        canvas.paste(tile, (pad + c * (w + pad), pad + r * (h + pad)))
    return canvas


# --------------------------------------------------------------------------------------------------
# GenEval
# --------------------------------------------------------------------------------------------------


def read_geneval_prompts(prompt_file: str | Path) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """Read GenEval's ``evaluation_metadata.jsonl``: one JSON object per line with at least ``"prompt"``
    and ``"tag"`` (plus ``"include"``, and for some tags ``"exclude"``).

    Returns ``(raw_line, metadata, error)`` per non-blank line, in file order (the index in this list is
    the GenEval index); ``metadata`` is None and ``error`` says why when a line is not a JSON object with a
    string ``"prompt"``.
    """
    out: list[tuple[str, dict[str, Any] | None, str | None]] = []
    with open(prompt_file, encoding="utf-8") as f:
        for line in f:
            raw = line.rstrip("\r\n")
            if not raw.strip():
                continue
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError as e:
                out.append((raw, None, f"invalid JSON: {e}"))
                continue
            if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
                out.append((raw, None, 'not a JSON object with a string "prompt"'))
                continue
            out.append((raw, meta, None))
    return out


def run_geneval(
    prompt_file: str | Path,
    out_dir: str | Path,
    generate: GenerateFn,
    n_images: int = 4,
    *,
    prompts_per_call: int = 1,
    grid: bool = True,
    grid_columns: int = 2,
    shard: tuple[int, int] | None = None,
) -> WriteCounts:
    """Write GenEval samples in the layout of GenEval's ``generation/diffusers_generate.py``, which its
    ``evaluation/evaluate_images.py`` reads::

        OUT/<index:05d>/metadata.jsonl      # the prompt's line of evaluation_metadata.jsonl, unchanged
        OUT/<index:05d>/samples/<k:04d>.png # k = 0 .. n_images-1
        OUT/<index:05d>/grid.png            # optional overview (not scored)

    The scorer visits subfolders whose name is all digits, ``json.load`` s ``metadata.jsonl`` and scores
    every ``samples/*.png`` whose name matches ``\\d+\\.png``. ``index`` is the line's position among
    the file's non-blank lines. An index whose ``metadata.jsonl`` and all ``n_images`` samples exist is
    skipped; otherwise all its samples are (re)generated. Lines that do not parse are counted as failed.
    """
    out = Path(out_dir)
    counts = _counts()
    todo: list[tuple[int, str, str]] = []  # (index, raw line, prompt)
    for i, (raw, meta, error) in enumerate(read_geneval_prompts(prompt_file)):
        if not _in_shard(i, shard):
            continue
        if meta is None:
            _fail(counts, f"{i:05d}", str(error))
            continue
        d = out / f"{i:05d}"
        done = (d / "metadata.jsonl").is_file() and all(
            (d / "samples" / f"{k:04d}.png").is_file() for k in range(n_images)
        )
        if done:
            counts["skipped_existing"] += 1
        else:
            todo.append((i, raw, meta["prompt"]))
    for batch in _batches(todo, prompts_per_call):
        images = _generate(generate, [p for _, _, p in batch], n_images)
        for (i, raw, _), imgs in zip(batch, images, strict=True):
            d = out / f"{i:05d}"
            (d / "samples").mkdir(parents=True, exist_ok=True)
            for k, im in enumerate(imgs):
                _save_png(im, d / "samples" / f"{k:04d}.png")
            if grid:
                _save_png(_grid(imgs, grid_columns), d / "grid.png")
            # Written last: together with the samples it marks the index as finished.
            _write_text(raw + "\n", d / "metadata.jsonl")
            counts["written"] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# DPG-Bench
# --------------------------------------------------------------------------------------------------


def read_dpg_prompts(source: str | Path) -> dict[str, str]:
    """DPG-Bench prompts as ``{item_id: prompt}`` in file order.

    ``source`` is either DPG-Bench's ``dpg_bench.csv`` (columns ``item_id, text, keywords,
    proposition_id, dependency, category_broad, category_detailed, tuple, question_natural_language``;
    several rows - one per question - share an ``item_id`` and its prompt ``text``; the first row of an
    item gives its prompt) or a folder of ``<item_id>.txt`` files (the repo's ``dpg_bench/prompts``),
    read in sorted order and stripped.
    """
    src = Path(source)
    prompts: dict[str, str] = {}
    if src.is_dir():
        for p in sorted(src.glob("*.txt")):
            prompts[p.stem] = p.read_text(encoding="utf-8").strip()
        return prompts
    with open(src, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"item_id", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{src}: DPG-Bench csv lacks columns item_id and text: {sorted(missing)}")
        for row in reader:
            item = (row["item_id"] or "").strip()
            if item and item not in prompts:
                prompts[item] = (row["text"] or "").strip()
    return prompts


def run_dpg_bench(
    prompts: str | Path,
    out_dir: str | Path,
    generate: GenerateFn,
    *,
    tile_size: int = 512,
    n_images: int = 4,
    prompts_per_call: int = 1,
    shard: tuple[int, int] | None = None,
) -> WriteCounts:
    """Write DPG-Bench images in the layout its ``dpg_bench/compute_dpg_bench.py`` reads::

        OUT/<item_id>.png   # a 2x2 grid of tile_size x tile_size images (2*tile_size square)

    The scorer lists every file in ``OUT`` (so nothing else is written there), takes the item id from
    the file name before the first dot, and with ``--resolution tile_size --pic-num n_images`` crops the
    tiles ``(0, 0)``, ``(T, 0)``, ``(0, T)``, ``(T, T)`` (left, upper; i.e. top-left, top-right,
    bottom-left, bottom-right) and averages their VQA scores. Images are placed in that order, resized to
    ``tile_size`` (bicubic) when needed; with ``n_images < 4`` the remaining tiles stay white. Existing
    ``<item_id>.png`` files are skipped. Item ids that are not plain file names are counted as failed.
    """
    if not 1 <= n_images <= 4:
        raise ValueError(f"DPG-Bench grids hold 1 to 4 images, got n_images={n_images}")
    out = Path(out_dir)
    counts = _counts()
    todo: list[tuple[str, str]] = []
    for i, (item, text) in enumerate(read_dpg_prompts(prompts).items()):
        if not _in_shard(i, shard):
            continue
        if Path(item).name != item or item.startswith(".") or "." in item:
            # The scorer splits the file name at the first dot to get the item id back.
            _fail(counts, item, "item_id is not usable as a file name")
            continue
        if not text:
            _fail(counts, item, "empty prompt")
            continue
        if (out / f"{item}.png").is_file():
            counts["skipped_existing"] += 1
        else:
            todo.append((item, text))
    out.mkdir(parents=True, exist_ok=True)
    offsets = [(0, 0), (tile_size, 0), (0, tile_size), (tile_size, tile_size)]  # (x, y), scorer's order
    for batch in _batches(todo, prompts_per_call):
        images = _generate(generate, [t for _, t in batch], n_images)
        for (item, _), imgs in zip(batch, images, strict=True):
            canvas = Image.new("RGB", (2 * tile_size, 2 * tile_size), (255, 255, 255))
            for im, xy in zip(imgs, offsets, strict=False):
                if im.size != (tile_size, tile_size):
                    im = im.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
                canvas.paste(im, xy)
            _save_png(canvas, out / f"{item}.png")
            counts["written"] += 1
    return counts


# --------------------------------------------------------------------------------------------------
# ImgEdit
# --------------------------------------------------------------------------------------------------

_PROMPT_FIELDS = ("prompt", "instruction", "edit_prompt")
_IMAGE_FIELDS = ("image", "image_path", "src_img", "id")  # official basic_edit.json: "id" is the image path
_TYPE_FIELDS = ("edit_type", "type")


def _first(record: dict[str, Any], fields: Sequence[str]) -> Any:
    for f in fields:
        v = record.get(f)
        if isinstance(v, str) and v.strip():
            return v
    return None


def read_imgedit_items(edit_json: str | Path) -> dict[str, dict[str, Any]]:
    """ImgEdit's basic-bench JSON (``Benchmark/Basic/basic_edit.json``) as ``{key: record}``.

    The official file is a dict keyed by a numeric string: ``{"1082": {"id": "animal/000342021.jpg",
    "prompt": "...", "edit_type": "alter"}, ...}`` where ``id`` is the source image path relative to the
    original-image root. A list of records is accepted too (key from ``"key"``, else ``"id"``, else the
    position). Field lookup is lenient (see :func:`run_imgedit`).
    """
    with open(edit_json, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):
        return {str(k): v for k, v in data.items()}
    if isinstance(data, list):
        out: dict[str, dict[str, Any]] = {}
        for i, rec in enumerate(data):
            key = rec.get("key", rec.get("id", i)) if isinstance(rec, dict) else i
            out[str(key)] = rec
        return out
    raise ValueError(f"{edit_json}: expected a JSON object keyed by id (or a list of records)")


def run_imgedit(
    edit_json: str | Path,
    image_root: str | Path,
    out_dir: str | Path,
    edit: EditFn,
    *,
    batch_size: int = 1,
    shard: tuple[int, int] | None = None,
) -> WriteCounts:
    """Write ImgEdit basic-bench outputs in the layout its ``Benchmark/Basic/basic_bench.py`` reads::

        OUT/<key>.png        # the edited image for each key of the edit JSON
        OUT/results.jsonl    # one record per item handled by this run (ours; the scorer ignores it)

    The scorer opens ``OUT/<key>.png`` and the source ``image_root/<item["id"]>`` for each key and
    writes its own ``result.json`` into ``OUT``. Per record, the instruction is the first non-empty of
    ``prompt``/``instruction``/``edit_prompt``, the source path of ``image``/``image_path``/``src_img``/``id``
    (relative to ``image_root``, or absolute), the edit type of ``edit_type``/``type``.

    Existing ``<key>.png`` files are skipped. A record without instruction or source, or whose source is
    missing or not a readable image, is skipped, counted as failed and logged in ``results.jsonl``
    (``status: "failed"`` with the reason) - never fatal. ``results.jsonl`` records: ``{key, source,
    prompt, edit_type, output, status, reason}``; it is appended to, so resumed runs add to it.
    """
    out = Path(out_dir)
    root = Path(image_root)
    out.mkdir(parents=True, exist_ok=True)
    counts = _counts()
    records: list[dict[str, Any]] = []
    todo: list[tuple[str, Path, dict[str, Any]]] = []

    def failed(key: str, rec: dict[str, Any], reason: str) -> None:
        _fail(counts, key, reason)
        records.append({**rec, "output": None, "status": "failed", "reason": reason})

    for i, (key, item) in enumerate(read_imgedit_items(edit_json).items()):
        if not _in_shard(i, shard):
            continue
        if not isinstance(item, dict):
            failed(key, {"key": key}, "record is not a JSON object")
            continue
        rec = {"key": key, "source": _first(item, _IMAGE_FIELDS), "prompt": _first(item, _PROMPT_FIELDS),
               "edit_type": _first(item, _TYPE_FIELDS)}
        if Path(key).name != key or key.startswith("."):
            failed(key, rec, "key is not usable as a file name")
        elif (out / f"{key}.png").is_file():
            counts["skipped_existing"] += 1
        elif rec["prompt"] is None:
            failed(key, rec, "no instruction (prompt/instruction/edit_prompt)")
        elif rec["source"] is None:
            failed(key, rec, "no source image field (image/image_path/src_img/id)")
        else:
            todo.append((key, root / rec["source"], rec))

    try:
        for batch in _batches(todo, batch_size):
            # Sources are opened batch by batch (not all up front): benchmark images are large.
            ready: list[tuple[str, Image.Image, dict[str, Any]]] = []
            for key, src, rec in batch:
                try:
                    with Image.open(src) as im:
                        im.load()
                        ready.append((key, im.convert("RGB"), rec))
                except FileNotFoundError:
                    failed(key, rec, f"source image not found: {src}")
                except Exception as e:  # PIL raises several exception types for corrupt or non-image files
                    failed(key, rec, f"source image unreadable: {src} ({type(e).__name__}: {e})")
            if not ready:
                continue
            results = list(edit([s for _, s, _ in ready], [r["prompt"] for _, _, r in ready]))
            if len(results) != len(ready):
                raise ValueError(f"edit() returned {len(results)} images for {len(ready)} inputs")
            for (key, _, rec), img in zip(ready, results, strict=True):
                _save_png(_as_pil(img), out / f"{key}.png")
                records.append({**rec, "output": f"{key}.png", "status": "written", "reason": None})
                counts["written"] += 1
    finally:
        # Also on an exception from edit(): what was written so far stays on record.
        if records:
            with open(out / "results.jsonl", "a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return counts
