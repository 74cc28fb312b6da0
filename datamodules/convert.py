"""``python -m datamodules.convert``: public datasets -> webdataset shards in the project's shard schema.

    python -m datamodules.convert t2i      --images DIR --captions captions.jsonl       --out shards/t2i
    python -m datamodules.convert imagenet --root train/ --classes classes.json         --out shards/in1k
    python -m datamodules.convert und      --json llava_v1_5_mix665k.json --images DIR --out shards/und
    python -m datamodules.convert edit     --json imgedit.jsonl --images DIR            --out shards/edit

Common options: ``--shard-size N`` (samples per shard, 1000), ``--jpeg-quality Q`` (95), ``--reencode
{auto,always}``, ``--workers W`` (image checking/encoding processes), ``--prefix NAME`` (shard file
prefix, default the subcommand's name).

Inputs:
- ``t2i``: JSON Lines, one ``{"image": path relative to --images, "caption_en"?: str, "caption_zh"?: str}``
  per line (``"caption"`` / ``"text"`` are taken as English; ``"file_name"`` / ``"path"`` as the image).
- ``imagenet``: class folders ``ROOT/nXXXXXXXX/*.JPEG``; ``--classes`` is JSON ``{wnid: {"en": ..., "zh":
  ...}}`` (or ``{wnid: "en"}`` / ``{wnid: [en, zh]}``) or TSV ``wnid<TAB>en[<TAB>zh]``. Each image becomes a
  t2i sample whose captions are its class names (stage 1 trains on class names).
- ``und``: LLaVA JSON (a list; ``.jsonl`` also read) of ``{"id", "image": str | [str] (optional),
  "conversations": [{"from": "human"|"gpt", "value": "...<image>..."}]}``. Turns become ``{"role",
  "content"}`` with ``<image>`` kept; one image without a tag gets ``<image>\\n`` prepended to the first
  user turn (the reference rule); any other mismatch between tags and images skips the sample.
- ``edit``: ImgEdit-style JSON / JSONL records with a source image (``src_img`` | ``source`` | ``input`` |
  ...), an edited image (``edited_img`` | ``target`` | ``output`` | ...) and an instruction (``prompt`` |
  ``instruction`` | ``edit_instruction`` | ...; ``--src-key`` etc. name other fields). An instruction
  containing CJK characters becomes ``instruction_zh``, otherwise ``instruction_en`` (explicit
  ``instruction_en`` / ``instruction_zh`` fields are kept as they are).

Output (the schema of ``datamodules.webdata``): ``OUT/{prefix}-000000.tar, ...``, each sample a key with
``jpg``/``png`` (t2i), ``0.jpg``, ``1.png``, ... (und) or ``src.*`` + ``tgt.*`` (edit) and ``json``.
Images are checked (PIL ``verify`` then a full decode); JPEG/PNG files in RGB or greyscale with no EXIF
rotation keep their original bytes, everything else (other formats, alpha, CMYK, 16-bit, rotated) is
re-encoded as JPEG at ``--jpeg-quality`` (``--reencode always``: every image). A sample whose input is
missing, unreadable or corrupt is skipped with its reason, never fatal; ``OUT/convert_report.json`` and a
printed table give the counts of this run. A missing input file or folder (``--images``, ``--captions``,
``--json``, ...) is a mistake, not a run of skips: one line naming it, exit status 2 (``--debug`` shows the
traceback; ``wallaroo.cli_errors``).

Resuming: a shard is written as ``*.tar.tmp`` and renamed when complete, then recorded with its sample
keys in ``OUT/.done`` (JSON Lines). A re-run skips the keys recorded there (their images are not even
read), deletes leftovers of an interrupted run (``*.tar.tmp``, shards not in the index) and writes the
remaining samples to new shards numbered after the last one. Keys are a deterministic function of the
inputs (image path, record id or index; duplicates get ``_dupN``), and tars are written with a fixed
mtime, so the same inputs give the same output.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, ImageOps

from wallaroo.cli_errors import require_path, run_cli

INDEX_FILE = ".done"
REPORT_FILE = "convert_report.json"
INDEX_VERSION = 1
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# At most this many skipped samples are listed one by one in the report (all are counted).
MAX_LISTED_SKIPS = 1000

# Skip reasons (the report counts by these).
MISSING = "missing image"
CORRUPT = "corrupt image"
NO_TEXT = "no caption or instruction"
BAD_RECORD = "bad record"
TAG_MISMATCH = "<image> tags != images"
UNKNOWN_CLASS = "class not in --classes"

_CJK_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")
_KEY_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]+")


def has_cjk(text: str) -> bool:
    """True when ``text`` contains a CJK ideograph (then it is taken as Chinese)."""
    return _CJK_RE.search(text) is not None


# ----------------------------------------------------------------------------------------------------
# Jobs, skips, keys
# ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One sample to write: ``images`` are ``(field stem, path)`` pairs (stem ``""`` for t2i's single
    image, ``"0"``, ``"1"`` ... for und, ``"src"``/``"tgt"`` for edit); ``meta`` becomes the ``json``."""

    key: str
    images: list[tuple[str, str]]
    meta: dict[str, Any]


