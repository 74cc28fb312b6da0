"""``python -m datamodules.convert``: real photos (shipped with scikit-image) through every converter into
shards, read back with webdataset and with the project's DataModule; corrupt inputs and resuming."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datamodules.convert import BAD_RECORD, CORRUPT, MISSING, NO_TEXT, TAG_MISMATCH, UNKNOWN_CLASS, main

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Photos as the converters meet them: PNG and JPEG files, an RGBA PNG (re-encoded), a greyscale
    JPEG, and a truncated JPEG (corrupt). Downscaled to keep the test fast; still real photos."""
    from skimage import data

    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i, name in enumerate(PHOTOS):
        img = Image.fromarray(np.asarray(getattr(data, name)()))
        img = img.resize((160, round(160 * img.height / img.width)))
        if i % 2 == 0:
            img.save(root / f"{name}.png")
        else:
            img.save(root / f"{name}.jpg", quality=90)
    Image.fromarray(np.asarray(data.logo())).resize((96, 96)).save(root / "sub" / "logo.png")
    Image.fromarray(np.asarray(data.camera())).resize((128, 128)).save(root / "camera.jpg")
    good = (root / "coffee.jpg").read_bytes()
    (root / "broken.jpg").write_bytes(good[: len(good) // 2])
    return root


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of the shards in ``out``, by key, via webdataset."""
    urls = sorted(str(p) for p in out.glob("*.tar"))
    assert urls, f"no shards in {out}"
    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in samples
        samples[s["__key__"]] = s
    return samples


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def digest(out: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(out.glob("*.tar"))
    }


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    )
    return path


def through_datamodule(out: Path, task: str, expected: int) -> None:
    """All samples build through the project's reader (validation pass reads each one once)."""
    try:
        from datamodules import WallarooDataModule
        from datamodules.datamodule import TaskData
    except ImportError as exn:  # pragma: no cover - depends on the DataModule being present
        pytest.skip(f"datamodules.WallarooDataModule is not available: {exn}")
    from wallaroo.config import get_preset

    data = TaskData(shards=str(out), val_shards=str(out), val_samples=100, batch_size=2, shuffle_buffer=0)
    dm = WallarooDataModule(**{task: data}, num_workers=0)
    dm.configure(get_preset("tiny"), [task])
    n = 0
    for batch in dm.val_dataloader():
        sub = batch[task]
        assert sub["input_ids"].shape[0] == sub["attention_mask"].shape[0]
        n += sub["input_ids"].shape[0]
    assert n == expected, "some converted samples were rejected by the reader"
    train = next(iter(dm.train_dataloader()))
    sub = train[0][task] if isinstance(train, tuple) else train[task]
    assert sub["input_ids"].ndim == 2


# ------------------------------------------------------------------------------------------------ t2i
def t2i_rows() -> list[object]:
    return [
        {
            "image": "astronaut.png",
            "caption_en": "an astronaut with a flag",
            "caption_zh": "一名宇航员和一面旗帜",
        },
        {"image": "coffee.jpg", "caption_zh": "一杯咖啡"},
        {"image": "chelsea.png", "caption": "a tabby cat"},
        {"image": "rocket.jpg", "text": "a rocket on the launch pad"},
        {"image": "sub/logo.png", "caption_en": "a logo"},
        {"image": "broken.jpg", "caption_en": "a truncated file"},
        {"image": "missing.jpg", "caption_en": "no such file"},
        {"image": "camera.jpg"},
        "{not json",
    ]


def test_t2i_round_trip_corrupt_and_resume(images, tmp_path):
    captions = write_jsonl(tmp_path / "captions.jsonl", t2i_rows())
    out = tmp_path / "t2i"
    args = ["t2i", "--images", str(images), "--captions", str(captions), "--out", str(out)]
    args += ["--shard-size", "2", "--quiet"]
    report = main(args)
    assert report["inputs"] == 9 and report["written"] == 5 and report["skipped"] == 4
    assert report["skipped_by_reason"] == {CORRUPT: 1, MISSING: 1, NO_TEXT: 1, BAD_RECORD: 1}
    assert json.loads((out / "convert_report.json").read_text()) == report
    assert sorted(p.name for p in out.glob("*.tar")) == ["t2i-000000.tar", "t2i-000001.tar", "t2i-000002.tar"]

    samples = read_shards(out)
    assert sorted(samples) == ["astronaut", "chelsea", "coffee", "rocket", "sub_logo"]
    meta = {k: json.loads(s["json"]) for k, s in samples.items()}
    assert meta["astronaut"]["caption_zh"] == "一名宇航员和一面旗帜"
    assert meta["coffee"] == {"caption_zh": "一杯咖啡", "source": "coffee.jpg"}
    assert meta["chelsea"]["caption_en"] == "a tabby cat" and meta["rocket"]["caption_en"].startswith(
        "a rocket"
    )
    # RGB PNG / JPEG bytes are kept as they are; the RGBA logo is re-encoded as JPEG on white.
    assert samples["astronaut"]["png"] == (images / "astronaut.png").read_bytes()
    assert samples["coffee"]["jpg"] == (images / "coffee.jpg").read_bytes()
    assert "jpg" in samples["sub_logo"] and decode(samples["sub_logo"]["jpg"]).shape == (96, 96, 3)

    # A re-run rewrites nothing (the corrupt and missing inputs are tried again and reported again).
    before = digest(out)
    again = main(args)
    assert again["written"] == 0 and again["already_done"] == 5 and again["new_shards"] == []
    assert again["skipped_by_reason"] == report["skipped_by_reason"]
    assert digest(out) == before

    # Leftovers of an interrupted run are removed; new inputs go to a new shard after the last one.
    (out / "t2i-000003.tar.tmp").write_bytes(b"partial")
    (out / "t2i-000009.tar").write_bytes(b"renamed but never indexed")
    rows = t2i_rows() + [{"image": "camera.jpg", "caption_en": "a cameraman", "id": "x"}]
    write_jsonl(captions, rows)
    third = main(args)
    assert third["written"] == 1 and third["already_done"] == 5 and third["new_shards"] == ["t2i-000003.tar"]
    assert not (out / "t2i-000003.tar.tmp").exists() and not (out / "t2i-000009.tar").exists()
    assert {k: v for k, v in digest(out).items() if k in before} == before
    # The caption-less camera.jpg record above holds the key "camera" (keys never depend on what failed).
    assert decode(read_shards(out)["camera_dup1"]["jpg"]).shape == (128, 128, 3)

    through_datamodule(out, "t2i", expected=6)


def test_parallel_workers_write_the_same_bytes(images, tmp_path):
    captions = write_jsonl(tmp_path / "captions.jsonl", t2i_rows())
    common = ["t2i", "--images", str(images), "--captions", str(captions), "--shard-size", "3", "--quiet"]
    main([*common, "--out", str(tmp_path / "one"), "--workers", "1"])
    main([*common, "--out", str(tmp_path / "two"), "--workers", "2"])
    one = {k: v[0] for k, v in digest(tmp_path / "one").items()}
    assert one == {k: v[0] for k, v in digest(tmp_path / "two").items()}


# ------------------------------------------------------------------------------------------- imagenet
@pytest.mark.parametrize("fmt", ["json", "tsv"])
def test_imagenet_class_names_become_captions(images, tmp_path, fmt):
    root = tmp_path / "train"
    layout = {
        "n02123045": ["chelsea.png"],
        "n04266014": ["rocket.jpg", "broken.jpg"],
        "n99999999": ["coffee.jpg"],
    }
    for wnid, files in layout.items():
        (root / wnid).mkdir(parents=True)
        for i, f in enumerate(files):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes((images / f).read_bytes())
    names = {
        "n02123045": {"en": "tabby cat", "zh": "虎斑猫"},
        "n04266014": {"en": "space shuttle", "zh": "航天飞机"},
    }
    if fmt == "json":
        classes = tmp_path / "classes.json"
        classes.write_text(json.dumps(names, ensure_ascii=False))
    else:
        classes = tmp_path / "classes.tsv"
        classes.write_text("".join(f"{w}\t{v['en']}\t{v['zh']}\n" for w, v in names.items()))
    out = tmp_path / "in1k"
    report = main(["imagenet", "--root", str(root), "--classes", str(classes), "--out", str(out), "--quiet"])
    assert report["written"] == 2 and report["skipped_by_reason"] == {CORRUPT: 1, UNKNOWN_CLASS: 1}
    samples = read_shards(out)
    cat = json.loads(samples["n02123045_0"]["json"])
    assert cat["caption_en"] == "tabby cat" and cat["caption_zh"] == "虎斑猫" and cat["label"] == 0
    # A PNG named .JPEG is stored by its real format.
    assert "png" in samples["n02123045_0"] and "jpg" in samples["n04266014_0"]
    assert json.loads(samples["n04266014_0"]["json"])["caption_en"] == "space shuttle"


# ------------------------------------------------------------------------------------------------ und
def test_und_llava_conversations(images, tmp_path):
    def rec(rid: str, image: str | list[str] | None, *turns: str) -> dict[str, object]:
        conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]
        return {"id": rid, "conversations": conv} | ({"image": image} if image is not None else {})

    pair = ["chelsea.png", "rocket.jpg"]
    records = [
        rec("a/1", "astronaut.png", "<image>\nWho is this?", "An astronaut."),
        rec("b", "coffee.jpg", "这是什么？", "一杯咖啡。", "什么颜色？", "棕色。"),  # <image> is prepended
        rec("c", pair, "<image>\n<image>\nWhich one can fly?", "The second one."),
        rec("text-only", None, "Say hi.", "Hi."),
        rec("d", pair, "<image>\nCompare.", "..."),  # 1 tag, 2 images
        rec("e", "chelsea.png", "<image><image> Twice?", "No."),  # 2 tags, 1 image
        rec("f", "broken.jpg", "<image>\nWhat?", "Broken."),  # corrupt image
        rec("g", "rocket.jpg", "<image>\nUnanswered?"),  # ends with a user turn
    ]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(records, ensure_ascii=False))
    out = tmp_path / "und"
    report = main(["und", "--json", str(tmp_path / "llava.json"), "--images", str(images), "--out", str(out),
                   "--quiet"])  # fmt: skip
    assert report["written"] == 4
    assert report["skipped_by_reason"] == {TAG_MISMATCH: 2, CORRUPT: 1, BAD_RECORD: 1}
    samples = read_shards(out)
    assert sorted(samples) == ["a_1", "b", "c", "text-only"]
    b = json.loads(samples["b"]["json"])
    assert b["conversations"][0] == {"role": "user", "content": "<image>\n这是什么？"}  # tag prepended
    assert [t["role"] for t in b["conversations"]] == ["user", "assistant", "user", "assistant"]
    c = samples["c"]
    assert "0.png" in c and "1.jpg" in c and c["1.jpg"] == (images / "rocket.jpg").read_bytes()
    assert json.loads(c["json"])["conversations"][0]["content"].count("<image>") == 2
    assert not any(k.endswith(("png", "jpg")) for k in samples["text-only"])
    through_datamodule(out, "und", expected=4)


