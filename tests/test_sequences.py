"""Sequence builders, buckets, collation and the ViT image processor.

Layouts are pinned token by token by rendering them (special tokens by name, text runs quoted) and
comparing with the layouts of shared/reference/token_layout.md, for both tokenizers and both languages.
Exact ids are pinned against the official golden cases and the token_layout examples with the real
Qwen2.5 tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import OFFICIAL_TINY
from wallaroo.config import get_preset
from wallaroo.images import VitImageProcessor
from wallaroo.sequences import (
    ASPECT_RATIO_512,
    BUCKET_SETS,
    EDIT_TEMPLATES,
    GENERATE_TEMPLATES,
    SHAPES_BUCKETS,
    SQUARE_384,
    SQUARE_512,
    SYSTEM_PROMPT,
    Bucket,
    BuiltSample,
    build_edit,
    build_t2i,
    build_und,
    closest_bucket,
    collate,
    edit_instruction,
    edit_prompt,
    generate_instruction,
    parse_size,
    render_tokens,
    resize_to_bucket,
    t2i_prompt,
    to_tensor_pm1,
    und_prompt,
)
from wallaroo.tokens import (
    INDICATOR_SIZES_512,
    INDICATOR_SIZES_SHAPES,
    TokenIds,
    build_tiny_tokenizer,
    load_qwen_tokenizer,
)

GS, GE, GIP, EOL = "<|generate_start|>", "<|generate_end|>", "<|generate_image_pad|>", "<|end_of_line>|"
SYSTEM_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
PROMPTS = {"en": "a red circle at the top left", "zh": "左上有一个红色圆形"}
INSTRUCTIONS = {"en": "Change the circle to blue.", "zh": "把圆形变成蓝色。"}


# ----------------------------------------------------------------------------------------------------
# fixtures and helpers
# ----------------------------------------------------------------------------------------------------

_LOADERS = {
    "tiny_shapes": lambda: (build_tiny_tokenizer(INDICATOR_SIZES_SHAPES), INDICATOR_SIZES_SHAPES),
    "tiny_512": lambda: (build_tiny_tokenizer(INDICATOR_SIZES_512), INDICATOR_SIZES_512),
    "qwen_shapes": lambda: (load_qwen_tokenizer(None, INDICATOR_SIZES_SHAPES), INDICATOR_SIZES_SHAPES),
    "qwen_512": lambda: (load_qwen_tokenizer(None, INDICATOR_SIZES_512), INDICATOR_SIZES_512),
}


@pytest.fixture(scope="module")
def get_tok():
    """name -> (tokenizer, TokenIds), each built once per module and only when a test asks for it."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            tok, sizes = _LOADERS[name]()
            cache[name] = (tok, TokenIds.from_tokenizer(tok, sizes))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def cases():
    if not (OFFICIAL_TINY / "cases.json").is_file():
        pytest.skip("shared/reference/official_tiny not found")
    from safetensors.torch import load_file

    meta = json.loads((OFFICIAL_TINY / "cases.json").read_text())
    return meta, load_file(str(OFFICIAL_TINY / "cases.safetensors"))


def I(text: str) -> list[int]:  # noqa: E743 - ids written as in token_layout.md
    """Whitespace-separated ids, as token_layout.md writes them."""
    return [int(v) for v in text.split()]


def q(text: str) -> str:
    """A quoted text run as render_tokens writes it."""
    return "'" + json.dumps(text, ensure_ascii=False)[1:-1] + "'"


def user(text: str) -> str:
    return q("user\n" + text)


def assistant(text: str) -> str:
    return q("assistant\n" + text)


NL = q("\n")
SYS = f"<|im_start|> {q('system' + chr(10) + SYSTEM_PROMPT)} <|im_end|> {NL}"


def grid(pad: str, rows: int, cols: int, eol: str | None = EOL) -> str:
    row = f"{pad}×{cols}" if cols > 1 else pad
    if eol is None:
        n = rows * cols
        return f"{pad}×{n}" if n > 1 else pad
    return f" {eol} ".join([row] * rows)


def ind(b: Bucket) -> str:
    """The indicator pair, height first (render_tokens compresses a repeated token to ×2)."""
    return f"<indicator:{b.h}>×2" if b.h == b.w else f"<indicator:{b.h}> <indicator:{b.w}>"


def render(tok, sample: BuiltSample) -> str:
    return render_tokens(tok, sample.input_ids, merge_text=True)


def codes_for(rows: int, cols: int) -> torch.Tensor:
    return (torch.arange(rows * cols) * 37 % 16384).view(rows, cols)


def tiny_to_real(meta) -> dict[int, int]:
    mapping = {tiny: real for real, tiny, _ in meta["id_map"]["text_token_map"]}
    mapping.update({t: t + 150683 for t in range(960, 1000)})
    mapping[-100] = -100
    return mapping


def replace_span(seq: list[int], old: list[int], new: list[int]) -> tuple[list[int], int]:
    """Replace the single occurrence of `old` in `seq` by `new`; returns the new list and the index."""
    hits = [i for i in range(len(seq) - len(old) + 1) if seq[i : i + len(old)] == old]
    assert len(hits) == 1, hits
    i = hits[0]
    return seq[:i] + new + seq[i + len(old) :], i


