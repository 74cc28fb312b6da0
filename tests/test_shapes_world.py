"""ShapesWorld v2 contract tests (shared/specs/shapes-world.md): rendering, language, edits, samples, shards.

The rendering reference and the string templates below are written out independently of
``datamodules.shapes_world`` on purpose: the module must agree with the spec, not with itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from datamodules import shapes_world as sw
from datamodules.shapes import main as shapes_main
from datamodules.shapes import write_shapes_shards
from datamodules.shapes_world import ShapeObject, make_scene

# ---- the spec's tables, copied literally -----------------------------------------------------------
SPEC_RGB = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 40), "purple": (140, 60, 180), "orange": (240, 130, 30),
}
SPEC_COLOUR_ZH = {
    "red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
}
SPEC_SHAPE_ZH = {"square": "正方形", "circle": "圆形", "triangle": "三角形", "diamond": "菱形"}
SPEC_POS = {
    (0, 0): ("top left", "左上"), (0, 1): ("top", "上方"), (0, 2): ("top right", "右上"),
    (1, 0): ("left", "左侧"), (1, 1): ("center", "中间"), (1, 2): ("right", "右侧"),
    (2, 0): ("bottom left", "左下"), (2, 1): ("bottom", "下方"), (2, 2): ("bottom right", "右下"),
}
SPEC_SIZES = [(48, 48), (72, 48), (48, 72)]  # (width, height)


def reference_render(scene: tuple[ShapeObject, ...], width: int, height: int) -> np.ndarray:
    """Straightforward per-pixel rendering from the spec's formulas (box at the cell corner + 8 * offset)."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    for o in scene:
        row, col = o.cell
        top = row * height // 3 + 8 * o.oy
        left = col * width // 3 + 8 * o.ox
        for y in range(16):
            for x in range(16):
                Y, X = y + 0.5, x + 0.5
                in_box = 1 <= y <= 14 and 1 <= x <= 14
                if o.shape == "square":
                    inside = in_box
                elif o.shape == "circle":
                    inside = (Y - 8) ** 2 + (X - 8) ** 2 <= 49
                elif o.shape == "triangle":
                    inside = in_box and abs(X - 8) <= Y / 2
                elif o.shape == "diamond":
                    inside = abs(X - 8) + abs(Y - 8) <= 7
                else:
                    raise AssertionError(o.shape)
                if inside:
                    img[top + y, left + x] = SPEC_RGB[o.colour]
    return img


def en_item(o: ShapeObject) -> str:
    return f"a {o.colour} {o.shape} at the {SPEC_POS[o.cell][0]}"


# ---- vocabulary and rendering ------------------------------------------------------------------------


def test_vocabulary_matches_spec() -> None:
    assert {k: c.rgb for k, c in sw.COLOURS.items()} == SPEC_RGB
    assert {k: c.en for k, c in sw.COLOURS.items()} == {k: k for k in SPEC_RGB}
    assert {k: c.zh for k, c in sw.COLOURS.items()} == SPEC_COLOUR_ZH
    assert {k: (s.en, s.zh) for k, s in sw.SHAPES.items()} == {k: (k, v) for k, v in SPEC_SHAPE_ZH.items()}
    assert {k: (p.en, p.zh) for k, p in sw.POSITIONS.items()} == SPEC_POS
    assert sw.SIZES == SPEC_SIZES


def test_shape_mask_pixel_counts() -> None:
    counts = {k: int(m.sum()) for k, m in sw.SHAPE_MASKS.items()}
    assert counts == {"square": 196, "circle": 156, "triangle": 112, "diamond": 112}
    tri = sw.SHAPE_MASKS["triangle"]
    assert tri[1].sum() == 2 and tri[14, 1:15].all()  # apex up, widest row at the bottom
    for m in sw.SHAPE_MASKS.values():  # the 1-px white margin
        assert not m[0].any() and not m[15].any() and not m[:, 0].any() and not m[:, 15].any()