@dataclass
class Skip:
    """A sample that is not written, with the reason category and details."""

    key: str
    reason: str
    detail: str
    source: str = ""


class KeyMaker:
    """Webdataset-safe, unique, deterministic keys: unsafe characters become ``_`` (a ``.`` would split
    the key from the extension), long names are shortened with a hash, repeats get ``_dup1``, ``_dup2``."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, name: str, index: int) -> str:
        key = _KEY_UNSAFE_RE.sub("_", name).strip("_") or f"{index:09d}"
        if len(key) > 120:
            key = key[:100] + "_" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:12]
        base, n = key, 0
        while key in self.seen:
            n += 1
            key = f"{base}_dup{n}"
        self.seen.add(key)
        return key


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


class ImageProblem(Exception):
    """An input image that cannot be used; ``reason`` is a skip category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for re-encoding: transparency is composited on white (dropping alpha would leave whatever the
    transparent pixels hold, often black); EXIF rotation is applied."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit greyscale: scale to 8 bits (a plain convert would clip).
        return img.point(lambda v: v / 257).convert("L").convert("RGB")
    return img.convert("RGB")


def encode_image(path: str, quality: int, reencode: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a checked image file; raises :class:`ImageProblem`.

    Keeps the original bytes of an RGB/greyscale JPEG or PNG without EXIF rotation (unless ``reencode``
    is ``"always"``); everything else is re-encoded as JPEG at ``quality``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageProblem(MISSING, f"{path}: no such file") from None
    except OSError as exn:
        raise ImageProblem(MISSING, f"{path}: cannot read ({exn})") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            probe.verify()  # structure and checksums (PNG CRCs) without decoding everything
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # the full decode: a truncated JPEG fails here
            orientation = img.getexif().get(0x0112, 1)
            keep = (
                reencode != "always"
                and fmt in ("JPEG", "PNG")
                and img.mode in ("RGB", "L")
                and orientation in (None, 1)
            )
            if keep:
                return ("jpg" if fmt == "JPEG" else "png"), data
            rgb = _to_rgb(img)
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageProblem(CORRUPT, f"{path}: cannot decode ({type(exn).__name__}: {exn})") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageProblem(CORRUPT, f"{path}: empty image")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return "jpg", buf.getvalue()


@dataclass(frozen=True)
class EncodeOptions:
    quality: int = 95
    reencode: str = "auto"


def prepare(job: Job, opts: EncodeOptions) -> dict[str, Any] | Skip:
    """A webdataset record for ``job`` (images checked and encoded), or the :class:`Skip` saying why not.
    Top-level so that worker processes can run it."""
    record: dict[str, Any] = {"__key__": job.key}
    for stem, path in job.images:
        try:
            ext, data = encode_image(path, opts.quality, opts.reencode)
        except ImageProblem as exn:
            return Skip(job.key, exn.reason, exn.detail, path)
        record[f"{stem}.{ext}" if stem else ext] = data
    record["json"] = json.dumps(job.meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return record


def _prepare_star(args: tuple[Job, EncodeOptions]) -> dict[str, Any] | Skip:
    return prepare(*args)


def ordered_map(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int = 64
) -> Iterator[Any]:
    """``map(fn, items)`` in input order over ``workers`` processes, with at most ``window`` items in
    flight per worker (so a million-image input never queues a million futures)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[Any]] = deque()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------------
# Shards, resume index, report
# ----------------------------------------------------------------------------------------------------


class ShardSink:
    """Writes records into ``{prefix}-NNNNNN.tar`` shards of ``shard_size`` samples under ``out``.

    The resume index ``out/.done`` holds a header line (task, version) and one line per completed shard
    with its keys. Opening a sink reads it, checks the task, and deletes partial leftovers of an
    interrupted run (``*.tar.tmp``; ``{prefix}-*.tar`` files missing from the index).
    """

    def __init__(self, out: Path, task: str, prefix: str, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        self.out, self.task, self.prefix, self.shard_size = out, task, prefix, shard_size
        out.mkdir(parents=True, exist_ok=True)
        self.index_path = out / INDEX_FILE
        self.shards: list[str] = []
        self.ever_indexed: list[str] = []  # shard names in the index, present or not (for numbering)
        self.done_keys: set[str] = set()
        self.n_done = 0
        self._read_index()
        indexed = set(self.shards)
        for stray in sorted(out.glob(f"{prefix}-*.tar.tmp")) + sorted(out.glob(f"{prefix}-*.tar")):
            if stray.name not in indexed:
                stray.unlink()
        # Numbered after every shard the index ever named: a name whose file vanished is never reused, so
        # its stale index line cannot come back to life.
        numbers = [int(m.group(1)) for s in self.ever_indexed if (m := re.search(r"-(\d+)\.tar$", s))]
        self.next_number = max(numbers, default=-1) + 1
        self.new_shards: list[str] = []
        self.written = 0
        self._writer: wds.TarWriter | None = None
        self._stream: io.BufferedWriter | None = None
        self._keys: list[str] = []

    def _read_index(self) -> None:
        if not self.index_path.is_file():
            header = {"kind": "header", "task": self.task, "version": INDEX_VERSION}
            self.index_path.write_text(json.dumps(header) + "\n", encoding="utf-8")
            return
        lines = self.index_path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError as exn:
                if n == len(lines) - 1:
                    break  # a line cut by a crash: its shard is redone
                raise SystemExit(
                    f"{self.index_path}: line {n + 1} is not JSON ({exn}); delete the file to start over"
                ) from None
            if entry.get("kind") == "header":
                if entry.get("task") != self.task:
                    raise SystemExit(
                        f"{self.out} holds {entry.get('task')!r} shards; write {self.task!r} shards elsewhere"
                    )
            elif entry.get("kind") == "shard":
                self.ever_indexed.append(entry["shard"])
                if not (self.out / entry["shard"]).is_file():
                    continue  # deleted by hand: its samples are written again
                self.shards.append(entry["shard"])
                self.done_keys.update(entry["keys"])
                self.n_done += len(entry["keys"])

    def add(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            name = f"{self.prefix}-{self.next_number:06d}.tar"
            self._stream = open(self.out / f"{name}.tmp", "wb")  # noqa: SIM115 - closed in _finish
            # Fixed mtime: the same inputs give byte-identical shards.
            self._writer = wds.TarWriter(self._stream, encoder=False, mtime=0.0)
            self._name = name
        self._writer.write(record)
        self._keys.append(record["__key__"])
        self.written += 1
        if len(self._keys) >= self.shard_size:
            self._finish()

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._stream is not None
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        os.replace(self.out / f"{self._name}.tmp", self.out / self._name)
        entry = {"kind": "shard", "shard": self._name, "count": len(self._keys), "keys": self._keys}
        with open(self.index_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.shards.append(self._name)
        self.new_shards.append(self._name)
        self.done_keys.update(self._keys)
        self.next_number += 1
        self._writer, self._stream, self._keys = None, None, []

    def close(self) -> None:
        self._finish()


@dataclass
class Report:
    """Counts of one run (``convert_report.json``)."""

    command: str
    task: str
    out: str
    inputs: int = 0
    written: int = 0
    already_done: int = 0
    skipped: list[Skip] = field(default_factory=list)
    new_shards: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    samples_in_shards: int = 0

    def to_dict(self) -> dict[str, Any]:
        by_reason = Counter(s.reason for s in self.skipped)
        return {
            "command": self.command,
            "task": self.task,
            "out": self.out,
            "inputs": self.inputs,
            "written": self.written,
            "already_done": self.already_done,
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(sorted(by_reason.items())),
            "skipped_samples": [
                {"key": s.key, "reason": s.reason, "detail": s.detail, "source": s.source}
                for s in self.skipped[:MAX_LISTED_SKIPS]
            ],
            "new_shards": self.new_shards,
            "shards": self.shards,
            "samples_in_shards": self.samples_in_shards,
        }

    def table(self) -> str:
        rows = [
            ("inputs", self.inputs, ""),
            ("written", self.written, f"{len(self.new_shards)} new shard(s)"),
            ("already done", self.already_done, "in shards of earlier runs"),
            ("skipped", len(self.skipped), ""),
        ]
        examples: dict[str, Skip] = {}
        for s in self.skipped:
            examples.setdefault(s.reason, s)
        for reason, n in sorted(Counter(s.reason for s in self.skipped).items()):
            ex = examples[reason]
            rows.append((f"  {reason}", n, f"e.g. {ex.key}: {ex.detail}"))
        rows.append(("in all shards", self.samples_in_shards, f"{len(self.shards)} shard(s)"))
        width = max(len(r[0]) for r in rows)
        lines = [f"datamodules.convert {self.command} ({self.task}) -> {self.out}"]
        lines += [f"  {name:<{width}}  {n:>8}  {note}".rstrip() for name, n, note in rows]
        return "\n".join(lines)


def run(
    command: str,
    task: str,
    items: Iterable[Job | Skip],
    out: str | Path,
    *,
    shard_size: int = 1000,
    prefix: str | None = None,
    opts: EncodeOptions = EncodeOptions(),
    workers: int = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write ``items`` (jobs and record-level skips, in input order) as shards; returns the report dict
    (also written to ``out/convert_report.json`` and, unless ``quiet``, printed)."""
    out = Path(out)
    sink = ShardSink(out, task, prefix or command, shard_size)
    report = Report(command=command, task=task, out=str(out))

    def jobs() -> Iterator[tuple[Job, EncodeOptions]]:
        for item in items:
            report.inputs += 1
            if isinstance(item, Skip):
                report.skipped.append(item)
            elif item.key in sink.done_keys:
                report.already_done += 1
            else:
                yield item, opts

    try:
        for result in ordered_map(_prepare_star, jobs(), workers):
            if isinstance(result, Skip):
                report.skipped.append(result)
            else:
                sink.add(result)
    finally:
        sink.close()
    report.written = sink.written
    report.new_shards = list(sink.new_shards)
    report.shards = list(sink.shards)
    report.samples_in_shards = sink.n_done + sink.written
    data = report.to_dict()
    (out / REPORT_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if not quiet:
        print(report.table())
    return data


# ----------------------------------------------------------------------------------------------------
# Input readers
# ----------------------------------------------------------------------------------------------------


def object_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | Skip]]:
    """``read_records`` with every record that is not a JSON object turned into a ``Skip``."""
    for index, rec in read_records(path):
        if not isinstance(rec, dict | Skip):
            rec = Skip(f"{index:09d}", BAD_RECORD, f"record {index} is not an object")
        yield index, rec


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(index, record)`` of a JSON list, a JSON object of records (its keys become ``"id"`` when the
    record has none) or JSON Lines. A JSON Lines line that does not parse yields ``(index, Skip)``; a
    ``.json`` file that does not parse is fatal (nothing in it can be trusted)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            index = 0
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield index, json.loads(line)
                except ValueError as exn:
                    yield index, Skip(f"line{n:09d}", BAD_RECORD, f"{path}:{n}: not JSON ({exn})")
                index += 1
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exn:
        raise SystemExit(f"{path} cannot be read as JSON: {exn}") from None
    if isinstance(data, dict):
        data = [({"id": k, **v} if isinstance(v, dict) and "id" not in v else v) for k, v in data.items()]
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list (or object) of records, got {type(data).__name__}")
    yield from enumerate(data)


def _first(record: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = record.get(name)
        if value is not None and value != "":
            return value
    return None


def _resolve(images: Path, rel: Any) -> str:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"image path must be a non-empty string, got {rel!r}")
    return str(images / rel)


def _strip_ext(rel: str) -> str:
    root, ext = os.path.splitext(rel)
    return root if ext.lower() in IMAGE_SUFFIXES else rel


def t2i_items(images: str | Path, captions: str | Path) -> Iterator[Job | Skip]:
    """Jobs of the ``t2i`` converter (see the module docstring)."""
    images, keys = Path(images), KeyMaker()
    for index, rec in object_records(captions):
        if isinstance(rec, Skip):
            yield rec
            continue
        rel = _first(rec, ("image", "file_name", "path"))
        key = keys(_strip_ext(rel) if isinstance(rel, str) else "", index)
        en = _first(rec, ("caption_en", "caption", "text"))
        zh = _first(rec, ("caption_zh",))
        meta: dict[str, Any] = {}
        for lang, text in (("en", en), ("zh", zh)):
            if isinstance(text, str) and text.strip():
                meta[f"caption_{lang}"] = text.strip()
        if not meta:
            yield Skip(key, NO_TEXT, f"record {index} has no caption_en / caption_zh / caption / text")
            continue
        try:
            path = _resolve(images, rel)
        except ValueError as exn:
            yield Skip(key, BAD_RECORD, f"record {index}: {exn}")
            continue
        meta["source"] = rel
        yield Job(key, [("", path)], meta)


def read_classes(path: str | Path) -> dict[str, dict[str, str]]:
    """``{wnid: {"en": ..., "zh": ...}}`` from a JSON or TSV class-name file (module docstring)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    names: dict[str, dict[str, str]] = {}
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exn:
            raise SystemExit(f"{path} is not valid JSON: {exn}") from None
        for wnid, value in data.items():
            if isinstance(value, str):
                value = {"en": value}
            elif isinstance(value, (list, tuple)):
                value = dict(zip(("en", "zh"), value, strict=False))
            if not isinstance(value, dict):
                raise SystemExit(f"{path}: class {wnid!r} must map to a name, [en, zh] or {{'en', 'zh'}}")
            names[wnid] = {k: str(v).strip() for k, v in value.items() if k in ("en", "zh") and v}
    else:
        for row in csv.reader(text.splitlines(), delimiter="\t"):
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            entry = {lang: v.strip() for lang, v in zip(("en", "zh"), row[1:], strict=False) if v.strip()}
            names[row[0].strip()] = entry
    empty = [w for w, v in names.items() if not v]
    if empty:
        raise SystemExit(f"{path}: classes without any name: {empty[:10]}")
    return names


def imagenet_items(root: str | Path, classes: str | Path) -> Iterator[Job | Skip]:
    """Jobs of the ``imagenet`` converter: every image of every class folder, in sorted order."""
    root, keys = Path(root), KeyMaker()
    names = read_classes(classes)
    labels = {wnid: i for i, wnid in enumerate(sorted(names))}
    if not root.is_dir():
        raise SystemExit(f"--root {root} is not a directory")
    index = 0
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        wnid = class_dir.name
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            key = keys(f"{wnid}_{file.stem}" if not file.stem.startswith(wnid) else file.stem, index)
            index += 1
            if wnid not in names:
                yield Skip(key, UNKNOWN_CLASS, f"{wnid} has no name in the classes file", str(file))
                continue
            meta: dict[str, Any] = {f"caption_{lang}": text for lang, text in names[wnid].items()}
            meta.update(wnid=wnid, label=labels[wnid], source=f"{wnid}/{file.name}")
            yield Job(key, [("", str(file))], meta)


class TagMismatch(ValueError):
    """The number of ``<image>`` tags differs from the number of images."""


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE_TAG = "<image>"


def convert_conversation(turns: Any, n_images: int) -> list[dict[str, str]]:
    """LLaVA turns -> ``[{"role", "content"}]`` with ``<image>`` kept; raises ``ValueError`` (a record
    problem) or :class:`TagMismatch`. One untagged image gets ``<image>\\n`` before the first user turn."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    out: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role = _ROLES.get(str(turn.get("from", turn.get("role"))))
        content = turn.get("value", turn.get("content"))
        if role is None:
            raise ValueError(f"turn {i}: unknown role {turn.get('from', turn.get('role'))!r}")
        if not isinstance(content, str):
            raise ValueError(f"turn {i}: content must be a string")
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"turn {i} is {role}; turns must alternate user/assistant starting with user")
        if role == "assistant" and IMAGE_TAG in content:
            raise ValueError(f"turn {i}: <image> in an assistant turn")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise ValueError("the conversation does not end with an assistant turn")
    tags = sum(t["content"].count(IMAGE_TAG) for t in out)
    if n_images == 1 and tags == 0:
        out[0]["content"] = IMAGE_TAG + "\n" + out[0]["content"]
        tags = 1
    if tags != n_images:
        raise TagMismatch(f"{tags} <image> tag(s) for {n_images} image(s)")
    return out