def check_generation_labels(
    sample: BuiltSample, ids: TokenIds, codes: torch.Tensor | None, eol: bool = True
) -> None:
    """token_layout §2: text labels = response structure tokens; image labels = codes at the pads."""
    x, labels, image_labels = sample.input_ids, sample.labels, sample.image_labels
    is_pad = x == ids.generate_image_pad
    start = int((x == ids.generate_start).nonzero()[0, 0])
    text_mask = torch.zeros_like(is_pad)
    text_mask[start:] = True
    text_mask &= ~is_pad
    assert torch.equal(labels[text_mask], x[text_mask])
    assert bool((labels[~text_mask] == -100).all())
    rows, _ = sample.grid
    # generate_start, R-1 EOLs (aspect layouts only), generate_end, <|im_end|>, '\n'
    assert int(text_mask.sum()) == (rows + 3 if eol else 4)
    if codes is None:
        assert bool((image_labels == -100).all())
    else:
        assert torch.equal(image_labels[is_pad], codes.flatten())
        assert bool((image_labels[~is_pad] == -100).all())


# ----------------------------------------------------------------------------------------------------
# templates
# ----------------------------------------------------------------------------------------------------


def test_templates():
    assert (
        GENERATE_TEMPLATES["en"][0]
        == 'Generate an image with resolution {w}x{h} based on the prompt: "{prompt}"'
    )
    assert EDIT_TEMPLATES["en"][0] == (
        'Edit the input image based on the text prompt: "{prompt}", and generate a new image with a '
        "resolution of {w}x{h}."
    )
    for table in (GENERATE_TEMPLATES, EDIT_TEMPLATES):
        assert set(table) == {"en", "zh"}
        for templates in table.values():
            assert len(templates) >= 10 and len(set(templates)) == len(templates)
            for t in templates:
                assert (
                    "{w}x{h}" in t
                    and t.count("{prompt}") == 1
                    and t.count("{w}") == 1
                    and t.count("{h}") == 1
                )
    b = Bucket(w=96, h=64)
    assert generate_instruction("a cat", b, lang="en", template_index=0).endswith(
        'resolution 96x64 based on the prompt: "a cat"'
    )
    assert "96x64" in edit_instruction("把圆形变成蓝色。", b, lang="zh", template_index=3)
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        generate_instruction("a cat", b, lang="fr", template_index=0)
    with pytest.raises(ValueError, match="template_index"):
        edit_instruction("x", b, lang="en", template_index=10)


# ----------------------------------------------------------------------------------------------------
# exact ids against the official reference (real Qwen2.5 tokenizer)
# ----------------------------------------------------------------------------------------------------


def test_case_c_understanding_ids_and_labels(get_tok, cases):
    meta, t = cases
    tok, ids = get_tok("qwen_512")
    # cases.json stores the conversation with escaped newlines ("<image>\\nWhat ..."); the source has "\n".
    conversation = [{"role": r, "content": c.replace("\\n", "\n")} for r, c in meta["c"]["conversation"]]
    s = build_und(tok, ids, conversation, [24])
    n = meta["c"]["unpadded_length"]
    assert len(s) == n == 74
    assert s.input_ids.tolist() == t["c.input_ids_real"][0, :n].tolist()
    to_real = tiny_to_real(meta)
    assert s.labels.tolist() == [to_real[v] for v in t["c.labels"][0, :n].tolist()]
    assert int((s.labels != -100).sum()) == 10
    assert render_tokens(tok, s.input_ids) == meta["c"]["rendered_real"]
    assert s.mm_token_type_ids.tolist() == [0] * 15 + [1] * 24 + [0] * 35
    assert bool((s.image_labels == -100).all()) and s.task == "und" and s.grid is None
    # Qwen's own ViT processor gives the 24 tokens of the 112x168 image.
    assert VitImageProcessor(3136, 12845056).num_tokens(w=168, h=112) == 24


def _bpe_indicator_span(qwen_512, h: int, w: int) -> list[int]:
    # With the 512 indicator list, <indicator:48>/<indicator:64> are BPE pieces (the stage-4 quirk).
    span = qwen_512.encode(f" <indicator:{h}><indicator:{w}>", add_special_tokens=False)
    assert len(span) == 11
    return span


def test_case_a_t2i_ids_and_labels(get_tok, cases):
    meta, t = cases
    tok, ids = get_tok("qwen_shapes")  # has <indicator:48> and <indicator:64> as single tokens
    qwen_512, _ = get_tok("qwen_512")
    to_real = tiny_to_real(meta)
    assert _bpe_indicator_span(qwen_512, 48, 64) == [366, 56151, 25, 19, 23, 1784, 56151, 25, 21, 19, 29]
    for i, prompt in enumerate(meta["a"]["prompts"]):
        n = meta["a"]["unpadded_lengths"][i]
        codes = t["a.target_codes"][i].view(3, 4)
        s = build_t2i(
            tok, ids, prompt, Bucket(w=64, h=48), codes, lang="en", template_index=0, layout="aspect", ds=16
        )
        new = [220, ids.indicator(48), ids.indicator(64)]
        ref, at = replace_span(
            t["a.input_ids_real"][i, :n].tolist(), _bpe_indicator_span(qwen_512, 48, 64), new
        )
        assert s.input_ids.tolist() == ref
        for ours, key in ((s.labels, "a.text_token_labels"), (s.image_labels, "a.image_token_labels")):
            ref_labels = t[key][i, :n].tolist()
            ref_labels = ref_labels[:at] + [-100] * 3 + ref_labels[at + 11 :]
            if key == "a.text_token_labels":
                ref_labels = [to_real[v] for v in ref_labels]
            assert ours.tolist() == ref_labels
        rendered = meta["a"]["rendered_real"][i].replace(
            "' <' 'indicator' ':' '4' '8' '><' 'indicator' ':' '6' '4' '>'",
            "' ' <indicator:48> <indicator:64>",
        )
        assert render_tokens(tok, s.input_ids) == rendered
        assert bool((s.mm_token_type_ids == 0).all()) and s.grid == (3, 4)


