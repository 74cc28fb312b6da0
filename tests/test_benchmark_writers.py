"""Benchmark writers produce the official layouts (GenEval, DPG-Bench, ImgEdit), resume, and report bad
inputs without stopping. Generation is a fake callable: images encode which prompt and sample they are."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metrics.benchmarks import (
    read_dpg_prompts,
    read_imgedit_items,
    run_dpg_bench,
    run_geneval,
    run_imgedit,
)


class FakeGenerator:
    """``generate(prompts, n)``: solid images whose red channel is the k-th sample and green a prompt id."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.calls: list[tuple[list[str], int]] = []
        self.ids: dict[str, int] = {}

    def __call__(self, prompts: list[str], n: int) -> list[Image.Image]:
        self.calls.append((list(prompts), n))
        out = []
        for p in prompts:
            pid = self.ids.setdefault(p, len(self.ids))
            for k in range(n):
                out.append(Image.new("RGB", (self.size, self.size), (10 * k, pid, 200)))
        return out


def _pixel(path: Path, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    with Image.open(path) as im:
        return im.convert("RGB").getpixel(xy)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# GenEval
# --------------------------------------------------------------------------------------------------

GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", '
    '"count": 3}], "prompt": "a photo of two clocks"}',
    '{"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], '
    '"prompt": "a photo of a red dog"}',
]


def _geneval_file(tmp_path: Path, lines: list[str]) -> Path:
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


def _geneval_scorer_view(out: Path) -> dict[str, list[str]]:
    """What GenEval's evaluation/evaluate_images.py visits: digit folders, json.load(metadata.jsonl), and
    samples/ files matching r"\\d+\\.png"."""
    seen = {}
    for sub in sorted(os.listdir(out)):
        folder = out / sub
        if not folder.is_dir() or not sub.isdigit():
            continue
        with open(folder / "metadata.jsonl") as fp:
            meta = json.load(fp)
        names = sorted(n for n in os.listdir(folder / "samples") if re.match(r"\d+\.png", n))
        seen[meta["prompt"]] = names
    return seen


def test_geneval_layout(tmp_path: Path) -> None:
    prompts = _geneval_file(tmp_path, GENEVAL_LINES)
    out = tmp_path / "out"
    gen = FakeGenerator()
    counts = run_geneval(prompts, out, gen, n_images=4)
    assert counts == {"written": 3, "skipped_existing": 0, "failed": 0, "failures": []}
    samples = [f"{i:05d}/samples/{k:04d}.png" for i in range(3) for k in range(4)]
    extra = [f"{i:05d}/{f}" for i in range(3) for f in ("metadata.jsonl", "grid.png")]
    assert _tree(out) == sorted(samples + extra)
    for i, line in enumerate(GENEVAL_LINES):
        assert (out / f"{i:05d}" / "metadata.jsonl").read_text(encoding="utf-8") == line + "\n"  # unchanged
        for k in range(4):
            assert _pixel(out / f"{i:05d}" / "samples" / f"{k:04d}.png") == (10 * k, i, 200)
    with Image.open(out / "00000" / "grid.png") as g:
        assert g.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 with 2 px padding
    assert _geneval_scorer_view(out) == {json.loads(line)["prompt"]: [f"{k:04d}.png" for k in range(4)]
                                         for line in GENEVAL_LINES}


def test_geneval_resumes_and_reports_bad_lines(tmp_path: Path) -> None:
    lines = [GENEVAL_LINES[0], "{not json", '{"tag": "x"}', GENEVAL_LINES[2]]
    prompts = _geneval_file(tmp_path, lines)
    out = tmp_path / "out"
    gen = FakeGenerator()
    first = run_geneval(prompts, out, gen, n_images=2, grid=False, prompts_per_call=2)
    assert (first["written"], first["skipped_existing"], first["failed"]) == (2, 0, 2)
    assert [f["id"] for f in first["failures"]] == ["00001", "00002"]
    assert gen.calls == [(["a photo of a bench", "a photo of a red dog"], 2)]
    # Bad lines keep their index: the fourth line is index 3.
    assert _tree(out) == [f"{i:05d}/{f}" for i in (0, 3) for f in ("metadata.jsonl", "samples/0000.png",
                                                                   "samples/0001.png")]

    again = run_geneval(prompts, out, gen, n_images=2, grid=False)
    assert (again["written"], again["skipped_existing"], again["failed"]) == (0, 2, 2)
    assert len(gen.calls) == 1  # nothing regenerated

    (out / "00003" / "samples" / "0001.png").unlink()  # an interrupted index is redone
    third = run_geneval(prompts, out, gen, n_images=2, grid=False)
    assert (third["written"], third["skipped_existing"]) == (1, 1)
    assert gen.calls[-1] == (["a photo of a red dog"], 2)
    # More samples requested than present: every index is incomplete.
    assert run_geneval(prompts, out, gen, n_images=3, grid=False)["written"] == 2