def und_items(json_path: str | Path, images: str | Path) -> Iterator[Job | Skip]:
    """Jobs of the ``und`` converter (LLaVA format)."""
    images, keys = Path(images), KeyMaker()
    for index, rec in object_records(json_path):
        if isinstance(rec, Skip):
            yield rec
            continue
        rid = rec.get("id")
        key = keys(str(rid) if rid is not None else "", index)
        rels = rec.get("image", rec.get("images"))
        rels = [] if rels is None else ([rels] if isinstance(rels, str) else rels)
        try:
            if not isinstance(rels, list):
                raise ValueError(f"'image' must be a string or a list, got {type(rels).__name__}")
            paths = [_resolve(images, r) for r in rels]
            conversation = convert_conversation(rec.get("conversations"), len(rels))
        except TagMismatch as exn:
            yield Skip(key, TAG_MISMATCH, f"record {index}: {exn}")
            continue
        except ValueError as exn:
            yield Skip(key, BAD_RECORD, f"record {index}: {exn}")
            continue
        meta: dict[str, Any] = {"conversations": conversation}
        if rid is not None:
            meta["id"] = rid
        if rels:
            meta["source"] = rels
        yield Job(key, [(str(i), p) for i, p in enumerate(paths)], meta)


EDIT_SRC_KEYS = ("src_img", "source", "input", "source_image", "input_image", "src")
EDIT_TGT_KEYS = ("edited_img", "target", "output", "edited_image", "target_image", "output_image", "tgt")
EDIT_TEXT_KEYS = ("prompt", "instruction", "edit_instruction", "edit_prompt", "text")