def test_case_b_edit_ids_and_labels(get_tok, cases):
    meta, t = cases
    tok, ids = get_tok("qwen_shapes")
    qwen_512, _ = get_tok("qwen_512")
    to_real = tiny_to_real(meta)
    for i, info in enumerate(meta["b"]["samples"]):
        n = meta["b"]["unpadded_lengths"][i]
        h, w, rows, cols = info["tgt_h"], info["tgt_w"], info["rows"], info["cols"]
        codes = t[f"b.target_codes.{i}"].view(rows, cols)
        s = build_edit(
            tok,
            ids,
            info["prompt"],
            Bucket(w=w, h=h),
            codes,
            info["n_vit_tokens"],
            lang="en",
            template_index=0,
            ds=16,
        )
        new = [220, ids.indicator(h), ids.indicator(w)]
        ref, at = replace_span(
            t["b.input_ids_real"][i, :n].tolist(), _bpe_indicator_span(qwen_512, h, w), new
        )
        assert s.input_ids.tolist() == ref
        for ours, key in ((s.labels, "b.text_token_labels"), (s.image_labels, "b.image_token_labels")):
            ref_labels = t[key][i, :n].tolist()
            ref_labels = ref_labels[:at] + [-100] * 3 + ref_labels[at + 11 :]
            if key == "b.text_token_labels":
                ref_labels = [to_real[v] for v in ref_labels]
            assert ours.tolist() == ref_labels
        # Only the ViT pads are mm tokens; the pixel block's <|image_pad|> are not.
        x = s.input_ids
        vs, ve = int((x == ids.vision_start).nonzero()[0, 0]), int((x == ids.vision_end).nonzero()[0, 0])
        expected_mm = torch.zeros_like(x)
        expected_mm[vs + 1 : ve] = 1
        assert torch.equal(s.mm_token_type_ids, expected_mm)
        assert int(s.mm_token_type_ids.sum()) == info["n_vit_tokens"]
        assert int((x == ids.image_pad).sum()) == info["n_vit_tokens"] + rows * cols
    # Sample 0's key indices from the reference README (before our 8-token-shorter indicators).
    s0 = build_edit(
        tok, ids, "make the cube blue", Bucket(w=64, h=48), None, 35, lang="en", template_index=0, ds=16
    )
    x = s0.input_ids.tolist()
    key_indices = [x.index(t) for t in (ids.pixel_start, ids.pixel_end, ids.vision_start, ids.vision_end)]
    assert key_indices == [14, 29, 30, 66]
    assert [i for i in range(30) if x[i] == ids.eol] == [19, 24]
    assert x.index(ids.generate_start) == 115 - 8


def test_vit_processor_reproduces_reference_pixels(cases):
    meta, t = cases
    proc = VitImageProcessor(min_pixels=3136, max_pixels=12845056)
    for img_key, pv_key, grid_row, n_tok in (
        ("b.vit_image.0", "b.pixel_values.0", t["b.image_grid_thw"][0], 35),
        ("b.vit_image.1", "b.pixel_values.1", t["b.image_grid_thw"][1], 12),
        ("c.vit_image", "c.pixel_values", t["c.image_grid_thw"][0], 24),
    ):
        arr = t[img_key].numpy()
        for image in (Image.fromarray(arr), arr):
            pixel_values, grid_thw = proc([image])
            assert pixel_values.dtype == torch.float32 and grid_thw.dtype == torch.long
            torch.testing.assert_close(pixel_values, t[pv_key], atol=1e-5, rtol=0)
            assert grid_thw.tolist() == [grid_row.tolist()]
        assert proc.num_tokens(w=arr.shape[1], h=arr.shape[0]) == n_tok
    # Several images: rows concatenated in order, one grid row each.
    images = [Image.fromarray(t["b.vit_image.0"].numpy()), Image.fromarray(t["b.vit_image.1"].numpy())]
    pixel_values, grid_thw = proc(images)
    torch.testing.assert_close(
        pixel_values, torch.cat([t["b.pixel_values.0"], t["b.pixel_values.1"]]), atol=1e-5, rtol=0
    )
    assert torch.equal(grid_thw, t["b.image_grid_thw"])


def test_goldfish_stage1_square(get_tok):
    tok, ids = get_tok("qwen_512")
    codes = codes_for(24, 24)
    kw = dict(lang="en", template_index=0, layout="square", ds=16)
    s = build_t2i(tok, ids, "goldfish", Bucket(w=384, h=384), codes, **kw)
    user_turn = I(
        "151644 872 198 31115 458 2168 448 10935 220 18 23 19 87 18 23 19 3118 389 279 9934 25 330"
        " 34537 18170 1 151645 198 151644 77091 198"
    )
    x = s.input_ids.tolist()
    assert x[:11] == SYSTEM_IDS and x[11:41] == user_turn
    assert x[41:] == [151665] + [151670] * 576 + [151666, 151645, 198]
    assert len(s) == 11 + 30 + 578 + 2
    check_generation_labels(s, ids, codes_for(24, 24), eol=False)