def test_box_origins_and_allowed_offsets() -> None:
    assert sw.max_offsets(48, 48) == (0, 0)
    assert sw.max_offsets(72, 48) == (0, 1)  # wide: 24-px columns
    assert sw.max_offsets(48, 72) == (1, 0)  # tall: 24-px rows
    assert sw.box_origin(ShapeObject("red", "square", (2, 2)), 48, 48) == (32, 32)
    assert sw.box_origin(ShapeObject("red", "square", (1, 2), 0, 1), 72, 48) == (16, 56)
    assert sw.box_origin(ShapeObject("red", "square", (2, 0), 1, 0), 48, 72) == (56, 0)
    with pytest.raises(ValueError, match="leaves its cell"):
        sw.render((ShapeObject("red", "square", (0, 0), 0, 1),), 48, 48)
    with pytest.raises(ValueError, match="48x48, 72x48, 48x72"):
        sw.render((ShapeObject("red", "square", (0, 0)),), 64, 64)
    # every box is on the 8-px code grid
    rng = np.random.default_rng(3)
    for i in range(300):
        w, h = SPEC_SIZES[i % 3]
        for o in sw.random_scene(rng, size=(w, h)):
            top, left = sw.box_origin(o, w, h)
            assert top % 8 == 0 and left % 8 == 0


@pytest.mark.parametrize("size", SPEC_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_render_matches_reference_pixel_for_pixel(size: tuple[int, int]) -> None:
    w, h = size
    rng = np.random.default_rng(1234 + w * 7 + h)
    scenes = [sw.random_scene(rng, size=size) for _ in range(300)]
    # Every shape in every cell at every allowed offset, so box edges are exercised everywhere.
    max_oy, max_ox = sw.max_offsets(w, h)
    for shape in sw.SHAPE_KEYS:
        for cell in sw.CELLS:
            for oy in range(max_oy + 1):
                for ox in range(max_ox + 1):
                    scenes.append((ShapeObject("purple", shape, cell, oy, ox),))
    for scene in scenes:
        img = sw.render(scene, w, h)
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        np.testing.assert_array_equal(img, reference_render(scene, w, h), err_msg=str(scene))


def test_render_only_white_and_palette_and_no_overlap() -> None:
    rng = np.random.default_rng(5)
    allowed = {r * 65536 + g * 256 + b for r, g, b in [(255, 255, 255), *SPEC_RGB.values()]}
    for i in range(200):
        w, h = SPEC_SIZES[i % 3]
        scene = sw.random_scene(rng, 3, size=(w, h))
        img = sw.render(scene, w, h)
        packed = img.astype(np.int64) @ np.array([65536, 256, 1])
        assert set(np.unique(packed).tolist()) <= allowed
        # Distinct cells never overlap: the non-white pixel count is the sum of the mask sizes.
        assert int((img != 255).any(-1).sum()) == sum(int(sw.SHAPE_MASKS[o.shape].sum()) for o in scene)


def test_v2_has_97_distinct_code_patches() -> None:
    # The reason for v2: every 8x8 patch is white or one quadrant of one (colour, shape).
    rng = np.random.default_rng(8)
    patches = set()
    for i in range(3000):
        w, h = SPEC_SIZES[i % 3]
        img = sw.render(sw.random_scene(rng, size=(w, h)), w, h)
        patches |= {img[y:y + 8, x:x + 8].tobytes() for y in range(0, h, 8) for x in range(0, w, 8)}
    assert len(patches) == 1 + 6 * 4 * 4


# ---- scenes -------------------------------------------------------------------------------------------


def test_scene_rules_and_json_round_trip() -> None:
    rng = np.random.default_rng(0)
    counts = Counter()
    for _ in range(600):
        scene = sw.random_scene(rng)
        counts[len(scene)] += 1
        assert [o.cell for o in scene] == sorted(o.cell for o in scene)  # reading order
        assert len({o.cell for o in scene}) == len(scene) == len({o.shape for o in scene})
        assert all(o.oy == 0 and o.ox == 0 for o in scene)  # 48x48: no placement choice
        data = json.loads(json.dumps(sw.scene_to_json(scene)))
        assert sw.scene_from_json(data) == scene
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 150
    assert sw.scene_to_json((ShapeObject("red", "circle", (0, 2), 1, 0),)) == [
        {"colour": "red", "shape": "circle", "cell": [0, 2], "offset": [1, 0]}
    ]
    with pytest.raises(ValueError, match="v1"):
        sw.scene_from_json([{"colour": "red", "shape": "circle", "cell": [0, 2], "jitter": [1, 0]}])
    with pytest.raises(ValueError, match="offset out of range"):
        make_scene([ShapeObject("red", "circle", (0, 0), -1, 0)])
    with pytest.raises(ValueError):
        make_scene([ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "circle", (1, 1))])
    with pytest.raises(ValueError):
        make_scene([ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "square", (0, 0))])
    with pytest.raises(ValueError):
        make_scene([ShapeObject("pink", "circle", (0, 0))])
    with pytest.raises(ValueError):
        make_scene([])


