"""``wallaroo.generate`` and ``wallaroo.evaluate`` on a small stage-4 weights directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shapes_world import ShapeObject, make_scene, render


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """Random tiny stage-4 weights (with VQ and tokenizer) as a weights directory."""
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel
    from wallaroo.tokens import tokenizer_for
    from wallaroo.vq import build_vq
    from wallaroo.weights import export_weights_dir

    torch.manual_seed(0)
    cfg = get_preset("tiny", edit=True)
    model = WallarooModel(cfg)
    tok, _ = tokenizer_for(cfg)
    out = tmp_path_factory.mktemp("ckpt") / "weights"
    return export_weights_dir(model, build_vq(cfg.vq), tok, cfg, out, stage="stages.Stage4")


@pytest.fixture(scope="module")
def source_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    scene = make_scene([ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "square", (1, 1))])
    Image.fromarray(render(scene, 72, 48)).save(path)
    return path


def test_generate_t2i_writes_images_and_settings(tiny_ckpt, tmp_path):
    from wallaroo.generate import main

    out = tmp_path / "t2i"
    main(["t2i", "--ckpt", str(tiny_ckpt), "--prompt", "a red circle at the top left", "--size", "72x48",
          "--num-images", "2", "--seed", "3", "--out", str(out)])  # fmt: skip
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (72, 48)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seed"] == 3 and settings["size"] == "72x48" and settings["sampling"]["cfg_scale"] == 3.0
    # Same settings, same images.
    again = tmp_path / "again"
    main(["t2i", "--ckpt", str(tiny_ckpt), "--prompt", "a red circle at the top left", "--size", "72x48",
          "--num-images", "2", "--seed", "3", "--out", str(again)])  # fmt: skip
    for a, b in zip(pngs, sorted(again.glob("*.png")), strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_generate_refuses_sizes_outside_the_buckets(tiny_ckpt, tmp_path):
    from wallaroo.generate import main

    with pytest.raises(ValueError, match="48x48, 72x48, 48x72"):
        main(["t2i", "--ckpt", str(tiny_ckpt), "--prompt", "x", "--size", "512x512", "--out", str(tmp_path)])


def test_generate_edit_and_understand(tiny_ckpt, source_png, tmp_path, capsys):
    from wallaroo.generate import main

    main(["edit", "--ckpt", str(tiny_ckpt), "--image", str(source_png), "--instruction", "Remove the circle.",
          "--out", str(tmp_path / "edit")])  # fmt: skip
    (edited,) = sorted((tmp_path / "edit").glob("*.png"))
    assert Image.open(edited).size == (72, 48)
    capsys.readouterr()
    main(["understand", "--ckpt", str(tiny_ckpt), "--image", str(source_png), "--question", "Describe the image.",
          "--max-new-tokens", "5", "--json"])  # fmt: skip
    record = json.loads(capsys.readouterr().out)
    assert record["question"] == "Describe the image." and isinstance(record["answer"], str)


def test_evaluate_shapes_writes_report(tiny_ckpt, tmp_path):
    from wallaroo.evaluate import main

    out = tmp_path / "eval"
    main(["shapes", "--ckpt", str(tiny_ckpt), "--out", str(out), "--samples", "6", "--batch-size", "6"])
    report = json.loads((out / "metrics.json").read_text())
    for key in ("t2i_accuracy", "und_accuracy", "edit_accuracy", "tokenizer_ceiling"):
        assert 0.0 <= report[key] <= 1.0
    assert report["seed"] == 1234 and report["samples_per_task"] == 6
    assert (out / "grid.png").exists() and (out / "failures.json").exists()
    # The CLI's defaults are ShapesEval's (what the demo scores with), and the report names them.
    from wallaroo.evaluate import SHAPES_SAMPLING

    assert {k: report["sampling"][k] for k in SHAPES_SAMPLING} == SHAPES_SAMPLING
    assert report["sampling"]["top_k"] == 1 and report["sampling"]["cfg_scale"] == 1.0  # greedy, no guidance (v2)


def test_evaluate_geneval_dpg_imgedit_layouts(tiny_ckpt, source_png, tmp_path):
    from wallaroo.evaluate import main

    meta = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"},
            {"tag": "two_object", "include": [], "prompt": "a blue square and a red circle"}]  # fmt: skip
    prompts = tmp_path / "evaluation_metadata.jsonl"
    prompts.write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    out = tmp_path / "geneval"
    args = ["geneval", "--ckpt", str(tiny_ckpt), "--prompts", str(prompts), "--out", str(out), "--size", "48x48",
            "--num-images", "2"]  # fmt: skip
    main(args)
    for i, m in enumerate(meta):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == m
        assert sorted(p.name for p in (folder / "samples").glob("*.png")) == ["0000.png", "0001.png"]
    stamp = (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    main(args)  # resumable: finished prompts are skipped
    assert (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == stamp

    csv = tmp_path / "dpg_bench.csv"
    csv.write_text("item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,"
                   "question_natural_language\nitem1,a red circle,,1,0,entity,whole,x,q?\n"
                   "item1,a red circle,,2,0,entity,whole,x,q2?\n")  # fmt: skip
    main(["dpg", "--ckpt", str(tiny_ckpt), "--prompts", str(csv), "--out", str(tmp_path / "dpg"), "--size", "48x48"])
    assert Image.open(tmp_path / "dpg" / "item1.png").size == (96, 96)  # a 2x2 grid of 48x48 tiles

    edits = tmp_path / "basic_edit.json"
    edits.write_text(json.dumps({"7": {"id": source_png.name, "prompt": "Remove the circle.", "edit_type": "remove"}}))
    main(["imgedit", "--ckpt", str(tiny_ckpt), "--edits", str(edits), "--images", str(source_png.parent),
          "--out", str(tmp_path / "imgedit")])  # fmt: skip
    assert Image.open(tmp_path / "imgedit" / "7.png").size == (72, 48)


def test_evaluate_fid_fails_clearly_without_weights(tmp_path):
    from wallaroo.evaluate import main

    for name in ("gen", "ref"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name / "a.png")
    with pytest.raises(SystemExit, match="inception|torch-fidelity|eval"):
        main(["fid", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref")])