def test_a_cat_stage32_aspect(get_tok):
    tok, ids = get_tok("qwen_512")
    codes = codes_for(32, 32)
    b, kw = Bucket(w=512, h=512), dict(lang="en", template_index=0, layout="aspect", ds=16)
    s = build_t2i(tok, ids, "a cat", b, codes, **kw)
    user_turn = I(
        "151644 872 198 31115 458 2168 448 10935 220 20 16 17 87 20 16 17 3118 389 279 9934 25 330 64 8251 1"
        " 220 151682 151682 151645 198 151644 77091 198"
    )
    x = s.input_ids.tolist()
    assert x[:11] == SYSTEM_IDS and x[11:44] == user_turn
    block = x[44:-2]
    assert len(block) == 1057 and block[0] == 151665 and block[-1] == 151666
    assert block.count(151669) == 31 and block.count(151670) == 1024
    assert [i for i, v in enumerate(block) if v == 151669] == [33 * (r + 1) for r in range(31)]
    assert x[-2:] == [151645, 198] and len(s) == 1103
    check_generation_labels(s, ids, codes)
    # The inference prompt is the training layout cut after <|generate_start|> (45 tokens).
    p = t2i_prompt(tok, ids, "a cat", b, **kw)
    assert p.input_ids.tolist() == SYSTEM_IDS + user_turn + [151665]
    assert bool((p.labels == -100).all()) and bool((p.image_labels == -100).all()) and p.grid == (32, 32)
    # CFG null prompt: template and indicators kept; ' ""' is one token (1591).
    null = t2i_prompt(tok, ids, "a cat", b, **kw, drop_prompt=True)
    expected_null = user_turn[:21] + I("1591 220 151682 151682 151645 198 151644 77091 198 151665")
    assert null.input_ids.tolist()[11:] == expected_null


def test_edit_template_example_ids(get_tok):
    tok, ids = get_tok("qwen_512")
    expected = I(
        "4036 279 1946 2168 3118 389 279 1467 9934 25 330 6927 432 6303 497 323 6923 264 501 2168 448 264"
        " 10935 315 220 20 16 17 87 20 16 17 13"
    )
    b = Bucket(w=512, h=512)
    text = edit_instruction("make it blue", b, lang="en", template_index=0)
    assert tok.encode(text, add_special_tokens=False) == expected
    s = build_edit(tok, ids, "make it blue", b, codes_for(32, 32), 16, lang="en", template_index=0, ds=16)
    x = s.input_ids.tolist()
    ve = x.index(ids.vision_end)
    assert x[ve + 1 : ve + 1 + len(expected) + 4] == expected + [220, 151682, 151682, 151645]
    # Pixel block has the target block's length (1057 at 512²) with pixel start/end.
    ps, pe = x.index(ids.pixel_start), x.index(ids.pixel_end)
    assert pe - ps + 1 == 1057 and x[pe + 1] == ids.vision_start
    check_generation_labels(s, ids, codes_for(32, 32))


# ----------------------------------------------------------------------------------------------------
# layouts, token by token, both tokenizers and both languages
# ----------------------------------------------------------------------------------------------------

LAYOUT_CASES = [
    (tok, lang, size, ds)
    for lang in ("en", "zh")
    for tok, size, ds in [
        ("tiny_shapes", "48x48", 8),
        ("tiny_shapes", "72x48", 8),
        ("tiny_shapes", "48x72", 8),
        ("qwen_shapes", "48x48", 8),
        ("qwen_shapes", "72x48", 8),
        ("qwen_shapes", "48x72", 8),
        ("tiny_512", "704x352", 16),
        ("qwen_512", "704x352", 16),
    ]
]


@pytest.mark.parametrize("tok_name,lang,size,ds", LAYOUT_CASES)
def test_t2i_aspect_layout(get_tok, tok_name, lang, size, ds):
    tok, ids = get_tok(tok_name)
    b = parse_size(size)
    rows, cols = b.rows(ds), b.cols(ds)
    codes = codes_for(rows, cols)
    text = generate_instruction(PROMPTS[lang], b, lang=lang, template_index=1)
    s = build_t2i(tok, ids, PROMPTS[lang], b, codes, lang=lang, template_index=1, layout="aspect", ds=ds)
    expected = (
        f"{SYS} <|im_start|> {user(text + ' ')} {ind(b)} <|im_end|> {NL} "
        f"<|im_start|> {assistant('')} {GS} {grid(GIP, rows, cols)} {GE} <|im_end|> {NL}"
    )
    assert render(tok, s) == expected
    check_generation_labels(s, ids, codes)
    assert bool((s.mm_token_type_ids == 0).all()) and s.task == "t2i" and s.grid == (rows, cols)
    x = s.input_ids.tolist()
    block = x[x.index(ids.generate_start) : x.index(ids.generate_end) + 1]
    assert len(block) == rows * cols + rows - 1 + 2 and block.count(ids.eol) == rows - 1
    if size == "704x352":
        assert (rows, cols, len(block)) == (22, 44, 991) and block.count(ids.eol) == 21
        # Height first: <indicator:352> then <indicator:704>.
        i = x.index(ids.indicator(352))
        assert x[i + 1] == ids.indicator(704) and x[i + 2] == ids.im_end


@pytest.mark.parametrize("tok_name,lang,size,ds", LAYOUT_CASES[::2])
def test_t2i_square_layout(get_tok, tok_name, lang, size, ds):
    tok, ids = get_tok(tok_name)
    b = parse_size(size)
    rows, cols = b.grid(ds)
    text = generate_instruction(PROMPTS[lang], b, lang=lang, template_index=9)
    s = build_t2i(
        tok, ids, PROMPTS[lang], b, codes_for(rows, cols), lang=lang, template_index=9, layout="square", ds=ds
    )
    expected = (
        f"{SYS} <|im_start|> {user(text)} <|im_end|> {NL} "
        f"<|im_start|> {assistant('')} {GS} {grid(GIP, rows, cols, eol=None)} {GE} <|im_end|> {NL}"
    )
    assert render(tok, s) == expected
    check_generation_labels(s, ids, codes_for(rows, cols), eol=False)