# ---- captions -----------------------------------------------------------------------------------------

PINNED_CAPTIONS = [
    (
        [ShapeObject("blue", "square", (1, 1)), ShapeObject("red", "circle", (0, 0))],
        "a red circle at the top left and a blue square at the center",
        "左上有一个红色圆形，中间有一个蓝色正方形",
    ),
    (
        [ShapeObject("yellow", "diamond", (2, 2), 1, 0)],
        "a yellow diamond at the bottom right",
        "右下有一个黄色菱形",
    ),
    (
        [ShapeObject("orange", "square", (2, 0)), ShapeObject("green", "triangle", (0, 1)),
         ShapeObject("purple", "diamond", (1, 2))],
        "a green triangle at the top, a purple diamond at the right and a orange square at the bottom left",
        "上方有一个绿色三角形，右侧有一个紫色菱形，左下有一个橙色正方形",
    ),
]


@pytest.mark.parametrize("objects,en,zh", PINNED_CAPTIONS)
def test_pinned_captions(objects: list[ShapeObject], en: str, zh: str) -> None:
    scene = make_scene(objects)
    assert sw.caption(scene, "en") == en
    assert sw.caption(scene, "zh") == zh
    assert sw.parse_caption(en, "en") == set(sw.scene_triples(scene))
    assert sw.parse_caption(zh, "zh") == set(sw.scene_triples(scene))


def test_caption_grammar_on_random_scenes() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        scene = sw.random_scene(rng)
        items = [en_item(o) for o in scene]
        en = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        zh = "，".join(
            f"{SPEC_POS[o.cell][1]}有一个{SPEC_COLOUR_ZH[o.colour]}{SPEC_SHAPE_ZH[o.shape]}" for o in scene
        )
        assert sw.caption(scene, "en") == en
        assert sw.caption(scene, "zh") == zh


def test_parse_caption_inverts_caption_and_tolerates_format() -> None:
    rng = np.random.default_rng(12)
    for _ in range(300):
        scene = sw.random_scene(rng)
        want = set(sw.scene_triples(scene))
        for lang in ("en", "zh"):
            text = sw.caption(scene, lang)
            assert sw.parse_caption(text, lang) == want
            assert sw.parse_caption(f"  {text.upper()}.  ", lang) == want
            assert sw.parse_caption(text + "。", lang) == want
    s = set(sw.scene_triples(make_scene(PINNED_CAPTIONS[0][0])))
    assert sw.parse_caption("A Red Circle at the  top left and a blue square at the center.", "en") == s
    assert sw.parse_caption(" 左上有一个红色圆形，中间有一个蓝色正方形。", "zh") == s
    # unparsable -> None
    for bad in ["", "a red circle", "a pink circle at the top left", "a red circle at the middle",
                "a red circle at the top left and", "red circle at the top left",
                "a red circle at the top left and a red circle at the top left"]:
        assert sw.parse_caption(bad, "en") is None, bad
    for bad in ["", "左上有一个红色", "左上有一个粉色圆形", "左上有一个红色圆形，", "中央有一个红色圆形"]:
        assert sw.parse_caption(bad, "zh") is None, bad