# ----------------------------------------------------------------------------------------------- edit
def test_edit_pairs_and_language(images, tmp_path):
    rows = [
        {
            "src_img": "astronaut.png",
            "edited_img": "coffee.jpg",
            "prompt": "Replace the astronaut with coffee.",
        },
        {"id": 7, "source": "chelsea.png", "target": "rocket.jpg", "instruction": "把猫变成火箭"},
        {"input": "rocket.jpg", "output": "chelsea.png", "edit_instruction": "Turn the rocket into a cat."},
        {"src_img": "chelsea.png", "edited_img": "broken.jpg", "prompt": "Break it."},
        {"src_img": "chelsea.png", "edited_img": "rocket.jpg"},
        {"src_img": "chelsea.png", "prompt": "No target."},
    ]
    out = tmp_path / "edit"
    report = main(["edit", "--json", str(write_jsonl(tmp_path / "edit.jsonl", rows)), "--images", str(images),
                   "--out", str(out), "--quiet"])  # fmt: skip
    assert report["written"] == 3 and report["skipped_by_reason"] == {CORRUPT: 1, NO_TEXT: 1, BAD_RECORD: 1}
    samples = read_shards(out)
    assert sorted(samples) == ["7", "astronaut", "rocket"]
    zh = json.loads(samples["7"]["json"])
    assert zh["instruction_zh"] == "把猫变成火箭" and "instruction_en" not in zh
    en = json.loads(samples["astronaut"]["json"])
    assert en["instruction_en"].startswith("Replace") and "instruction_zh" not in en
    assert samples["astronaut"]["src.png"] == (images / "astronaut.png").read_bytes()
    assert samples["astronaut"]["tgt.jpg"] == (images / "coffee.jpg").read_bytes()
    through_datamodule(out, "edit", expected=3)