def test_geneval_sharding_and_bad_generator(tmp_path: Path) -> None:
    prompts = _geneval_file(tmp_path, GENEVAL_LINES)
    out = tmp_path / "out"
    a = run_geneval(prompts, out, FakeGenerator(), n_images=1, grid=False, shard=(0, 2))
    b = run_geneval(prompts, out, FakeGenerator(), n_images=1, grid=False, shard=(1, 2))
    assert (a["written"], b["written"]) == (2, 1)
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    with pytest.raises(ValueError, match="returned 1 images"):
        run_geneval(prompts, tmp_path / "o2", lambda p, n: [Image.new("RGB", (4, 4))], n_images=2)


# --------------------------------------------------------------------------------------------------
# DPG-Bench
# --------------------------------------------------------------------------------------------------

DPG_COLUMNS = ["item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
               "category_detailed", "tuple", "question_natural_language"]
DPG_TEXT = {
    "partiprompts1": 'A red truck, parked on "sandy" shores, at dusk.',
    "countbench7": "Three green apples on a wooden table.",
}


def _dpg_csv(tmp_path: Path) -> Path:
    f = tmp_path / "dpg_bench.csv"
    with open(f, "w", encoding="utf-8", newline="") as fp:
        w = csv.writer(fp)
        w.writerow(DPG_COLUMNS)
        for item, text in DPG_TEXT.items():
            for qid in (1, 2, 3):  # several question rows per item share the prompt text
                w.writerow([item, text, "kw", qid, "0" if qid == 1 else "1", "entity", "whole",
                            f"entity - whole (q{qid})", f"Is there q{qid}?"])
    return f


def test_dpg_layout_from_csv(tmp_path: Path) -> None:
    src = _dpg_csv(tmp_path)
    assert read_dpg_prompts(src) == DPG_TEXT
    out = tmp_path / "out"
    gen = FakeGenerator(size=20)  # resized to the tile size
    counts = run_dpg_bench(src, out, gen, tile_size=32)
    assert counts == {"written": 2, "skipped_existing": 0, "failed": 0, "failures": []}
    # Nothing else in OUT: the scorer treats every file there as an image.
    assert sorted(os.listdir(out)) == ["countbench7.png", "partiprompts1.png"]
    assert [c[0][0] for c in gen.calls] == list(DPG_TEXT.values())
    t = 32
    # The scorer's crops (left, upper, right, lower), in its order, hold samples 0..3.
    crops = [(0, 0, t, t), (t, 0, 2 * t, t), (0, t, t, 2 * t), (t, t, 2 * t, 2 * t)]
    for pid, item in enumerate(DPG_TEXT):
        with Image.open(out / f"{item}.png") as im:
            assert im.size == (2 * t, 2 * t)
            for k, box in enumerate(crops):
                tile = np.asarray(im.convert("RGB").crop(box))
                assert (tile == (10 * k, pid, 200)).all()
        assert (out / f"{item}.png").name.split(".")[0] == item  # the scorer's key

    again = run_dpg_bench(src, out, gen, tile_size=32)
    assert (again["written"], again["skipped_existing"]) == (0, 2) and len(gen.calls) == 2


def test_dpg_from_prompt_folder_and_bad_ids(tmp_path: Path) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "2.txt").write_text("a blue bird\n", encoding="utf-8")
    (folder / "1.txt").write_text("  a cat on a mat ", encoding="utf-8")
    (folder / "3.txt").write_text("", encoding="utf-8")
    assert read_dpg_prompts(folder) == {"1": "a cat on a mat", "2": "a blue bird", "3": ""}
    out = tmp_path / "out"
    counts = run_dpg_bench(folder, out, FakeGenerator(), tile_size=8, n_images=1)
    assert (counts["written"], counts["failed"]) == (2, 1) and counts["failures"][0]["id"] == "3"
    with Image.open(out / "1.png") as im:
        assert im.size == (16, 16)
        assert im.getpixel((0, 0)) == (0, 0, 200) and im.getpixel((12, 12)) == (255, 255, 255)

    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,text\nv1.5,a dotted id\n", encoding="utf-8")
    counts = run_dpg_bench(bad, tmp_path / "o2", FakeGenerator(), tile_size=8)
    assert counts["failed"] == 1 and "file name" in counts["failures"][0]["reason"]
    with pytest.raises(ValueError, match="item_id"):
        (tmp_path / "nocol.csv").write_text("id,prompt\n1,x\n", encoding="utf-8")
        read_dpg_prompts(tmp_path / "nocol.csv")