# ---- understanding ------------------------------------------------------------------------------------


def test_pinned_questions_single_object() -> None:
    scene = make_scene([ShapeObject("red", "circle", (0, 0), 1, 1)])
    rng = np.random.default_rng(0)
    expected = {
        ("colour", "en"): ("What color is the circle?", "red"),
        ("colour", "zh"): ("圆形是什么颜色？", "红色"),
        ("shape", "en"): ("What shape is at the top left?", "circle"),
        ("shape", "zh"): ("左上是什么形状？", "圆形"),
        ("count", "en"): ("How many shapes are there?", "1"),
        ("count", "zh"): ("图中有几个图形？", "1"),
        ("position", "en"): ("Where is the circle?", "top left"),
        ("position", "zh"): ("圆形在哪里？", "左上"),
        ("caption", "en"): ("Describe the image.", "a red circle at the top left"),
        ("caption", "zh"): ("描述这张图片。", "左上有一个红色圆形"),
    }
    for (qtype, lang), qa in expected.items():
        assert sw.make_question(scene, qtype, lang, rng) == qa


def test_questions_consistent_with_scene() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        scene = sw.random_scene(rng)
        by_shape = {o.shape: o for o in scene}
        by_cell = {o.cell: o for o in scene}
        for lang in ("en", "zh"):
            zh = lang == "zh"
            q, a = sw.make_question(scene, "colour", lang, rng)
            shape = re.fullmatch(r"(.+)是什么颜色？" if zh else r"What color is the (\w+)\?", q)[1]
            o = by_shape[shape if not zh else {v: k for k, v in SPEC_SHAPE_ZH.items()}[shape]]
            assert a == (SPEC_COLOUR_ZH[o.colour] if zh else o.colour)
            q, a = sw.make_question(scene, "shape", lang, rng)
            pos = re.fullmatch(r"(.+)是什么形状？" if zh else r"What shape is at the (.+)\?", q)[1]
            cell = next(c for c, p in SPEC_POS.items() if p[int(zh)] == pos)
            assert a == (SPEC_SHAPE_ZH[by_cell[cell].shape] if zh else by_cell[cell].shape)
            q, a = sw.make_question(scene, "position", lang, rng)
            shape = re.fullmatch(r"(.+)在哪里？" if zh else r"Where is the (\w+)\?", q)[1]
            o = by_shape[shape if not zh else {v: k for k, v in SPEC_SHAPE_ZH.items()}[shape]]
            assert a == SPEC_POS[o.cell][int(zh)]
            assert sw.make_question(scene, "count", lang, rng)[1] == str(len(scene))
            assert sw.make_question(scene, "caption", lang, rng)[1] == sw.caption(scene, lang)
    with pytest.raises(ValueError):
        sw.make_question(scene, "size", "en", rng)


def test_answer_scoring() -> None:
    scene = make_scene([ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "square", (1, 1))])
    ok = sw.answer_correct
    assert ok("red", "red", "colour", "en", scene)
    assert ok(" Red. ", "red", "colour", "en", scene)
    assert ok("RED", "red", "colour", "en", scene)
    assert not ok("blue", "red", "colour", "en", scene)
    assert not ok("red red", "red", "colour", "en", scene)
    assert ok("红色。", "红色", "colour", "zh", scene)
    assert ok("Top Left.", "top left", "position", "en", scene)
    assert ok("2", "2", "count", "en", scene) and not ok("3", "2", "count", "en", scene)
    # captions compare parsed scenes, not strings: order and format do not matter
    assert ok("a blue square at the center and a red circle at the top left.", sw.caption(scene, "en"),
              "caption", "en", scene)
    assert ok("中间有一个蓝色正方形，左上有一个红色圆形", sw.caption(scene, "zh"), "caption", "zh", scene)
    assert ok("a blue square at the center, a red circle at the top left", sw.caption(scene, "en"),
              "caption", "en")  # no scene: parse the expected caption
    assert not ok("a red circle at the top left", sw.caption(scene, "en"), "caption", "en", scene)
    assert not ok("a red circle at the top left and a blue square at the top", sw.caption(scene, "en"),
                  "caption", "en", scene)
    assert not ok("a picture of shapes", sw.caption(scene, "en"), "caption", "en", scene)


