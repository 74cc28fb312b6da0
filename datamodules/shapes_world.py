"""ShapesWorld v2: the built-in bilingual world of flat coloured shapes.

This module is the executable form of ``shared/specs/shapes-world.md`` (the contract): scenes,
pixel-exact rendering, English/Chinese captions and their parser, understanding questions and
their scoring, editing instructions and their validity rules, and deterministic sample generators
for the three tasks (text-to-image, understanding, editing).

Conventions (project-wide):
- sizes are written ``(width, height)``; arrays are row first, so images are ``uint8 [H, W, 3]``;
- a cell is ``(row, col)`` in the 3x3 grid, an offset is ``(oy, ox)`` in 8-px steps inside the cell.

Pure numpy / PIL-free on purpose: the data pipeline, the detector and the tests import it without
torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

SPEC_VERSION = "shapes-world-v2"

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------


class Colour(NamedTuple):
    """A palette entry: exact RGB plus its English and Chinese words."""

    rgb: tuple[int, int, int]
    en: str
    zh: str


class Word(NamedTuple):
    """An English / Chinese word pair."""

    en: str
    zh: str


COLOURS: dict[str, Colour] = {
    "red": Colour((220, 40, 40), "red", "红色"),
    "green": Colour((40, 160, 60), "green", "绿色"),
    "blue": Colour((40, 80, 220), "blue", "蓝色"),
    "yellow": Colour((230, 200, 40), "yellow", "黄色"),
    "purple": Colour((140, 60, 180), "purple", "紫色"),
    "orange": Colour((240, 130, 30), "orange", "橙色"),
}

SHAPES: dict[str, Word] = {
    "square": Word("square", "正方形"),
    "circle": Word("circle", "圆形"),
    "triangle": Word("triangle", "三角形"),
    "diamond": Word("diamond", "菱形"),
}

POSITIONS: dict[tuple[int, int], Word] = {
    (0, 0): Word("top left", "左上"),
    (0, 1): Word("top", "上方"),
    (0, 2): Word("top right", "右上"),
    (1, 0): Word("left", "左侧"),
    (1, 1): Word("center", "中间"),
    (1, 2): Word("right", "右侧"),
    (2, 0): Word("bottom left", "左下"),
    (2, 1): Word("bottom", "下方"),
    (2, 2): Word("bottom right", "右下"),
}

#: The three canvas sizes as (width, height): square, wide, tall.
SIZES: list[tuple[int, int]] = [(48, 48), (72, 48), (48, 72)]

LANGS: tuple[str, ...] = ("en", "zh")
QTYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "caption")
EDIT_OPS: tuple[str, ...] = ("recolor", "remove", "add", "move")

COLOUR_KEYS: tuple[str, ...] = tuple(COLOURS)
SHAPE_KEYS: tuple[str, ...] = tuple(SHAPES)
CELLS: tuple[tuple[int, int], ...] = tuple(POSITIONS)

BOX = 16  # side of an object's box in pixels
STEP = 8  # an offset step in pixels: the code grid of an 8x-downsampling tokenizer
MAX_OFFSET = 1  # a 24-px cell leaves one step of placement; a 16-px cell none
BACKGROUND = (255, 255, 255)

# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ShapeObject:
    """One object: palette colour key, shape key, grid cell ``(row, col)`` and offset ``(oy, ox)``: 8-px
    steps of its 16x16 box inside the cell (0 or 1; a step is only allowed where the cell is 24 px)."""

    colour: str
    shape: str
    cell: tuple[int, int]
    oy: int = 0
    ox: int = 0


#: A scene: 1-3 objects in distinct cells with distinct shapes, sorted in reading order.
Scene = tuple[ShapeObject, ...]


def make_scene(objects: Sequence[ShapeObject]) -> Scene:
    """Validate ``objects`` against the scene rules and return them sorted in reading order.

    Raises ``ValueError`` for an unknown colour/shape/cell, an offset outside ``{0, 1}``, zero or more
    than three objects, or repeated cells or shapes. Whether an offset fits a canvas depends on its size,
    so :func:`render` checks that.
    """
    objs = tuple(objects)
    if not 1 <= len(objs) <= 3:
        raise ValueError(f"a scene has 1 to 3 objects, got {len(objs)}")
    for o in objs:
        if o.colour not in COLOURS:
            raise ValueError(f"unknown colour {o.colour!r}")
        if o.shape not in SHAPES:
            raise ValueError(f"unknown shape {o.shape!r}")
        if tuple(o.cell) not in POSITIONS:
            raise ValueError(f"unknown cell {o.cell!r}")
        if not (0 <= o.oy <= MAX_OFFSET and 0 <= o.ox <= MAX_OFFSET):
            raise ValueError(f"offset out of range (0..{MAX_OFFSET} steps): {(o.oy, o.ox)}")
    if len({tuple(o.cell) for o in objs}) != len(objs):
        raise ValueError("objects must be in distinct cells")
    if len({o.shape for o in objs}) != len(objs):
        raise ValueError("objects must have distinct shapes")
    # Normalise cells to tuples so that equality/hashing never depends on list-vs-tuple input.
    objs = tuple(replace(o, cell=(int(o.cell[0]), int(o.cell[1]))) for o in objs)
    return tuple(sorted(objs, key=lambda o: o.cell))


def scene_to_json(scene: Scene) -> list[dict[str, Any]]:
    """JSON form of a scene: ``[{"colour", "shape", "cell": [r, c], "offset": [oy, ox]}, ...]``."""
    return [
        {"colour": o.colour, "shape": o.shape, "cell": [o.cell[0], o.cell[1]], "offset": [o.oy, o.ox]}
        for o in scene
    ]


def scene_from_json(data: Sequence[dict[str, Any]]) -> Scene:
    """Inverse of :func:`scene_to_json`; validates the scene (see :func:`make_scene`). A v1 object (with
    ``jitter`` instead of ``offset``) is refused: its pixels follow another contract."""
    objs = []
    for d in data:
        if "jitter" in d and "offset" not in d:
            raise ValueError(f"a ShapesWorld v1 object (it has 'jitter', not 'offset'): {dict(d)}")
        oy, ox = d.get("offset", (0, 0))
        r, c = d["cell"]
        objs.append(ShapeObject(str(d["colour"]), str(d["shape"]), (int(r), int(c)), int(oy), int(ox)))
    return make_scene(objs)


def max_offsets(width: int, height: int) -> tuple[int, int]:
    """The largest allowed ``(oy, ox)`` on a ``width x height`` canvas: a cell of ``H/3`` (``W/3``) px
    leaves ``(H/3 - 16) / 8`` steps of placement (0 for 16 px, 1 for 24 px)."""
    return (height // 3 - BOX) // STEP, (width // 3 - BOX) // STEP


def check_size(width: int, height: int) -> None:
    """Fail unless ``width x height`` is one of the spec's canvases (:data:`SIZES`)."""
    if (width, height) not in SIZES:
        valid = ", ".join(f"{w}x{h}" for w, h in SIZES)
        raise ValueError(f"ShapesWorld v2 canvases are {valid}; got {width}x{height}")