# --------------------------------------------------------------------------------------------------
# ImgEdit
# --------------------------------------------------------------------------------------------------


def _imgedit_setup(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "origin"
    (root / "animal").mkdir(parents=True)
    (root / "style").mkdir()
    Image.new("RGB", (12, 8), (10, 20, 30)).save(root / "animal" / "000342021.jpg", quality=95)
    Image.new("RGB", (6, 6), (200, 100, 50)).save(root / "style" / "000278574.png")
    (root / "style" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    items = {
        # the official basic_edit.json form: "id" is the source path relative to the image root
        "1082": {"id": "animal/000342021.jpg", "prompt": "Change the shell texture.", "edit_type": "alter"},
        # lenient variants
        "673": {"id": 673, "image_path": "style/000278574.png", "instruction": "Make it ukiyo-e.",
                "type": "style"},
        "17": {"id": "style/corrupt.jpg", "prompt": "Remove the cat.", "edit_type": "remove"},
        "18": {"id": "style/missing.jpg", "prompt": "Add a dog.", "edit_type": "add"},
        "19": {"id": "style/000278574.png", "edit_type": "add"},
    }
    f = tmp_path / "basic_edit.json"
    f.write_text(json.dumps(items, indent=4), encoding="utf-8")
    return f, root


def _invert(sources: list[Image.Image], instructions: list[str]) -> list[Image.Image]:
    assert len(sources) == len(instructions)
    return [Image.eval(s, lambda v: 255 - v) for s in sources]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def test_imgedit_layout_and_bad_sources(tmp_path: Path) -> None:
    edit_json, root = _imgedit_setup(tmp_path)
    assert list(read_imgedit_items(edit_json)) == ["1082", "673", "17", "18", "19"]
    out = tmp_path / "edited"
    counts = run_imgedit(edit_json, root, out, _invert, batch_size=2)
    assert (counts["written"], counts["skipped_existing"], counts["failed"]) == (2, 0, 3)
    reasons = {f["id"]: f["reason"] for f in counts["failures"]}
    assert "unreadable" in reasons["17"] and "not found" in reasons["18"] and "instruction" in reasons["19"]
    assert sorted(os.listdir(out)) == ["1082.png", "673.png", "results.jsonl"]
    with Image.open(out / "673.png") as im:  # <key>.png is what basic_bench.py opens
        assert im.size == (6, 6) and im.getpixel((0, 0)) == (55, 155, 205)
    with Image.open(out / "1082.png") as im:
        assert im.size == (12, 8)
    recs = {r["key"]: r for r in _records(out)}
    assert recs["1082"] == {"key": "1082", "source": "animal/000342021.jpg",
                            "prompt": "Change the shell texture.", "edit_type": "alter", "output": "1082.png",
                            "status": "written", "reason": None}
    assert recs["673"]["prompt"] == "Make it ukiyo-e." and recs["673"]["edit_type"] == "style"
    assert recs["17"]["status"] == recs["18"]["status"] == recs["19"]["status"] == "failed"

    calls: list[int] = []

    def counting(sources: list[Image.Image], instructions: list[str]) -> list[Image.Image]:
        calls.append(len(sources))
        return _invert(sources, instructions)

    again = run_imgedit(edit_json, root, out, counting)
    assert (again["written"], again["skipped_existing"], again["failed"]) == (0, 2, 3)
    assert calls == []  # finished keys are not re-edited; failing ones are reported again
    (root / "style" / "missing.jpg").write_bytes((root / "style" / "000278574.png").read_bytes())
    third = run_imgedit(edit_json, root, out, counting)
    assert (third["written"], third["skipped_existing"], third["failed"]) == (1, 2, 2) and calls == [1]
    assert (out / "18.png").is_file()
    assert len(_records(out)) == 5 + 3 + 3  # appended by each run


def test_imgedit_list_form_and_wrong_output_count(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "a.png")
    f = tmp_path / "edits.json"
    f.write_text(json.dumps([{"key": "k1", "src_img": "a.png", "prompt": "x"}]), encoding="utf-8")
    assert list(read_imgedit_items(f)) == ["k1"]
    with pytest.raises(ValueError, match="returned 0 images"):
        run_imgedit(f, root, tmp_path / "out", lambda s, i: [])
    assert not (tmp_path / "out" / "k1.png").exists()