# ---- editing ------------------------------------------------------------------------------------------


def _instruction(op: str, lang: str, shape: str, colour: str = "", cell: tuple[int, int] = (0, 0)) -> str:
    """The spec's edit templates, written out independently."""
    pos_en, pos_zh = SPEC_POS[cell]
    if lang == "en":
        return {
            "recolor": f"Change the {shape} to {colour}.",
            "remove": f"Remove the {shape}.",
            "add": f"Add a {colour} {shape} at the {pos_en}.",
            "move": f"Move the {shape} to the {pos_en}.",
        }[op]
    s, c = SPEC_SHAPE_ZH[shape], SPEC_COLOUR_ZH.get(colour, "")
    return {
        "recolor": f"把{s}变成{c}。",
        "remove": f"删除{s}。",
        "add": f"在{pos_zh}添加一个{c}{s}。",
        "move": f"把{s}移到{pos_zh}。",
    }[op]


def _check_edit(scene: tuple[ShapeObject, ...], op: str, lang: str, instr: str,
                target: tuple[ShapeObject, ...], size: tuple[int, int] = (72, 48)) -> None:
    """Check one edit against the spec: validity, unchanged objects kept exactly, the instruction."""
    src_by_shape = {o.shape: o for o in scene}
    tgt_by_shape = {o.shape: o for o in target}
    shapes = src_by_shape.keys() | tgt_by_shape.keys()
    changed = {s for s in shapes if src_by_shape.get(s) != tgt_by_shape.get(s)}
    assert len(changed) == 1, (scene, target)
    shape = changed.pop()
    a, b = src_by_shape.get(shape), tgt_by_shape.get(shape)
    if op == "recolor":
        assert a and b and a.colour != b.colour and (a.cell, a.oy, a.ox) == (b.cell, b.oy, b.ox)
        assert instr == _instruction(op, lang, shape, b.colour)
    elif op == "remove":
        assert a and b is None and len(scene) >= 2
        assert instr == _instruction(op, lang, shape)
    elif op == "add":
        assert a is None and b and len(scene) <= 2 and b.cell not in {o.cell for o in scene}
        assert instr == _instruction(op, lang, shape, b.colour, b.cell)
    elif op == "move":
        assert a and b and a.colour == b.colour and b.cell not in {o.cell for o in scene}
        assert instr == _instruction(op, lang, shape, cell=b.cell)
    make_scene(target)  # the target is a valid scene
    # Objects not named keep their exact pixels.
    w, h = size
    src, tgt = sw.render(scene, w, h), sw.render(target, w, h)
    for o in scene:
        if o.shape != shape:
            top, left = sw.box_origin(o, w, h)
            box = np.s_[top:top + 16, left:left + 16]
            np.testing.assert_array_equal(src[box], tgt[box])