def random_scene(
    rng: np.random.Generator, n_objects: int | None = None, size: tuple[int, int] = (48, 48)
) -> Scene:
    """Draw a scene for a ``size = (width, height)`` canvas: ``n_objects`` (uniform in 1..3 when None)
    objects with distinct cells and shapes, colours uniform with repetition allowed, each allowed offset
    uniform (on 48x48 every offset is (0, 0))."""
    n = int(rng.integers(1, 4)) if n_objects is None else int(n_objects)
    max_oy, max_ox = max_offsets(*size)
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be in 1..3, got {n}")
    # permutation + one vectorised integers() call: several times faster than choice(replace=False),
    # which matters because the shard writer draws a scene per sample.
    cells = rng.permutation(len(CELLS))[:n]
    shapes = rng.permutation(len(SHAPE_KEYS))[:n]
    attrs = rng.integers([0, 0, 0], [len(COLOUR_KEYS), max_oy + 1, max_ox + 1], size=(n, 3))
    objs = [
        ShapeObject(COLOUR_KEYS[a[0]], SHAPE_KEYS[s], CELLS[c], a[1], a[2])
        for c, s, a in zip(cells.tolist(), shapes.tolist(), attrs.tolist(), strict=True)
    ]
    # Valid by construction, so only sort (make_scene would re-validate).
    return tuple(sorted(objs, key=lambda o: o.cell))


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _shape_masks() -> dict[str, np.ndarray]:
    """Boolean 16x16 masks in box coordinates, pixel centres at +0.5 (spec "Objects" table). Rows and
    columns 0 and 15 stay white: a 1-px margin, so objects in neighbouring cells never touch."""
    iy, ix = np.mgrid[0:BOX, 0:BOX]
    y, x = iy + 0.5, ix + 0.5
    inner = (iy >= 1) & (iy <= BOX - 2) & (ix >= 1) & (ix <= BOX - 2)
    return {
        "square": inner,
        "circle": (y - 8) ** 2 + (x - 8) ** 2 <= 49,
        "triangle": inner & (np.abs(x - 8) <= y / 2),  # y already carries the +0.5
        "diamond": np.abs(x - 8) + np.abs(y - 8) <= 7,
    }