@pytest.mark.parametrize("tok_name,lang,size,ds", LAYOUT_CASES)
def test_edit_layout(get_tok, tok_name, lang, size, ds):
    tok, ids = get_tok(tok_name)
    b = parse_size(size)
    rows, cols = b.grid(ds)
    codes = codes_for(rows, cols)
    text = edit_instruction(INSTRUCTIONS[lang], b, lang=lang, template_index=2)
    s = build_edit(tok, ids, INSTRUCTIONS[lang], b, codes, 6, lang=lang, template_index=2, ds=ds)
    expected = (
        f"{SYS} <|im_start|> {user('')} <|pixel_start|> {grid('<|image_pad|>', rows, cols)} <|pixel_end|> "
        f"<|vision_start|> <|image_pad|>×6 <|vision_end|> {q(text + ' ')} {ind(b)} <|im_end|> {NL} "
        f"<|im_start|> {assistant('')} {GS} {grid(GIP, rows, cols)} {GE} <|im_end|> {NL}"
    )
    assert render(tok, s) == expected
    check_generation_labels(s, ids, codes)
    assert int(s.mm_token_type_ids.sum()) == 6 and s.task == "edit" and s.grid == (rows, cols)
    # Prompt = the same sequence cut after <|generate_start|>.
    p = edit_prompt(tok, ids, INSTRUCTIONS[lang], b, 6, lang=lang, template_index=2, ds=ds)
    assert torch.equal(p.input_ids, s.input_ids[: len(p)]) and p.input_ids[-1] == ids.generate_start
    assert torch.equal(p.mm_token_type_ids, s.mm_token_type_ids[: len(p)])
    assert bool((p.labels == -100).all()) and bool((p.image_labels == -100).all())


@pytest.mark.parametrize("tok_name", ["tiny_shapes", "qwen_512"])
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_und_layout(get_tok, tok_name, lang):
    tok, ids = get_tok(tok_name)
    q1, a1, q2, a2 = {
        "en": ("What color is the circle?", "red", "Where is the square?", "top left"),
        "zh": ("圆形是什么颜色？", "红色", "正方形在哪里？", "左上"),
    }[lang]
    conversation = [
        {"role": "user", "content": f"<image>\n{q1}"},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": f"{q2}\n<image>\nnow?"},
        {"role": "assistant", "content": a2},
    ]
    s = build_und(tok, ids, conversation, [4, 6])
    expected = (
        f"{SYS} <|im_start|> {user('')} <|vision_start|> <|image_pad|>×4 <|vision_end|> {q(q1)} <|im_end|> "
        f"{NL} <|im_start|> {assistant(a1)} <|im_end|> {NL} <|im_start|> {user(q2)} "
        f"<|vision_start|> <|image_pad|>×6 <|vision_end|> {q('now?')} <|im_end|> {NL} "
        f"<|im_start|> {assistant(a2)} <|im_end|> {NL}"
    )
    assert render(tok, s) == expected
    labelled = s.labels[s.labels != -100]
    assert tok.decode(labelled.tolist()) == f"{a1}<|im_end|>\n{a2}<|im_end|>\n"
    assert int(s.mm_token_type_ids.sum()) == 10
    assert torch.equal(s.mm_token_type_ids.bool(), s.input_ids == ids.image_pad)
    # A prompt with history ends with the assistant header; it is a prefix of the full sample.
    p = und_prompt(tok, ids, conversation[:3], [4, 6])
    assert render(tok, p).endswith(f"<|im_start|> {assistant('')}")
    assert torch.equal(p.input_ids, s.input_ids[: len(p)]) and bool((p.labels == -100).all())


def test_und_image_tags(get_tok):
    tok, ids = get_tok("tiny_shapes")
    tagged = build_und(tok, ids, [("human", "<image>\nWhat is it?"), ("gpt", "A cat.")], [5])
    untagged = build_und(tok, ids, [("user", "What is it?"), ("assistant", "A cat.")], [5])
    assert torch.equal(tagged.input_ids, untagged.input_ids)  # <image>\n is prepended when absent
    text_only = build_und(tok, ids, [("user", "Hi"), ("assistant", "Hello.")], [])
    assert int(text_only.mm_token_type_ids.sum()) == 0
    with pytest.raises(ValueError, match=r"2 <image> tag\(s\) but 1 image"):
        build_und(tok, ids, [("user", "<image><image> same?"), ("assistant", "yes")], [5])
    with pytest.raises(ValueError, match=r"1 <image> tag\(s\) but 0 image"):
        build_und(tok, ids, [("user", "<image> what?"), ("assistant", "yes")], [])
    with pytest.raises(ValueError, match="only appear in user turns"):
        build_und(tok, ids, [("user", "what?"), ("assistant", "<image>")], [5])
    with pytest.raises(ValueError, match="alternate"):
        build_und(tok, ids, [("assistant", "hi"), ("user", "what?")], [])
    with pytest.raises(ValueError, match="end with a assistant turn"):
        build_und(tok, ids, [("user", "what?")], [])
    with pytest.raises(ValueError, match="end with a user turn"):
        und_prompt(tok, ids, [("user", "what?"), ("assistant", "x")], [])
    with pytest.raises(ValueError, match="unknown role"):
        build_und(tok, ids, [("system", "x"), ("assistant", "y")], [])
    with pytest.raises(ValueError, match="positive int"):
        build_und(tok, ids, [("user", "<image>"), ("assistant", "y")], [0])


