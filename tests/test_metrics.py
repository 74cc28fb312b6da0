"""ShapesEval metrics (T2I, understanding and editing accuracy, tokenizer ceiling) and free-form VQA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.utilities.data import dim_zero_sum

from datamodules import shapes_world as sw
from datamodules.shapes_world import ShapeObject, make_scene
from metrics.shapes_eval import EditAccuracy, T2IAccuracy, UndAccuracy, to_uint8, tokenizer_ceiling
from metrics.vqa import VQAAccuracy, normalize_answer, vqa_score

# Two objects, so that every single-attribute change has room (empty cells, absent shapes).
BASE = make_scene([ShapeObject("red", "circle", (0, 0)), ShapeObject("blue", "square", (1, 1))])
W, H = 48, 48


def _variant(name: str) -> tuple[np.ndarray, dict[str, float]]:
    """A wrong image for BASE and the per-attribute values T2IAccuracy must report for it alone."""
    red, blue = BASE
    ok = {"count": 1.0, "colour": 1.0, "shape": 1.0, "position": 1.0, "size": 1.0}
    if name == "colour":
        scene, want = (ShapeObject("green", "circle", (0, 0)), blue), {"colour": 0.0}
    elif name == "shape":
        scene, want = (ShapeObject("red", "triangle", (0, 0)), blue), {"shape": 0.0}
    elif name == "position":
        scene, want = (ShapeObject("red", "circle", (2, 2)), blue), {"position": 0.0}
    elif name == "count":
        # A missing object also breaks the colour/shape/cell multisets.
        scene, want = (blue,), {"count": 0.0, "colour": 0.0, "shape": 0.0, "position": 0.0}
    elif name == "size":
        return sw.render(BASE, 72, 48), {**ok, "size": 0.0}
    else:
        raise AssertionError(name)
    return sw.render(make_scene(scene), W, H), {**ok, **want}


def _values(metric: T2IAccuracy | UndAccuracy | EditAccuracy) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


# --------------------------------------------------------------------------------------------------
# T2I
# --------------------------------------------------------------------------------------------------


def test_t2i_ground_truth_scores_one_everywhere() -> None:
    samples = list(sw.t2i_samples(36, seed=7))
    m = T2IAccuracy()
    m.update([s["image"] for s in samples], [s["scene"] for s in samples],
             [s["size"] for s in samples], [s["lang"] for s in samples])
    values = _values(m)
    assert set(values) == {
        "accuracy", "accuracy_en", "accuracy_zh", "accuracy_n1", "accuracy_n2", "accuracy_n3",
        "accuracy_48x48", "accuracy_72x48", "accuracy_48x72", "count", "colour", "shape", "position", "size",
    }
    assert all(v == 1.0 for v in values.values()), values
    counts = m.counts()
    assert counts["n"] == 36 and counts["n_en"] == counts["n_zh"] == 18
    assert counts["n_48x48"] == counts["n_72x48"] == counts["n_48x72"] == 12
    assert counts["n_n1"] + counts["n_n2"] + counts["n_n3"] == 36
    assert m.failures == []


def test_t2i_accepts_float_and_uint8_tensors() -> None:
    samples = [s for s in sw.t2i_samples(12, seed=3) if s["size"] == (72, 48)]
    u8 = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2)
    args = ([s["scene"] for s in samples], [s["size"] for s in samples], [s["lang"] for s in samples])
    for images in (u8, u8.float() / 127.5 - 1.0):
        m = T2IAccuracy()
        m.update(images, *args)
        assert float(m.compute()["accuracy"]) == 1.0


@pytest.mark.parametrize("wrong", ["colour", "shape", "position", "count", "size"])
def test_t2i_attribute_breakdown(wrong: str) -> None:
    img, want = _variant(wrong)
    m = T2IAccuracy()
    m.update([img], [BASE], [(W, H)], ["en"])
    values = _values(m)
    assert values["accuracy"] == 0.0
    assert {k: values[k] for k in want} == want
    assert len(m.failures) == 1 and m.failures[0]["index"] == 0
    reason = m.failures[0]["reason"]
    assert ("size 72x48, requested 48x48" in reason) == (wrong == "size")
    assert ("missing" in reason) == (wrong != "size")


def test_t2i_mixed_batch_groups_and_failures() -> None:
    good = sw.render(BASE, W, H)
    one = make_scene([ShapeObject("yellow", "diamond", (2, 0))])
    images = [good, _variant("colour")[0], sw.render(one, W, H), _variant("position")[0]]
    m = T2IAccuracy()
    m.update(images, [BASE, BASE, one, BASE], [(W, H)] * 4, ["en", "en", "zh", "zh"], keys=list("abcd"))
    v = _values(m)
    assert v["accuracy"] == 0.5
    assert v["accuracy_en"] == 0.5 and v["accuracy_zh"] == 0.5
    assert v["accuracy_n1"] == 1.0 and v["accuracy_n2"] == pytest.approx(1 / 3)
    assert math.isnan(v["accuracy_n3"]) and math.isnan(v["accuracy_72x48"])  # empty groups
    assert v["colour"] == 0.75 and v["position"] == 0.75 and v["shape"] == 1.0 and v["count"] == 1.0
    assert [(f["index"], f["key"]) for f in m.failures] == [(1, "b"), (3, "d")]


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_t2i_reset_merge_and_forward() -> None:
    good, bad = sw.render(BASE, W, H), _variant("shape")[0]
    a, b, whole = T2IAccuracy(), T2IAccuracy(), T2IAccuracy()
    a.update([good, bad], [BASE] * 2, [(W, H)] * 2, ["en", "zh"])
    b.update([bad, good, good], [BASE] * 3, [(W, H)] * 3, ["en", "zh", "en"])
    whole.update([good, bad, bad, good, good], [BASE] * 5, [(W, H)] * 5, ["en", "zh", "en", "zh", "en"])
    a.merge_state(b)
    assert torch.equal(a.hits, whole.hits) and torch.equal(a.totals, whole.totals)
    assert [f["index"] for f in a.failures] == [f["index"] for f in whole.failures] == [1, 2]

    # forward: returns the batch's value, accumulates, keeps failure indices running.
    m = T2IAccuracy()
    batch1 = m([good, bad], [BASE] * 2, [(W, H)] * 2, ["en", "en"])
    batch2 = m([bad, good, good], [BASE] * 3, [(W, H)] * 3, ["en", "en", "en"])
    assert float(batch1["accuracy"]) == 0.5 and float(batch2["accuracy"]) == pytest.approx(2 / 3)
    assert float(m.compute()["accuracy"]) == pytest.approx(0.6)
    assert [f["index"] for f in m.failures] == [1, 2]

    m.reset()
    assert m.failures == [] and m.counts()["n"] == 0 and math.isnan(float(m.compute()["accuracy"]))
    # States are summed across processes.
    assert m._reductions["hits"] is dim_zero_sum and m._reductions["totals"] is dim_zero_sum


def test_t2i_rejects_mismatched_lengths_and_langs() -> None:
    img = sw.render(BASE, W, H)
    with pytest.raises(ValueError, match="scenes"):
        T2IAccuracy().update([img], [], [(W, H)], ["en"])
    with pytest.raises(ValueError, match="lang"):
        T2IAccuracy().update([img], [BASE], [(W, H)], ["fr"])


# --------------------------------------------------------------------------------------------------
# Understanding
# --------------------------------------------------------------------------------------------------


def test_und_ground_truth_and_breakdown() -> None:
    samples = list(sw.und_samples(60, seed=5))
    args = ([s["answer"] for s in samples], [s["qtype"] for s in samples], [s["lang"] for s in samples],
            [s["scene"] for s in samples])
    m = UndAccuracy()
    # Case, surrounding spaces and a final full stop are ignored.
    m.update([f"  {s['answer'].upper()}. " if s["lang"] == "en" else s["answer"] + "。" for s in samples],
             *args)
    v = _values(m)
    assert all(x == 1.0 for x in v.values()), v
    assert set(v) == {"accuracy", "accuracy_en", "accuracy_zh", *(f"accuracy_{q}" for q in sw.QTYPES)}

    # Captions are compared as scenes: the objects may be listed in any order.
    cap = next(s for s in samples if s["qtype"] == "caption" and s["lang"] == "en" and len(s["scene"]) >= 2)
    reordered = " and ".join(sw.caption((o,), "en") for o in reversed(cap["scene"]))
    m2 = UndAccuracy()
    m2.update([reordered], [cap["answer"]], ["caption"], ["en"], [cap["scene"]])
    assert float(m2.compute()["accuracy"]) == 1.0

    # Wrong answers on all count questions only.
    m3 = UndAccuracy()
    preds = ["7" if s["qtype"] == "count" else s["answer"] for s in samples]
    m3.update(preds, *args)
    v3 = _values(m3)
    assert v3["accuracy_count"] == 0.0
    assert all(v3[f"accuracy_{q}"] == 1.0 for q in sw.QTYPES if q != "count")
    n_count = sum(s["qtype"] == "count" for s in samples)
    assert v3["accuracy"] == pytest.approx(1 - n_count / len(samples))
    assert len(m3.failures) == n_count and all(f["qtype"] == "count" for f in m3.failures)


# --------------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------------


def test_edit_targets_score_one_and_sources_zero() -> None:
    samples = list(sw.edit_samples(48, seed=11))
    args = ([s["target_scene"] for s in samples], [s["size"] for s in samples], [s["op"] for s in samples],
            [s["lang"] for s in samples])
    m = EditAccuracy()
    m.update([s["tgt"] for s in samples], *args)
    v = _values(m)
    assert all(x == 1.0 for x in v.values()), v
    assert set(v) == {"accuracy", "accuracy_en", "accuracy_zh", "size",
                      *(f"accuracy_{o}" for o in sw.EDIT_OPS)}

    # Returning the source unchanged is wrong for every op (each valid op changes the scene).
    m.reset()
    m.update([s["src"] for s in samples], *args)
    v = _values(m)
    assert v["accuracy"] == 0.0 and v["size"] == 1.0
    assert all(v[f"accuracy_{o}"] == 0.0 for o in sw.EDIT_OPS)


def test_edit_output_must_keep_the_source_size() -> None:
    s = next(iter(sw.edit_samples(1, seed=2)))
    w, h = s["size"]
    other = (48, 72) if (w, h) != (48, 72) else (72, 48)
    m = EditAccuracy()
    m.update([sw.render(s["target_scene"], *other)], [s["target_scene"]], [s["size"]], [s["op"]], [s["lang"]])
    v = _values(m)
    assert v["accuracy"] == 0.0 and v["size"] == 0.0
    assert "source" in m.failures[0]["reason"]


# --------------------------------------------------------------------------------------------------
# Tokenizer ceiling
# --------------------------------------------------------------------------------------------------


def test_tokenizer_ceiling_identity_is_one() -> None:
    calls: list[tuple[int, ...]] = []

    def identity(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
        calls.append(tuple(x.shape))
        return x.clone()

    assert tokenizer_ceiling(identity, n=30, seed=0, batch_size=4) == 1.0
    assert {s[2:] for s in calls} == {(48, 48), (48, 72), (72, 48)}  # all three sizes, batched by size
    assert max(s[0] for s in calls) <= 4 and sum(s[0] for s in calls) == 30


def test_tokenizer_ceiling_lossy_roundtrips() -> None:
    def shift(x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, shifts=(x.shape[-2] // 3, x.shape[-1] // 3), dims=(-2, -1))

    assert tokenizer_ceiling(shift, n=30, seed=0) < 0.5

    def box_blur(x: torch.Tensor) -> torch.Tensor:
        # A 9x9 mean filter per channel (replicate padding keeps the white border white).
        k = torch.full((3, 1, 9, 9), 1 / 81)
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (4,) * 4, mode="replicate"), k, groups=3)

    assert tokenizer_ceiling(box_blur, n=30, seed=0) < 1.0

    # Swapping colour channels keeps count, shapes and cells but breaks colours.
    metric = T2IAccuracy()
    assert tokenizer_ceiling(lambda x: x[:, [1, 2, 0]], n=30, seed=0, metric=metric) < 0.2
    v = _values(metric)
    assert v["colour"] < 0.2 and v["shape"] == v["position"] == v["count"] == v["size"] == 1.0
    assert metric.failures and metric.failures[0]["key"].startswith("shapes-t2i-s0-")


# --------------------------------------------------------------------------------------------------
# to_uint8
# --------------------------------------------------------------------------------------------------


def test_to_uint8_conversions() -> None:
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 3, 1, 2)  # [B, 3, H=1, W=2]
    (out,) = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    # clamp to [-1, 1], then round((x + 1) * 127.5): 127.5 rounds to even (128), 191.25 -> 191
    assert out.transpose(2, 0, 1).ravel().tolist() == [0, 0, 128, 191, 255, 255]
    img = sw.render(BASE, 72, 48)
    pil = Image.fromarray(img).convert("RGBA")
    arrays = to_uint8([img, torch.from_numpy(img).permute(2, 0, 1), pil])
    assert all(np.array_equal(a, img) for a in arrays)
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(2, 4, 8, 8))
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(1, 3, 8, 8, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# Free-form VQA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "norm"),
    [
        ("The Red Circle.", "red circle"),
        ("  a   dog  ", "dog"),
        ("Three", "3"),
        ("two cats and one dog!", "2 cats and 1 dog"),
        ("It's the dog's toy", "its dogs toy"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes.", "yes"),
        ("left-hand side", "left hand side"),
        ("红色。", "红色"),
        ("红色！", "红色"),
        ("“左上”，", "左上"),
        ("三个", "3"),
        ("3个", "3"),
        ("１２", "12"),  # full-width digits
        ("左上 ， 中间", "左上中间"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, norm: str) -> None:
    assert normalize_answer(text) == norm


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_vqa_accuracy_single_and_multiple_references() -> None:
    assert vqa_score("Two", "2") == 1.0
    assert vqa_score("cat", ["dog", "a cat"]) == 1.0
    ten = ["2"] * 2 + ["3"] * 8
    assert vqa_score("two", ten) == pytest.approx(2 / 3)
    assert vqa_score("3", ten) == 1.0
    assert vqa_score("4", ten) == 0.0
    m = VQAAccuracy()
    m.update(["two", "cat", "红色。"], [ten, "dog", ["红色"]])
    assert float(m.compute()) == pytest.approx((2 / 3 + 0 + 1) / 3)
    m.reset()
    assert math.isnan(float(m.compute()))
    with pytest.raises(ValueError):
        m.update(["a"], [])