def edit_items(
    json_path: str | Path,
    images: str | Path,
    src_key: str | None = None,
    tgt_key: str | None = None,
    instruction_key: str | None = None,
) -> Iterator[Job | Skip]:
    """Jobs of the ``edit`` converter (ImgEdit-style records)."""
    images, keys = Path(images), KeyMaker()
    src_names = (src_key,) if src_key else EDIT_SRC_KEYS
    tgt_names = (tgt_key,) if tgt_key else EDIT_TGT_KEYS
    text_names = (instruction_key,) if instruction_key else EDIT_TEXT_KEYS
    for index, rec in object_records(json_path):
        if isinstance(rec, Skip):
            yield rec
            continue
        src, tgt = _first(rec, src_names), _first(rec, tgt_names)
        rid = _first(rec, ("id", "key", "name"))
        fallback = _strip_ext(src) if isinstance(src, str) else ""
        key = keys(str(rid) if rid is not None else fallback, index)
        meta: dict[str, Any] = {}
        for lang in ("en", "zh"):
            text = rec.get(f"instruction_{lang}")
            if isinstance(text, str) and text.strip():
                meta[f"instruction_{lang}"] = text.strip()
        if not meta:
            text = _first(rec, text_names)
            if isinstance(text, str) and text.strip():
                meta["instruction_zh" if has_cjk(text) else "instruction_en"] = text.strip()
        if not meta:
            yield Skip(key, NO_TEXT, f"record {index} has none of {list(text_names)}")
            continue
        try:
            src = src[0] if isinstance(src, list) and len(src) == 1 else src
            tgt = tgt[0] if isinstance(tgt, list) and len(tgt) == 1 else tgt
            if src is None or tgt is None:
                missing = [n for n, v in (("source", src), ("edited", tgt)) if v is None]
                raise ValueError(
                    f"no {' or '.join(missing)} image field (tried {list(src_names)} / {list(tgt_names)})"
                )
            paths = [("src", _resolve(images, src)), ("tgt", _resolve(images, tgt))]
        except ValueError as exn:
            yield Skip(key, BAD_RECORD, f"record {index}: {exn}")
            continue
        if rid is not None:
            meta["id"] = rid
        meta["source"] = [src, tgt]
        yield Job(key, paths, meta)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _add_t2i(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    p.add_argument("--captions", required=True, help="JSON Lines of {image, caption_en?, caption_zh?}")


def _add_imagenet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="folder of class folders nXXXXXXXX/*.JPEG")
    p.add_argument("--classes", required=True, help="JSON {wnid: {en, zh}} or TSV wnid<TAB>en<TAB>zh")