def test_cfg_drop_keeps_template_and_indicators(get_tok):
    tok, ids = get_tok("tiny_shapes")
    b = Bucket(w=72, h=48)
    for lang in ("en", "zh"):
        s = build_t2i(
            tok,
            ids,
            PROMPTS[lang],
            b,
            codes_for(6, 9),
            lang=lang,
            template_index=0,
            layout="aspect",
            ds=8,
            drop_prompt=True,
        )
        text = generate_instruction("", b, lang=lang, template_index=0)
        assert user(text + " ") + " <indicator:48> <indicator:72>" in render(tok, s)
        e = build_edit(
            tok, ids, INSTRUCTIONS[lang], b, None, 3, lang=lang, template_index=0, ds=8, drop_prompt=True
        )
        assert q(edit_instruction("", b, lang=lang, template_index=0) + " ") in render(tok, e)
        check_generation_labels(e, ids, None)


def test_builder_errors(get_tok):
    tok, ids = get_tok("tiny_shapes")
    b = Bucket(w=64, h=64)
    kw = dict(lang="en", template_index=0, layout="aspect", ds=8)
    with pytest.raises(ValueError, match=r"codes have shape \(8, 7\)"):
        build_t2i(tok, ids, "x", b, torch.zeros(8, 7, dtype=torch.long), **kw)
    with pytest.raises(TypeError, match="integer tensor"):
        build_t2i(tok, ids, "x", b, torch.zeros(8, 8), **kw)
    with pytest.raises(ValueError, match="non-negative"):
        build_t2i(tok, ids, "x", b, -torch.ones(8, 8, dtype=torch.long), **kw)
    with pytest.raises(ValueError, match="unknown language"):
        build_t2i(tok, ids, "x", b, None, **{**kw, "lang": "de"})
    with pytest.raises(ValueError, match="unknown layout"):
        build_t2i(tok, ids, "x", b, None, **{**kw, "layout": "wide"})
    with pytest.raises(ValueError, match="not a multiple of the downsampling 16"):
        build_t2i(tok, ids, "x", Bucket(w=120, h=64), None, **{**kw, "ds": 16})
    with pytest.raises(KeyError, match="no indicator token for pixel size 120"):
        build_t2i(tok, ids, "x", Bucket(w=120, h=64), None, **kw)
    with pytest.raises(ValueError, match="positive int"):
        build_edit(tok, ids, "x", b, None, 0, lang="en", template_index=0, ds=8)
    with pytest.raises(TypeError, match="prompt must be a str"):
        build_t2i(tok, ids, None, b, None, **kw)
    # Square layout needs no indicator tokens, so any size divisible by ds works.
    s = build_t2i(tok, ids, "x", Bucket(w=120, h=64), None, **{**kw, "layout": "square"})
    assert s.grid == (8, 15)


# ----------------------------------------------------------------------------------------------------
# collation
# ----------------------------------------------------------------------------------------------------


def test_collate_right_and_left(get_tok):
    tok, ids = get_tok("tiny_shapes")
    a = build_t2i(
        tok,
        ids,
        "a red square",
        Bucket(w=64, h=64),
        codes_for(8, 8),
        lang="en",
        template_index=0,
        layout="aspect",
        ds=8,
    )
    c = build_und(
        tok, ids, [("user", "<image>Describe the image."), ("assistant", "a red square at the top")], [4]
    )
    c.pixel_values, c.image_grid_thw = torch.randn(16, 1176), torch.tensor([[1, 4, 4]])
    a.pixel_latents = torch.randn(64, 8)
    short, long_ = sorted([a, c], key=len)
    n = len(long_)
    for side in ("right", "left"):
        out = collate([short, long_], pad_id=ids.pad, padding_side=side)
        assert out["input_ids"].shape == (2, n)
        k = len(short)
        valid = slice(0, k) if side == "right" else slice(n - k, n)
        pad = slice(k, n) if side == "right" else slice(0, n - k)
        assert torch.equal(out["input_ids"][0, valid], short.input_ids)
        assert bool((out["input_ids"][0, pad] == ids.pad).all())
        assert out["attention_mask"][0].tolist() == [
            1 if valid.start <= i < valid.stop else 0 for i in range(n)
        ]
        assert bool((out["labels"][0, pad] == -100).all()) and bool(
            (out["image_labels"][0, pad] == -100).all()
        )
        assert bool((out["mm_token_type_ids"][0, pad] == 0).all())
        assert torch.equal(out["labels"][0, valid], short.labels)
        assert torch.equal(out["image_labels"][0, valid], short.image_labels)
        assert torch.equal(out["mm_token_type_ids"][0, valid], short.mm_token_type_ids)
        assert torch.equal(out["input_ids"][1], long_.input_ids) and bool(out["attention_mask"][1].all())
        assert all(
            v.dtype == torch.long for k_, v in out.items() if k_ not in ("pixel_values", "pixel_latents")
        )
        assert out["pixel_values"].shape == (16, 1176) and out["image_grid_thw"].tolist() == [[1, 4, 4]]
        assert out["pixel_latents"].shape == (64, 8)
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_id=0)
    with pytest.raises(ValueError, match="padding_side"):
        collate([a], pad_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="unknown task"):
        BuiltSample(a.input_ids, a.labels, a.image_labels, a.mm_token_type_ids, task="video")
    with pytest.raises(ValueError, match="labels must be a 1-D long tensor"):
        BuiltSample(a.input_ids, a.labels[:-1], a.image_labels, a.mm_token_type_ids, task="t2i")


# ----------------------------------------------------------------------------------------------------
# buckets and image preparation
# ----------------------------------------------------------------------------------------------------