def test_pinned_edit_instructions() -> None:
    rng = np.random.default_rng(0)
    two = make_scene([ShapeObject("red", "circle", (0, 0), 0, 1),
                      ShapeObject("blue", "square", (1, 1), 0, 0)])
    instr, target = sw.make_edit(two, "remove", "en", rng)
    assert instr in {"Remove the circle.", "Remove the square."}
    instr, target = sw.make_edit(two, "remove", "zh", rng)
    assert instr in {"删除圆形。", "删除正方形。"}
    one = make_scene([ShapeObject("red", "circle", (0, 0), 0, 1)])
    instr, target = sw.make_edit(one, "recolor", "en", rng)
    assert re.fullmatch(r"Change the circle to (green|blue|yellow|purple|orange)\.", instr)
    instr, target = sw.make_edit(one, "move", "zh", rng)
    assert re.fullmatch(r"把圆形移到(上方|右上|左侧|中间|右侧|左下|下方|右下)。", instr)
    instr, target = sw.make_edit(one, "add", "en", rng)
    assert re.fullmatch(r"Add a \w+ (square|triangle|diamond) at the (top|top right|left|center|right|"
                        r"bottom left|bottom|bottom right)\.", instr)


def test_edit_validity_rules() -> None:
    rng = np.random.default_rng(21)
    one = make_scene([ShapeObject("red", "circle", (0, 0))])
    three = make_scene([ShapeObject("red", "circle", (0, 0)), ShapeObject("red", "square", (1, 1)),
                        ShapeObject("red", "diamond", (2, 2))])
    assert sw.make_edit(one, "remove", "en", rng) is None
    assert sw.make_edit(three, "add", "zh", rng) is None
    assert sw.valid_edit_ops(one) == ["recolor", "add", "move"]
    assert sw.valid_edit_ops(three) == ["recolor", "remove", "move"]
    with pytest.raises(ValueError):
        sw.make_edit(one, "rotate", "en", rng)
    seen = Counter()
    for i in range(300):
        size = SPEC_SIZES[i % 3]
        scene = sw.random_scene(rng, size=size)
        for op in sw.EDIT_OPS:
            for lang in ("en", "zh"):
                result = sw.make_edit(scene, op, lang, rng, size)
                if result is None:
                    assert (op == "remove" and len(scene) == 1) or (op == "add" and len(scene) == 3)
                    continue
                seen[op] += 1
                _check_edit(scene, op, lang, *result, size=size)
    assert set(seen) == set(sw.EDIT_OPS)


@pytest.mark.parametrize("size,offsets", [((48, 48), {(0, 0)}), ((72, 48), {(0, 0), (0, 1)}),
                                          ((48, 72), {(0, 0), (1, 0)})])
def test_moved_and_added_objects_get_fresh_offsets(size, offsets) -> None:
    rng = np.random.default_rng(8)
    seen = set()
    scene = make_scene([ShapeObject("red", "circle", (0, 0))])
    for _ in range(100):
        for op in ("move", "add"):
            _, target = sw.make_edit(scene, op, "en", rng, size)
            seen |= {(o.oy, o.ox) for o in target if o != scene[0]}
            sw.render(target, *size)  # every fresh offset fits the canvas
    assert seen == offsets  # every allowed offset occurs, and no other


def test_random_edit_uniform_over_valid_ops() -> None:
    rng = np.random.default_rng(4)
    valid = [(1, {"recolor", "add", "move"}), (2, set(sw.EDIT_OPS)), (3, {"recolor", "remove", "move"})]
    for n, ops in valid:
        counts = Counter()
        for i in range(800):
            size = SPEC_SIZES[i % 3]
            scene = sw.random_scene(rng, n, size=size)
            op, instr, target = sw.random_edit(scene, "en", rng, size)
            _check_edit(scene, op, "en", instr, target, size)
            counts[op] += 1
        assert set(counts) == ops
        assert min(counts.values()) > 800 / len(ops) * 0.8


# ---- sample generators --------------------------------------------------------------------------------


def _strip(sample: dict) -> dict:
    return {k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in sample.items()}


@pytest.mark.parametrize("gen", [sw.t2i_samples, sw.und_samples, sw.edit_samples])
def test_generators_deterministic_by_seed(gen) -> None:
    a = [_strip(s) for s in gen(40, 7)]
    b = [_strip(s) for s in gen(40, 7)]
    c = [_strip(s) for s in gen(40, 8)]
    assert a == b
    assert a != c
    assert [_strip(s) for s in gen(10, 7, start=25)] == a[25:35]  # sample i depends on (seed, i) only
    assert len({s["key"] for s in a}) == 40 and all("." not in s["key"] for s in a)