SHAPE_MASKS: dict[str, np.ndarray] = _shape_masks()
for _m in SHAPE_MASKS.values():
    _m.flags.writeable = False  # shared module-level constants


def box_origin(obj: ShapeObject, width: int, height: int) -> tuple[int, int]:
    """Top-left pixel ``(y, x)`` of ``obj``'s 16x16 box: ``(row*H/3 + 8*oy, col*W/3 + 8*ox)``.

    Fails when the canvas is not a spec size or the offset would leave the cell (a step on a 16-px cell).
    """
    check_size(width, height)
    max_oy, max_ox = max_offsets(width, height)
    if obj.oy > max_oy or obj.ox > max_ox:
        raise ValueError(
            f"offset {(obj.oy, obj.ox)} of the {obj.shape} leaves its cell on {width}x{height} "
            f"(at most {(max_oy, max_ox)})"
        )
    r, c = obj.cell
    return r * (height // 3) + STEP * obj.oy, c * (width // 3) + STEP * obj.ox


def cell_of_point(y: float, x: float, width: int, height: int) -> tuple[int, int]:
    """The cell whose float bounds ``[r*H/3, (r+1)*H/3) x [c*W/3, (c+1)*W/3)`` contain ``(y, x)``;
    points outside the canvas are clamped to the border cells."""
    r = min(2, max(0, int(np.floor(y * 3 / height))))
    c = min(2, max(0, int(np.floor(x * 3 / width))))
    return r, c


def render(scene: Scene, width: int, height: int) -> np.ndarray:
    """Render ``scene`` on a white ``width x height`` canvas; returns ``uint8 [height, width, 3]``.

    Pixel-exact per the spec: each object's 16x16 box has its top-left at :func:`box_origin` (always
    inside its cell, so boxes never overlap); the shape's mask pixels take the exact palette RGB.
    """
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    for o in scene:
        top, left = box_origin(o, width, height)
        img[top:top + BOX, left:left + BOX][SHAPE_MASKS[o.shape]] = COLOURS[o.colour].rgb
    return img


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")


def caption(scene: Scene, lang: str) -> str:
    """The caption of ``scene`` in ``lang`` exactly per the spec grammar.

    EN: ``a {colour} {shape} at the {position}`` per object in reading order, joined with ``, `` and
    `` and `` before the last (always "a", also before "orange": the spec fixes the article).
    ZH: ``{position}有一个{colour}{shape}`` per object, joined with ``，``.
    """
    _check_lang(lang)
    objs = sorted(scene, key=lambda o: o.cell)
    if lang == "en":
        parts = [f"a {COLOURS[o.colour].en} {SHAPES[o.shape].en} at the {POSITIONS[o.cell].en}" for o in objs]
        if len(parts) <= 1:
            return "".join(parts)
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return "，".join(f"{POSITIONS[o.cell].zh}有一个{COLOURS[o.colour].zh}{SHAPES[o.shape].zh}" for o in objs)


_FULL_STOPS = (".", "。")


def normalise_answer(text: str) -> str:
    """Scoring normal form: lower case, surrounding whitespace and one final full stop removed."""
    t = text.strip().lower()
    if t.endswith(_FULL_STOPS):
        t = t[:-1].rstrip()
    return t


def _alternation(words: Sequence[str]) -> str:
    # Longest first so that e.g. "top left" wins over "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_EN_COLOUR = {c.en: k for k, c in COLOURS.items()}
_EN_SHAPE = {s.en: k for k, s in SHAPES.items()}
_EN_POS = {p.en: cell for cell, p in POSITIONS.items()}
_ZH_COLOUR = {c.zh: k for k, c in COLOURS.items()}
_ZH_SHAPE = {s.zh: k for k, s in SHAPES.items()}
_ZH_POS = {p.zh: cell for cell, p in POSITIONS.items()}

_EN_ITEM = re.compile(
    rf"an? ({_alternation(list(_EN_COLOUR))}) ({_alternation(list(_EN_SHAPE))}) "
    rf"at the ({_alternation(list(_EN_POS))})"
)
_ZH_ITEM = re.compile(
    rf"({_alternation(list(_ZH_POS))})有一个({_alternation(list(_ZH_COLOUR))})({_alternation(list(_ZH_SHAPE))})"
)
# EN separators: ", ", " and ", and the Oxford ", and ".
_EN_SEP = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
_ZH_SEP = re.compile(r"\s*[，,、]\s*")


def parse_caption(text: str, lang: str) -> set[tuple[str, str, tuple[int, int]]] | None:
    """Parse a caption back into a set of ``(colour, shape, cell)``; the inverse of :func:`caption`.

    Tolerates case, surrounding and repeated whitespace, a final full stop (``.`` or ``。``), "an" for
    "a" and an Oxford comma. Returns None when any part does not parse, when the text is empty, or
    when an object is repeated (a set would silently hide the repetition).
    """
    _check_lang(lang)
    t = normalise_answer(text)
    if not t:
        return None
    if lang == "en":
        t = re.sub(r"\s+", " ", t)
        items = _EN_SEP.split(t)
        pattern, colours, shapes, positions = _EN_ITEM, _EN_COLOUR, _EN_SHAPE, _EN_POS
    else:
        items = _ZH_SEP.split(t)
        pattern, colours, shapes, positions = _ZH_ITEM, _ZH_COLOUR, _ZH_SHAPE, _ZH_POS
    out: set[tuple[str, str, tuple[int, int]]] = set()
    for item in items:
        item = item.strip()
        m = pattern.fullmatch(item)
        if m is None:
            return None
        if lang == "en":
            triple = (colours[m.group(1)], shapes[m.group(2)], positions[m.group(3)])
        else:
            triple = (colours[m.group(2)], shapes[m.group(3)], positions[m.group(1)])
        if triple in out:
            return None
        out.add(triple)
    return out


def scene_triples(scene: Scene) -> frozenset[tuple[str, str, tuple[int, int]]]:
    """The scene as the set of ``(colour, shape, cell)`` (offset dropped) — what captions and the
    detector can see."""
    return frozenset((o.colour, o.shape, (int(o.cell[0]), int(o.cell[1]))) for o in scene)


# --------------------------------------------------------------------------------------------------
# Understanding
# --------------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def make_question(scene: Scene, qtype: str, lang: str, rng: np.random.Generator) -> tuple[str, str]:
    """A ``(question, answer)`` pair of type ``qtype`` about ``scene`` in ``lang`` (spec table).

    The object asked about (colour, shape, position types) is drawn uniformly from the scene.
    """
    _check_lang(lang)
    en = lang == "en"
    if qtype == "colour":
        o = _pick(rng, scene)
        s = SHAPES[o.shape]
        q = f"What color is the {s.en}?" if en else f"{s.zh}是什么颜色？"
        return q, COLOURS[o.colour].en if en else COLOURS[o.colour].zh
    if qtype == "shape":
        o = _pick(rng, scene)
        p = POSITIONS[o.cell]
        q = f"What shape is at the {p.en}?" if en else f"{p.zh}是什么形状？"
        return q, SHAPES[o.shape].en if en else SHAPES[o.shape].zh
    if qtype == "count":
        return ("How many shapes are there?" if en else "图中有几个图形？"), str(len(scene))
    if qtype == "position":
        o = _pick(rng, scene)
        s = SHAPES[o.shape]
        q = f"Where is the {s.en}?" if en else f"{s.zh}在哪里？"
        return q, POSITIONS[o.cell].en if en else POSITIONS[o.cell].zh
    if qtype == "caption":
        return ("Describe the image." if en else "描述这张图片。"), caption(scene, lang)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")


def answer_correct(pred: str, expected: str, qtype: str, lang: str, scene: Scene | None = None) -> bool:
    """Score one answer per the spec: exact match after :func:`normalise_answer`.

    For ``qtype == "caption"`` both sides are compared as parsed scenes: ``pred`` is parsed with
    :func:`parse_caption` and compared with ``scene`` when given, else with the parsed ``expected``.
    An unparsable prediction is wrong.
    """
    _check_lang(lang)
    if qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    if qtype != "caption":
        return normalise_answer(pred) == normalise_answer(expected)
    got = parse_caption(pred, lang)
    if got is None:
        return False
    want = scene_triples(scene) if scene is not None else parse_caption(expected, lang)
    return want is not None and got == want


# --------------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------------


def _fresh_offset(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    max_oy, max_ox = max_offsets(*size)
    oy, ox = rng.integers([0, 0], [max_oy + 1, max_ox + 1])
    return int(oy), int(ox)


def check_edit_ops(ops: Sequence[str]) -> tuple[str, ...]:
    """``ops`` as a tuple; fails in one line when it is empty or names an op not in :data:`EDIT_OPS`."""
    ops = tuple(ops)
    bad = [op for op in ops if op not in EDIT_OPS]
    if not ops or bad:
        raise ValueError(f"edit ops {list(ops)}: expected a non-empty list of {list(EDIT_OPS)}")
    return ops


def valid_edit_ops(scene: Scene) -> list[str]:
    """The ops of :data:`EDIT_OPS` that the spec's validity rules allow on ``scene``."""
    ops = ["recolor"]  # a different colour always exists
    if len(scene) >= 2:
        ops.append("remove")
    if len(scene) <= 2:
        ops.append("add")  # <= 2 objects leaves an absent shape and an empty cell
    ops.append("move")  # <= 3 objects in 9 cells leaves an empty target cell
    return ops


def make_edit(
    scene: Scene, op: str, lang: str, rng: np.random.Generator, size: tuple[int, int] = (48, 48)
) -> tuple[str, Scene] | None:
    """An ``(instruction, target_scene)`` applying ``op`` to ``scene``, or None when ``op`` is invalid.

    Validity (spec): recolor - the new colour differs (always possible); remove - 2+ objects;
    add - the shape is absent, the cell empty, at most 2 objects before; move - the target cell is
    empty. Unchanged and recoloured objects keep their exact offset (hence pixels); moved and added
    objects get a fresh offset allowed on ``size = (width, height)``. The named object, new colour, shape
    and cell are drawn from ``rng``.
    """
    _check_lang(lang)
    en = lang == "en"
    if op not in EDIT_OPS:
        raise ValueError(f"unknown edit op {op!r}; expected one of {EDIT_OPS}")
    if op not in valid_edit_ops(scene):
        return None
    occupied = {o.cell for o in scene}
    empty = [c for c in CELLS if c not in occupied]
    if op == "recolor":
        i = int(rng.integers(len(scene)))
        o = scene[i]
        colour = _pick(rng, [c for c in COLOUR_KEYS if c != o.colour])
        target = scene[:i] + (replace(o, colour=colour),) + scene[i + 1:]
        s, c = SHAPES[o.shape], COLOURS[colour]
        instr = f"Change the {s.en} to {c.en}." if en else f"把{s.zh}变成{c.zh}。"
        return instr, make_scene(target)
    if op == "remove":
        i = int(rng.integers(len(scene)))
        s = SHAPES[scene[i].shape]
        instr = f"Remove the {s.en}." if en else f"删除{s.zh}。"
        return instr, make_scene(scene[:i] + scene[i + 1:])
    if op == "add":
        present = {o.shape for o in scene}
        shape = _pick(rng, [k for k in SHAPE_KEYS if k not in present])
        cell = _pick(rng, empty)
        colour = _pick(rng, COLOUR_KEYS)
        oy, ox = _fresh_offset(rng, size)
        s, c, p = SHAPES[shape], COLOURS[colour], POSITIONS[cell]
        instr = f"Add a {c.en} {s.en} at the {p.en}." if en else f"在{p.zh}添加一个{c.zh}{s.zh}。"
        return instr, make_scene(scene + (ShapeObject(colour, shape, cell, oy, ox),))
    # move
    i = int(rng.integers(len(scene)))
    o = scene[i]
    cell = _pick(rng, empty)
    oy, ox = _fresh_offset(rng, size)
    s, p = SHAPES[o.shape], POSITIONS[cell]
    instr = f"Move the {s.en} to the {p.en}." if en else f"把{s.zh}移到{p.zh}。"
    return instr, make_scene(scene[:i] + (replace(o, cell=cell, oy=oy, ox=ox),) + scene[i + 1:])


def random_edit(
    scene: Scene, lang: str, rng: np.random.Generator, size: tuple[int, int] = (48, 48)
) -> tuple[str, str, Scene]:
    """Pick an op uniformly among the valid ones and apply it: returns ``(op, instruction, target)``."""
    op = _pick(rng, valid_edit_ops(scene))
    result = make_edit(scene, op, lang, rng, size)
    assert result is not None  # op was chosen among the valid ones
    return (op, *result)


# --------------------------------------------------------------------------------------------------
# Sample generators
# --------------------------------------------------------------------------------------------------

# Distinct stream ids per task so that t2i sample i and und sample i use unrelated randomness.
_TASK_STREAM = {"t2i": 1, "und": 2, "edit": 3}


def _sample_rng(seed: int, task: str, index: int) -> np.random.Generator:
    # One generator per sample, keyed by (seed, task, index): sample i does not depend on n, so a
    # shorter run is a prefix of a longer one and shards could be written in any order.
    return np.random.default_rng([int(seed), _TASK_STREAM[task], int(index)])


def _lang_size(index: int) -> tuple[str, tuple[int, int]]:
    # Language alternates; size cycles every two samples, so each (lang, size) pair has a share of 1/6.
    return LANGS[index % 2], SIZES[(index // 2) % len(SIZES)]


def sample_key(task: str, seed: int, index: int) -> str:
    """Webdataset key of sample ``index`` (no dots: webdataset splits keys at the first dot)."""
    return f"shapes-{task}-s{int(seed)}-{int(index):08d}"


def t2i_samples(n: int, seed: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """Text-to-image samples ``start .. start+n-1``, deterministic in ``seed``; sample ``i`` depends
    only on ``(seed, i)``, so ranges can be generated independently (e.g. one shard per process).

    Each dict: ``key``, ``lang``, ``size`` (w, h), ``scene``, ``caption``, ``image`` (uint8 [H, W, 3]).
    Languages alternate, sizes cycle, object counts are uniform in 1..3.
    """
    for i in range(start, start + n):
        rng = _sample_rng(seed, "t2i", i)
        lang, (w, h) = _lang_size(i)
        scene = random_scene(rng, size=(w, h))
        yield {
            "key": sample_key("t2i", seed, i), "lang": lang, "size": (w, h), "scene": scene,
            "caption": caption(scene, lang), "image": render(scene, w, h),
        }


def und_samples(n: int, seed: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """Understanding samples ``start .. start+n-1``, deterministic in ``seed`` (see :func:`t2i_samples`).

    Each dict: ``key``, ``lang``, ``size``, ``scene``, ``qtype``, ``question``, ``answer``, ``image``.
    Question types cycle every 6 samples, so every (lang, size, qtype) triple is equally frequent.
    """
    for i in range(start, start + n):
        rng = _sample_rng(seed, "und", i)
        lang, (w, h) = _lang_size(i)
        qtype = QTYPES[(i // 6) % len(QTYPES)]
        scene = random_scene(rng, size=(w, h))
        q, a = make_question(scene, qtype, lang, rng)
        yield {
            "key": sample_key("und", seed, i), "lang": lang, "size": (w, h), "scene": scene,
            "qtype": qtype, "question": q, "answer": a, "image": render(scene, w, h),
        }


def edit_samples(
    n: int, seed: int, start: int = 0, ops: Sequence[str] = EDIT_OPS
) -> Iterator[dict[str, Any]]:
    """Editing samples ``start .. start+n-1``, deterministic in ``seed`` (see :func:`t2i_samples`).

    Each dict: ``key``, ``lang``, ``size``, ``scene``, ``op``, ``instruction``, ``target_scene``,
    ``src`` and ``tgt`` (uint8 [H, W, 3], same size). The op changes every 6 samples, going round
    ``ops`` (default :data:`EDIT_OPS`, balanced, as ShapesEval draws them; training shards may repeat an op
    to give it a larger share, e.g. ``("recolor", "recolor", "remove", "add", "move")``). The source
    scene is redrawn until the op is valid, i.e. it is uniform among scenes allowing the op.
    """
    ops = check_edit_ops(ops)
    for i in range(start, start + n):
        rng = _sample_rng(seed, "edit", i)
        lang, (w, h) = _lang_size(i)
        op = ops[(i // 6) % len(ops)]
        while True:
            scene = random_scene(rng, size=(w, h))
            result = make_edit(scene, op, lang, rng, (w, h))
            if result is not None:
                break
        instruction, target = result
        yield {
            "key": sample_key("edit", seed, i), "lang": lang, "size": (w, h), "scene": scene,
            "op": op, "instruction": instruction, "target_scene": target,
            "src": render(scene, w, h), "tgt": render(target, w, h),
        }


SAMPLE_GENERATORS = {"t2i": t2i_samples, "und": und_samples, "edit": edit_samples}