def _add_und(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", required=True, help="LLaVA-format JSON (list) or JSON Lines")
    p.add_argument("--images", required=True, help="folder the image paths are relative to")


def _add_edit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", required=True, help="ImgEdit-style JSON (list) or JSON Lines")
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    p.add_argument("--src-key", default=None, help=f"source image field (default: first of {EDIT_SRC_KEYS})")
    p.add_argument("--tgt-key", default=None, help=f"edited image field (default: first of {EDIT_TGT_KEYS})")
    p.add_argument("--instruction-key", default=None, help=f"instruction field (default: {EDIT_TEXT_KEYS})")


# name -> (task, help, add_arguments, items(args))
SUBCOMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], Iterable[Job | Skip]]]] = {  # noqa: E501
    "t2i": ("t2i", "images + captions -> t2i shards", _add_t2i, lambda a: t2i_items(a.images, a.captions)),
    "imagenet": ("t2i", "ImageNet class folders -> t2i shards (class names as captions)", _add_imagenet,
                 lambda a: imagenet_items(a.root, a.classes)),
    "und": ("und", "LLaVA conversations -> und shards", _add_und, lambda a: und_items(a.json, a.images)),
    "edit": ("edit", "ImgEdit-style pairs -> edit shards", _add_edit,
             lambda a: edit_items(a.json, a.images, a.src_key, a.tgt_key, a.instruction_key)),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, add_arguments, _) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.add_argument(
            "--out", required=True, help="output folder (shards, .done index, convert_report.json)"
        )
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        p.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs (1-100)")
        p.add_argument(
            "--reencode",
            choices=("auto", "always"),
            default="auto",
            help="auto: keep RGB/grey JPEG and PNG bytes; always: re-encode every image as JPEG",
        )
        p.add_argument("--workers", type=int, default=1, help="processes checking and encoding images")
        p.add_argument("--prefix", default=None, help="shard file prefix (default: the subcommand)")
        p.add_argument("--quiet", action="store_true", help="do not print the report table")
    return parser