# token_layout.md §8: key, h, w, R, C, codes, EOLs, block with start/end.
BUCKET_TABLE = [
    (0.5, 352, 704, 22, 44, 968, 21, 991),
    (0.52, 352, 672, 22, 42, 924, 21, 947),
    (0.57, 384, 672, 24, 42, 1008, 23, 1033),
    (0.6, 384, 640, 24, 40, 960, 23, 985),
    (0.68, 416, 608, 26, 38, 988, 25, 1015),
    (0.72, 416, 576, 26, 36, 936, 25, 963),
    (0.78, 448, 576, 28, 36, 1008, 27, 1037),
    (0.82, 448, 544, 28, 34, 952, 27, 981),
    (0.88, 480, 544, 30, 34, 1020, 29, 1051),
    (0.94, 480, 512, 30, 32, 960, 29, 991),
    (1.0, 512, 512, 32, 32, 1024, 31, 1057),
    (1.13, 544, 480, 34, 30, 1020, 33, 1055),
    (1.21, 544, 448, 34, 28, 952, 33, 987),
    (1.29, 576, 448, 36, 28, 1008, 35, 1045),
    (1.38, 576, 416, 36, 26, 936, 35, 973),
    (1.46, 608, 416, 38, 26, 988, 37, 1027),
    (1.67, 640, 384, 40, 24, 960, 39, 1001),
    (1.75, 672, 384, 42, 24, 1008, 41, 1051),
    (2.0, 704, 352, 44, 22, 968, 43, 1013),
]


def test_aspect_ratio_512_table():
    assert len(ASPECT_RATIO_512) == 19
    for (key, bucket), (k, h, w, rows, cols, n_codes, n_eol, block) in zip(
        ASPECT_RATIO_512.items(), BUCKET_TABLE, strict=True
    ):
        assert (key, bucket.h, bucket.w) == (k, h, w)
        assert (bucket.rows(16), bucket.cols(16)) == (rows, cols)
        assert (rows * cols, rows - 1, rows * cols + rows - 1 + 2) == (n_codes, n_eol, block)
        assert closest_bucket(w, h, ASPECT_RATIO_512) == bucket
    all_sizes = {s for b in ASPECT_RATIO_512.values() for s in (b.h, b.w)}
    assert all_sizes <= set(INDICATOR_SIZES_512)  # every 512 bucket has its indicator tokens
    assert list(SQUARE_384.values()) == [Bucket(w=384, h=384)] and list(SQUARE_512.values()) == [
        Bucket(w=512, h=512)
    ]
    assert [str(b) for b in SHAPES_BUCKETS.values()] == ["48x48", "72x48", "48x72"]
    assert {s for b in SHAPES_BUCKETS.values() for s in (b.h, b.w)} <= set(INDICATOR_SIZES_SHAPES)
    assert set(BUCKET_SETS) == {"aspect512", "square48", "square384", "square512", "shapes"}