def test_generators_balanced_and_consistent() -> None:
    n = 600
    t2i = list(sw.t2i_samples(n, 1))
    und = list(sw.und_samples(n, 1))
    edit = list(sw.edit_samples(n, 1))
    for samples in (t2i, und, edit):
        assert Counter(s["lang"] for s in samples) == {"en": n // 2, "zh": n // 2}
        assert Counter(s["size"] for s in samples) == {size: n // 3 for size in SPEC_SIZES}
        assert len(Counter((s["lang"], s["size"]) for s in samples)) == 6
    assert Counter(s["qtype"] for s in und) == {q: n // 5 for q in sw.QTYPES}
    assert len(Counter((s["qtype"], s["lang"]) for s in und)) == 10
    assert Counter(s["op"] for s in edit) == {op: n // 4 for op in sw.EDIT_OPS}
    counts = Counter(len(s["scene"]) for s in t2i)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > n / 3 * 0.75
    for i, s in enumerate(t2i):
        w, h = s["size"]
        assert s["caption"] == sw.caption(s["scene"], s["lang"])
        assert s["image"].shape == (h, w, 3)
        if i < 30:  # the reference is slow; the render tests cover the rest
            np.testing.assert_array_equal(s["image"], reference_render(s["scene"], w, h))
    for s in und:
        assert sw.answer_correct(s["answer"], s["answer"], s["qtype"], s["lang"], s["scene"])
        assert s["image"].shape == (s["size"][1], s["size"][0], 3)
    for s in edit:
        _check_edit(s["scene"], s["op"], s["lang"], s["instruction"], s["target_scene"], s["size"])
        w, h = s["size"]
        assert s["src"].shape == s["tgt"].shape == (h, w, 3)
        np.testing.assert_array_equal(s["tgt"], sw.render(s["target_scene"], w, h))


# ---- shard writer -------------------------------------------------------------------------------------


def _read(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))


def test_shard_writer_round_trip(tmp_path: Path) -> None:
    n, seed = 25, 3
    manifest = write_shapes_shards(tmp_path, n, seed, ["t2i", "und", "edit"], shard_size=10, workers=1)
    assert manifest["counts"] == {"t2i": n, "und": n, "edit": n}
    assert manifest["seed"] == seed and manifest["spec_version"] == sw.SPEC_VERSION
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    for task in ("t2i", "und", "edit"):
        assert manifest["shards"][task] == [f"{task}/shard-{k:06d}.tar" for k in range(3)]
        assert sorted(p.name for p in (tmp_path / task).iterdir()) == [f"shard-{k:06d}.tar" for k in range(3)]

    urls = lambda task: [str(tmp_path / p) for p in manifest["shards"][task]]  # noqa: E731

    got = _read(urls("t2i"))
    want = list(sw.t2i_samples(n, seed))
    assert [g["__key__"] for g in got] == [s["key"] for s in want]
    for g, s in zip(got, want, strict=True):
        assert set(g) - {"__url__", "__local_path__"} == {"__key__", "png", "json"}
        lang = s["lang"]
        assert g["json"] == {f"caption_{lang}": s["caption"], "lang": lang,
                             "scene": sw.scene_to_json(s["scene"]), "size": list(s["size"]),
                             "spec": sw.SPEC_VERSION}
        np.testing.assert_array_equal(g["png"], s["image"])
        assert sw.scene_from_json(g["json"]["scene"]) == s["scene"]

    got = _read(urls("und"))
    want = list(sw.und_samples(n, seed))
    for g, s in zip(got, want, strict=True):
        assert set(g) - {"__url__", "__local_path__"} == {"__key__", "0.png", "json"}
        conv = g["json"]["conversations"]
        assert conv == [{"role": "user", "content": "<image>\n" + s["question"]},
                        {"role": "assistant", "content": s["answer"]}]
        assert sum(turn["content"].count("<image>") for turn in conv) == 1  # one placeholder per image
        assert {k: g["json"][k] for k in ("lang", "qtype", "size")} == {
            "lang": s["lang"], "qtype": s["qtype"], "size": list(s["size"])}
        np.testing.assert_array_equal(g["0.png"], s["image"])

    got = _read(urls("edit"))
    want = list(sw.edit_samples(n, seed))
    for g, s in zip(got, want, strict=True):
        assert set(g) - {"__url__", "__local_path__"} == {"__key__", "src.png", "tgt.png", "json"}
        lang = s["lang"]
        assert g["json"] == {f"instruction_{lang}": s["instruction"], "lang": lang, "op": s["op"],
                             "scene": sw.scene_to_json(s["scene"]),
                             "target_scene": sw.scene_to_json(s["target_scene"]), "size": list(s["size"]),
                             "spec": sw.SPEC_VERSION}
        np.testing.assert_array_equal(g["src.png"], s["src"])
        np.testing.assert_array_equal(g["tgt.png"], s["tgt"])


def test_shard_writer_deterministic_parallel_and_cli(tmp_path: Path, capsys) -> None:
    a = write_shapes_shards(tmp_path / "a", 12, 5, ["edit", "und"], shard_size=5, workers=1)
    b = write_shapes_shards(tmp_path / "b", 12, 5, ["edit", "und"], shard_size=5, workers=2)
    assert a == b
    for rel in a["shards"]["edit"] + a["shards"]["und"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    # Chinese text is stored as UTF-8, not \u escapes.
    zh = [g for g in _read([str(tmp_path / "a" / a["shards"]["edit"][0])]) if g["json"]["lang"] == "zh"]
    assert zh and "instruction_zh" in zh[0]["json"]
    # CLI; a rerun with fewer samples removes stale shards.
    m = shapes_main(["--out", str(tmp_path / "a"), "--samples", "4", "--seed", "5", "--tasks", "edit",
                     "--shard-size", "5", "--workers", "1"])
    assert m["counts"] == {"edit": 4} and "wrote" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "a" / "edit").iterdir()] == ["shard-000000.tar"]
    with pytest.raises(ValueError):
        write_shapes_shards(tmp_path / "c", 3, 0, ["vqa"])


def test_edit_op_cycle_sets_each_ops_share_and_is_recorded(tmp_path: Path) -> None:
    mix = ("recolor", "remove", "recolor", "move")
    n = 240  # 40 blocks of 6 samples, each block one op
    edit = list(sw.edit_samples(n, 4, ops=mix))
    assert Counter(s["op"] for s in edit) == {"recolor": 120, "remove": 60, "move": 60}
    for s in edit[:60]:
        _check_edit(s["scene"], s["op"], s["lang"], s["instruction"], s["target_scene"], s["size"])
    # Languages and sizes stay balanced; a sample depends on (seed, index, its op) only.
    assert Counter(s["lang"] for s in edit) == {"en": n // 2, "zh": n // 2}
    assert [_strip(s) for s in sw.edit_samples(6, 4, start=12, ops=mix)] == [_strip(s) for s in edit[12:18]]
    for bad in ((), ("recolor", "rotate")):
        with pytest.raises(ValueError, match="expected a non-empty list of"):
            list(sw.edit_samples(6, 4, ops=bad))
    m = shapes_main(["--out", str(tmp_path), "--samples", "12", "--tasks", "edit", "--shard-size", "12",
                     "--workers", "1", "--edit-ops", "move", "add"])
    assert m["edit_ops"] == ["move", "add"]
    assert [g["json"]["op"] for g in _read([str(tmp_path / m["shards"]["edit"][0])])] == ["move"] * 6 + ["add"] * 6
    assert write_shapes_shards(tmp_path, 1, 0, ["t2i"], workers=1)["edit_ops"] == list(sw.EDIT_OPS)