# name -> the inputs checked before anything is read: (argument, option, "file" | "dir")
INPUTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "t2i": (("images", "--images", "dir"), ("captions", "--captions", "file")),
    "imagenet": (("root", "--root", "dir"), ("classes", "--classes", "file")),
    "und": (("json", "--json", "file"), ("images", "--images", "dir")),
    "edit": (("json", "--json", "file"), ("images", "--images", "dir")),
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one converter; returns the report (also in ``OUT/convert_report.json``). A missing input file or
    folder is refused up front (``UsageError``), not reported as every sample skipped."""
    args = build_parser().parse_args(argv)
    for attr, option, kind in INPUTS[args.command]:
        require_path(getattr(args, attr), option, kind)
    if not 1 <= args.jpeg_quality <= 100:
        raise SystemExit(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    task, _, _, items = SUBCOMMANDS[args.command]
    return run(
        args.command, task, items(args), args.out, shard_size=args.shard_size, prefix=args.prefix,
        opts=EncodeOptions(args.jpeg_quality, args.reencode), workers=args.workers, quiet=args.quiet,
    )  # fmt: skip


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: ``main`` with one-line errors (``wallaroo.cli_errors``); returns the exit status."""
    return run_cli(main, argv, prog="python -m datamodules.convert")


if __name__ == "__main__":
    sys.exit(cli())