def test_bucket_basics_and_parse_size():
    b = parse_size("704x352")
    assert b == Bucket(w=704, h=352) and str(b) == "704x352" and b.aspect == 0.5
    assert (b.rows(16), b.cols(16), b.grid(16)) == (22, 44, (22, 44))
    assert parse_size(" 72 x 48 ", "shapes") == Bucket(w=72, h=48)
    for bad in ("704*352", "704x", "x352", "-4x4", "704x352x3"):
        with pytest.raises(ValueError, match="cannot parse size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="positive"):
        parse_size("0x64")
    with pytest.raises(ValueError, match="not one of the buckets"):
        parse_size("128x128", SHAPES_BUCKETS)
    with pytest.raises(ValueError, match="unknown bucket set"):
        parse_size("64x64", "huge")
    with pytest.raises(ValueError, match="not a multiple"):
        Bucket(w=100, h=64).cols(16)


def test_closest_bucket():
    # The 512 set is matched by the table's rounded keys: 1000x1070 (h/w 1.07) -> 1.13 (0.06 < 0.07).
    assert closest_bucket(1000, 1070, "aspect512") == Bucket(w=480, h=544)
    assert closest_bucket(2000, 10, ASPECT_RATIO_512) == Bucket(w=704, h=352)  # clamps to the extremes
    assert closest_bucket(10, 2000, ASPECT_RATIO_512) == Bucket(w=352, h=704)
    assert closest_bucket(300, 200, SHAPES_BUCKETS) == Bucket(w=72, h=48)
    assert closest_bucket(200, 310, SHAPES_BUCKETS) == Bucket(w=48, h=72)
    assert closest_bucket(640, 640, "shapes") == Bucket(w=48, h=48)
    # Ties keep the earlier bucket (exact in binary: |0.5 - 1.25| == |2.0 - 1.25|).
    first, second = Bucket(w=4, h=2), Bucket(w=2, h=4)
    assert closest_bucket(4, 5, [first, second]) == first
    assert closest_bucket(4, 5, [second, first]) == second
    assert closest_bucket(4, 5, {0.5: first, 2.0: second}) == first
    with pytest.raises(ValueError, match="positive"):
        closest_bucket(0, 5, SHAPES_BUCKETS)


def test_resize_to_bucket_and_tensor():
    # A 120x60 image: left third red, middle green, right blue. Covering 64x64 scales it to 128x64 and
    # crops 32 px from each side, leaving the green band in the middle.
    arr = np.zeros((60, 120, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:80] = (0, 255, 0)
    arr[:, 80:] = (0, 0, 255)
    img = Image.fromarray(arr)
    out = resize_to_bucket(img, Bucket(w=64, h=64))
    assert out.size == (64, 64) and out.mode == "RGB"
    expected = img.resize((128, 64), Image.Resampling.BICUBIC).crop((32, 0, 96, 64))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert tuple(np.asarray(out)[32, 32]) == (0, 255, 0)
    # Taller than the bucket: scale to width, crop top and bottom (torchvision's rounding).
    tall = Image.new("RGB", (50, 100), (10, 20, 30))
    wide_bucket = resize_to_bucket(tall, Bucket(w=96, h=64))
    assert wide_bucket.size == (96, 64)
    t = to_tensor_pm1(Image.fromarray(np.array([[[255, 0, 128]]], dtype=np.uint8)))
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    torch.testing.assert_close(t.flatten(), torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    assert to_tensor_pm1(out).shape == (3, 64, 64)


def test_vit_processor_sizes_and_errors():
    proc = VitImageProcessor(min_pixels=12544, max_pixels=188160)  # the stage-4 ViT limits
    assert proc.factor == 28 and proc.patch_dim == 1176
    assert proc.num_tokens(1024, 1024) <= 240 and proc.num_tokens(64, 64) == 16  # 64² is raised to 112²
    w2, h2 = proc.resized_size(1000, 500)
    assert w2 % 28 == 0 and h2 % 28 == 0 and w2 * h2 <= 188160
    pv, grid_thw = proc([np.zeros((60, 90, 3), dtype=np.uint8)])
    assert pv.shape[0] == int(grid_thw.prod()) and pv.shape[1] == 1176
    assert int(grid_thw.prod()) // 4 == proc.num_tokens(90, 60)
    empty_pv, empty_grid = proc([])
    assert empty_pv.shape == (0, 1176) and empty_grid.shape == (0, 3)
    with pytest.raises(ValueError, match="uint8"):
        proc([np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(TypeError, match="list of images"):
        proc(Image.new("RGB", (28, 28)))
    with pytest.raises(ValueError, match="min_pixels"):
        VitImageProcessor(min_pixels=100, max_pixels=10)


def test_vit_processor_normalisation_follows_the_config():
    white_red = np.full((64, 64, 3), 255, dtype=np.uint8)
    white_red[:16, :16] = (220, 40, 40)
    # Default: Qwen's CLIP mean/std (white is far from 0 in every channel).
    pv_clip, _ = VitImageProcessor(12544, 12544)([white_red])

    def has(pv: torch.Tensor, value: float) -> bool:
        return bool(torch.isclose(pv, torch.tensor(value), atol=1e-4).any())

    assert has(pv_clip, (1 - 0.48145466) / 0.26862954) and not has(pv_clip, 0.0)
    # The shapes preset maps white to exactly 0; a red pixel to ((220, 40, 40) / 255 - 1) / 0.5.
    cfg = get_preset("shapes")
    proc = VitImageProcessor.for_config(cfg)
    assert proc.image_mean == [1.0, 1.0, 1.0] and proc.image_std == [0.5, 0.5, 0.5]
    pv, grid = proc([white_red])
    assert has(pv, 0.0) and has(pv, (220 / 255 - 1) / 0.5) and has(pv, (40 / 255 - 1) / 0.5)
    assert (pv == 0).float().mean() > 0.8  # the background
    with pytest.raises(ValueError, match="image_mean"):
        VitImageProcessor(12544, 12544, image_mean=[0.5, 0.5], image_std=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="std > 0"):
        VitImageProcessor(12544, 12544, image_std=[1.0, 0.0, 1.0])
    # A bad value in a recipe fails when the model config is built.
    with pytest.raises(ValueError, match="vit_image_std"):
        get_preset("shapes", vit_image_std=[0.5, 0.5])


def test_vit_processor_fixed_scale_puts_one_merged_token_on_each_code():
    """``vit_scale`` 3.5 (the ``shapes`` preset): 8 px -> 28 px, so each merged ViT token covers one 8x8 VQ
    code cell exactly, at every ShapesWorld size; sizes the factor cannot align fail, naming the size."""
    proc = VitImageProcessor(112 * 112, 168 * 168, scale=3.5)
    for w, h in SHAPES_BUCKETS_SIZES:
        assert proc.resized_size(w, h) == (w * 7 // 2, h * 7 // 2)
        assert proc.num_tokens(w, h) == (w // 8) * (h // 8)
        img = np.full((h, w, 3), 255, dtype=np.uint8)
        img[8:16, 16:24] = (255, 0, 0)  # one red code cell: row 1, column 2
        pv, grid = proc([img])
        assert grid.tolist() == [[1, h // 8 * 2, w // 8 * 2]]
        # Rows come in merged 2x2 groups (4 patches each), groups in raster order: the red cell's group is
        # the only one that is not white, and all of its 4 patches are red.
        groups = pv.view(-1, 4, 3, 2, 14, 14)
        white = groups[0, 0, :, 0, 0, 0]
        not_white = (groups - white[None, None, :, None, None, None]).abs().flatten(1).amax(1) > 1e-6
        assert not_white.nonzero().flatten().tolist() == [1 * (w // 8) + 2]
        red = groups[1 * (w // 8) + 2]  # [4 patches, 3, 2, 14, 14]: every pixel of every patch red
        assert bool(((red - white[None, :, None, None, None]).abs().flatten(1).amax(1) > 1e-6).all())
        assert bool((red == red[0, :, 0, 0, 0][None, :, None, None, None]).all())
    with pytest.raises(ValueError, match="50x48"):
        proc.num_tokens(50, 48)
    with pytest.raises(ValueError, match="positive"):
        VitImageProcessor(3136, 12845056, scale=0)


SHAPES_BUCKETS_SIZES = ((48, 48), (72, 48), (48, 72))
