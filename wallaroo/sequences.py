"""Instruction templates, size buckets and the sequence builders for the three tasks.

Every sequence is ChatML built by hand (not through a chat template), exactly as the reference training
loaders build it (``shared/reference/token_layout.md``). Sizes are written width x height (``WxH``)
everywhere; the indicator tokens are the one place where height comes first.

We use the reference TRAINING layouts everywhere, inference prompts included (the released inference
code deviates: indicators after ``<|im_end|>``, no assistant header for editing; see token_layout §4.3):

- t2i, ``layout="square"`` (§3)::

    [system] <|im_start|>user\\n{template} <|im_end|>\\n <|im_start|>assistant\\n
    <|generate_start|> <|generate_image_pad|>×(R·C) <|generate_end|> <|im_end|>\\n

- t2i, ``layout="aspect"`` (§4.1)::

    [system] <|im_start|>user\\n{template} ' ' <indicator:h><indicator:w> <|im_end|>\\n
    <|im_start|>assistant\\n <|generate_start|> (<|generate_image_pad|>×C <|end_of_line>|)×(R-1)
    <|generate_image_pad|>×C <|generate_end|> <|im_end|>\\n

- edit (§5.1): the user turn starts with the source pixel block ``<|pixel_start|> (<|image_pad|>×C EOL)…
  <|pixel_end|>`` and the ViT block ``<|vision_start|> <|image_pad|>×N <|vision_end|>``, then the edit
  template, indicators and the same response as aspect t2i.
- und (§6): alternating user/assistant turns, ``<image>`` replaced by a ViT block.

Text between two special/added tokens is encoded as one string, so the ids equal those of the
reference, which tokenised the whole rendered string (added tokens split it at the same places).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from wallaroo.tokens import TokenIds

IGNORE_INDEX = -100
SYSTEM_PROMPT = "You are a helpful assistant."
LANGS: tuple[str, ...] = ("en", "zh")
IMAGE_TAG = "<image>"
TASKS: tuple[str, ...] = ("t2i", "edit", "und")
LAYOUTS: tuple[str, ...] = ("square", "aspect")

# ----------------------------------------------------------------------------------------------------
# Templates. Fields: {w}, {h} (pixels, written WxH) and {prompt}. English 0 of each list is the
# official template 0 (token_layout §3/§5.1); the others are ours.
# ----------------------------------------------------------------------------------------------------

GENERATE_TEMPLATES: dict[str, list[str]] = {
    "en": [
        'Generate an image with resolution {w}x{h} based on the prompt: "{prompt}"',
        'Create a {w}x{h} image that matches this description: "{prompt}"',
        'Please draw a picture at {w}x{h} resolution showing: "{prompt}"',
        'Produce an image of size {w}x{h} for the following prompt: "{prompt}"',
        'Render a {w}x{h} image according to the text: "{prompt}"',
        'Based on the description "{prompt}", generate an image with a resolution of {w}x{h}.',
        'Make a picture of "{prompt}" at a resolution of {w}x{h}.',
        'Draw the following scene as a {w}x{h} image: "{prompt}"',
        'I need a {w}x{h} image. Prompt: "{prompt}"',
        'Turn this prompt into an image with resolution {w}x{h}: "{prompt}"',
    ],
    "zh": [
        "根据提示词“{prompt}”生成一张分辨率为{w}x{h}的图像。",
        "请生成一张{w}x{h}分辨率的图片，内容为：“{prompt}”",
        "按照以下描述画一张{w}x{h}的图：“{prompt}”",
        "生成分辨率为{w}x{h}的图像，提示词：“{prompt}”",
        "请根据文字描述“{prompt}”绘制一幅{w}x{h}的图片。",
        "创作一张尺寸为{w}x{h}的图像，描述如下：“{prompt}”",
        "把这段描述变成一张{w}x{h}的图片：“{prompt}”",
        "以{w}x{h}的分辨率生成图像，画面内容是：“{prompt}”",
        "请画出“{prompt}”，图像分辨率为{w}x{h}。",
        "根据提示“{prompt}”，输出一张{w}x{h}的图像。",
    ],
}

EDIT_TEMPLATES: dict[str, list[str]] = {
    "en": [
        'Edit the input image based on the text prompt: "{prompt}", and generate a new image with a '
        "resolution of {w}x{h}.",
        'Modify the given image according to the instruction: "{prompt}". Output a {w}x{h} image.',
        'Apply this edit to the image: "{prompt}", and produce the result at {w}x{h}.',
        'Follow the instruction "{prompt}" to edit the input image, and output a new image with '
        "resolution {w}x{h}.",
        'Change the input image as described: "{prompt}". The edited image should be {w}x{h}.',
        'Using the input image, carry out the instruction "{prompt}" and generate a {w}x{h} image.',
        'Please edit this picture: "{prompt}". Return an image with a resolution of {w}x{h}.',
        'Edit the image following the prompt "{prompt}" and render the output at {w}x{h}.',
        'Transform the input image according to "{prompt}", producing a new {w}x{h} image.',
        'Instruction: "{prompt}". Edit the input image accordingly and generate a {w}x{h} result.',
    ],
    "zh": [
        "根据文本提示“{prompt}”编辑输入图像，并生成一张分辨率为{w}x{h}的新图像。",
        "请按照指令“{prompt}”修改这张图片，输出{w}x{h}的图像。",
        "对输入图像执行以下编辑：“{prompt}”，结果图像的分辨率为{w}x{h}。",
        "按照“{prompt}”的要求编辑图片，并生成一张{w}x{h}的新图片。",
        "请根据描述“{prompt}”修改输入图像，输出尺寸为{w}x{h}。",
        "编辑指令：“{prompt}”。请据此修改图像并输出{w}x{h}的结果。",
        "将输入图片按“{prompt}”进行编辑，生成分辨率为{w}x{h}的图像。",
        "请对这张图片做如下修改：“{prompt}”，并输出一张{w}x{h}的图片。",
        "依照提示“{prompt}”改动输入图像，得到一张{w}x{h}的新图像。",
        "根据指令“{prompt}”编辑图像，生成{w}x{h}分辨率的结果。",
    ],
}


def _check_lang(lang: str) -> str:
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGS}")
    return lang


def _format_template(
    templates: Mapping[str, list[str]], prompt: str, bucket: Bucket, lang: str, template_index: int
) -> str:
    options = templates[_check_lang(lang)]
    if not isinstance(template_index, int) or not 0 <= template_index < len(options):
        raise ValueError(
            f"template_index must be in [0, {len(options)}) for {lang!r}, got {template_index!r}"
        )
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return options[template_index].format(w=bucket.w, h=bucket.h, prompt=prompt)


def generate_instruction(prompt: str, bucket: Bucket, *, lang: str, template_index: int) -> str:
    """The user text of a t2i sample: generate template ``template_index`` of ``lang`` filled in."""
    return _format_template(GENERATE_TEMPLATES, prompt, bucket, lang, template_index)


def edit_instruction(instruction: str, bucket: Bucket, *, lang: str, template_index: int) -> str:
    """The user text of an edit sample: edit template ``template_index`` of ``lang`` filled in."""
    return _format_template(EDIT_TEMPLATES, instruction, bucket, lang, template_index)


# ----------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """An output size in pixels, written ``WxH`` (width first)."""

    w: int
    h: int

    def __post_init__(self) -> None:
        try:  # accept numpy / torch integers, store plain ints (they end up in text and dict keys)
            w, h = operator.index(self.w), operator.index(self.h)
        except TypeError:
            raise ValueError(f"bucket sizes must be integers, got w={self.w!r}, h={self.h!r}") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"bucket sizes must be positive, got w={w}, h={h}")
        object.__setattr__(self, "w", w)
        object.__setattr__(self, "h", h)

    def rows(self, ds: int) -> int:
        """Code rows at downsampling ``ds`` (h / ds); raises if ``ds`` does not divide h."""
        if ds <= 0 or self.h % ds:
            raise ValueError(f"bucket {self}: height {self.h} is not a multiple of the downsampling {ds}")
        return self.h // ds

    def cols(self, ds: int) -> int:
        """Code columns at downsampling ``ds`` (w / ds); raises if ``ds`` does not divide w."""
        if ds <= 0 or self.w % ds:
            raise ValueError(f"bucket {self}: width {self.w} is not a multiple of the downsampling {ds}")
        return self.w // ds

    def grid(self, ds: int) -> tuple[int, int]:
        """``(rows, cols)`` at downsampling ``ds``."""
        return self.rows(ds), self.cols(ds)

    @property
    def aspect(self) -> float:
        """h / w, the ratio the bucket tables are keyed by."""
        return self.h / self.w

    def __str__(self) -> str:
        return f"{self.w}x{self.h}"


_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(text: str, buckets: Mapping[float, Bucket] | Iterable[Bucket] | str | None = None) -> Bucket:
    """Parse ``"704x352"`` (width x height) into ``Bucket(w=704, h=352)``.

    With ``buckets`` (a bucket set or its name in :data:`BUCKET_SETS`) the size must be one of them.
    """
    m = _SIZE_RE.match(str(text))
    if m is None:
        raise ValueError(f"cannot parse size {text!r}: expected WIDTHxHEIGHT, e.g. '704x352'")
    bucket = Bucket(w=int(m.group(1)), h=int(m.group(2)))
    if buckets is not None:
        options = _bucket_list(buckets)
        if bucket not in options:
            raise ValueError(f"size {bucket} is not one of the buckets {[str(b) for b in options]}")
    return bucket


# The 19 buckets around 512x512 (token_layout §8), keyed by the table's h/w key, in table order.
ASPECT_RATIO_512: dict[float, Bucket] = {
    0.5: Bucket(w=704, h=352),
    0.52: Bucket(w=672, h=352),
    0.57: Bucket(w=672, h=384),
    0.6: Bucket(w=640, h=384),
    0.68: Bucket(w=608, h=416),
    0.72: Bucket(w=576, h=416),
    0.78: Bucket(w=576, h=448),
    0.82: Bucket(w=544, h=448),
    0.88: Bucket(w=544, h=480),
    0.94: Bucket(w=512, h=480),
    1.0: Bucket(w=512, h=512),
    1.13: Bucket(w=480, h=544),
    1.21: Bucket(w=448, h=544),
    1.29: Bucket(w=448, h=576),
    1.38: Bucket(w=416, h=576),
    1.46: Bucket(w=416, h=608),
    1.67: Bucket(w=384, h=640),
    1.75: Bucket(w=384, h=672),
    2.0: Bucket(w=352, h=704),
}
SQUARE_384: dict[float, Bucket] = {1.0: Bucket(w=384, h=384)}
SQUARE_512: dict[float, Bucket] = {1.0: Bucket(w=512, h=512)}
# ShapesWorld: square, wide and tall, keyed by their exact h/w.
SHAPES_BUCKETS: dict[float, Bucket] = {
    b.aspect: b for b in (Bucket(w=48, h=48), Bucket(w=72, h=48), Bucket(w=48, h=72))
}
# ShapesWorld stages 1-2 train on the square canvas only, as the 7B stages 1-2 train on squares.
SQUARE_48: dict[float, Bucket] = {1.0: Bucket(w=48, h=48)}
BUCKET_SETS: dict[str, dict[float, Bucket]] = {
    "aspect512": ASPECT_RATIO_512,
    "square48": SQUARE_48,
    "square384": SQUARE_384,
    "square512": SQUARE_512,
    "shapes": SHAPES_BUCKETS,
}


def _bucket_items(buckets: Mapping[float, Bucket] | Iterable[Bucket] | str) -> list[tuple[float, Bucket]]:
    if isinstance(buckets, str):
        if buckets not in BUCKET_SETS:
            raise ValueError(f"unknown bucket set {buckets!r}; expected one of {sorted(BUCKET_SETS)}")
        buckets = BUCKET_SETS[buckets]
    if isinstance(buckets, Mapping):
        items = [(float(k), b) for k, b in buckets.items()]
    else:
        items = [(b.aspect, b) for b in buckets]
    if not items:
        raise ValueError("empty bucket set")
    return items


def _bucket_list(buckets: Mapping[float, Bucket] | Iterable[Bucket] | str) -> list[Bucket]:
    return [b for _, b in _bucket_items(buckets)]


def closest_bucket(w: int, h: int, buckets: Mapping[float, Bucket] | Iterable[Bucket] | str) -> Bucket:
    """The bucket whose ratio key is closest to ``h / w``; on a tie the earlier one wins.

    A mapping is matched by its keys (the 512 table's rounded keys, as the reference does); a plain
    iterable of buckets by each bucket's exact h/w. ``buckets`` may also name a set in :data:`BUCKET_SETS`.
    """
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    ratio = h / w
    best: Bucket | None = None
    best_diff = float("inf")
    for key, bucket in _bucket_items(buckets):
        diff = abs(key - ratio)
        if diff < best_diff:  # strict: ties keep the earlier bucket
            best, best_diff = bucket, diff
    assert best is not None
    return best


def resize_to_bucket(img: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale ``img`` (bicubic) so it covers the bucket, then centre-crop to exactly ``bucket``.

    The reference rule (token_layout §8, torchvision Resize + CenterCrop on PIL): if bucket_h/img_h >
    bucket_w/img_w the new size is (h=bucket_h, w=int(img_w·bucket_h/img_h)), else (h=int(img_h·bucket_w/
    img_w), w=bucket_w). Returns an RGB image of size (bucket.w, bucket.h).
    """
    img = img.convert("RGB")
    img_w, img_h = img.size
    if bucket.h / img_h > bucket.w / img_w:
        new_h, new_w = bucket.h, max(bucket.w, int(img_w * bucket.h / img_h))
    else:
        new_h, new_w = max(bucket.h, int(img_h * bucket.w / img_w)), bucket.w
    if (new_w, new_h) != (img_w, img_h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # torchvision's center_crop offsets: int(round((size - crop) / 2)).
    top = int(round((new_h - bucket.h) / 2.0))
    left = int(round((new_w - bucket.w) / 2.0))
    return img.crop((left, top, left + bucket.w, top + bucket.h))


def to_tensor_pm1(img: Image.Image) -> Tensor:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return t.sub_(0.5).div_(0.5)


# ----------------------------------------------------------------------------------------------------
# Built samples
# ----------------------------------------------------------------------------------------------------


@dataclass
class BuiltSample:
    """One tokenised sample. All 1-D long tensors have the same length L; labels are unshifted.

    - ``input_ids``: token ids.
    - ``labels``: the id at positions trained as text (response structure tokens ``<|generate_start|>``,
      EOLs, ``<|generate_end|>``, ``<|im_end|>``, ``'\\n'``; for und the assistant answers with their
      ``<|im_end|>\\n``), -100 elsewhere. ``<|generate_image_pad|>`` positions are -100 (the reference's
      ``text_token_labels``). Inference prompts are all -100.
    - ``image_labels``: target VQ codes at ``<|generate_image_pad|>`` positions in raster order, -100
      elsewhere (all -100 without codes).
    - ``mm_token_type_ids``: 1 exactly at the ViT ``<|image_pad|>`` tokens, 0 elsewhere (edit pixel-block
      pads are 0). transformers needs it to give ViT tokens 3-D M-RoPE positions.
    - ``task``: "t2i" | "edit" | "und"; ``grid``: (rows, cols) of the generated image, or None.
    - optional image inputs, attached by the caller: ``pixel_values`` [n, 1176] and ``image_grid_thw``
      [n_images, 3] for the ViT, ``pixel_latents`` [R·C, D] for the edit pixel block.
    """

    input_ids: Tensor
    labels: Tensor
    image_labels: Tensor
    mm_token_type_ids: Tensor
    task: str
    grid: tuple[int, int] | None = None
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    pixel_latents: Tensor | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        n = self.input_ids.shape
        for name in ("input_ids", "labels", "image_labels", "mm_token_type_ids"):
            t = getattr(self, name)
            if t.ndim != 1 or t.shape != n or t.dtype != torch.long:
                raise ValueError(
                    f"{name} must be a 1-D long tensor of length {n[0]}, got {t.dtype} {tuple(t.shape)}"
                )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class _Writer:
    """Accumulates a sequence. Text is buffered and encoded in one call up to the next token id, so
    text between two special tokens is tokenised exactly as the reference tokenised the whole string.
    """

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.image_labels: list[int] = []
        self.mm: list[int] = []
        self._text: list[str] = []
        self._text_label = False

    def text(self, s: str, *, label: bool = False) -> None:
        if not s:
            return
        if self._text and label != self._text_label:
            self._flush()
        self._text.append(s)
        self._text_label = label

    def _flush(self) -> None:
        if not self._text:
            return
        ids = self.tok.encode("".join(self._text), add_special_tokens=False)
        self._text = []
        self.ids += ids
        self.labels += ids if self._text_label else [IGNORE_INDEX] * len(ids)
        self.image_labels += [IGNORE_INDEX] * len(ids)
        self.mm += [0] * len(ids)

    def token(self, idx: int, n: int = 1, *, label: bool = False, vit: bool = False) -> None:
        self._flush()
        self.ids += [idx] * n
        self.labels += [idx if label else IGNORE_INDEX] * n
        self.image_labels += [IGNORE_INDEX] * n
        self.mm += [1 if vit else 0] * n

    def codes(self, pad: int, row: list[int] | None, n: int) -> None:
        """``n`` image placeholders; ``row`` (length n) goes to image_labels when given."""
        self._flush()
        self.ids += [pad] * n
        self.labels += [IGNORE_INDEX] * n
        self.image_labels += row if row is not None else [IGNORE_INDEX] * n
        self.mm += [0] * n

    def finish(self, task: str, grid: tuple[int, int] | None, *, prompt_only: bool = False) -> BuiltSample:
        self._flush()

        def t(x: list[int]) -> Tensor:
            return torch.tensor(x, dtype=torch.long)

        labels = [IGNORE_INDEX] * len(self.ids) if prompt_only else self.labels
        image_labels = [IGNORE_INDEX] * len(self.ids) if prompt_only else self.image_labels
        return BuiltSample(t(self.ids), t(labels), t(image_labels), t(self.mm), task=task, grid=grid)


def _system(w: _Writer, ids: TokenIds) -> None:
    w.token(ids.im_start)
    w.text("system\n" + SYSTEM_PROMPT)
    w.token(ids.im_end)
    w.text("\n")


def _assistant_header(w: _Writer, ids: TokenIds) -> None:
    w.token(ids.im_start)
    w.text("assistant\n")


def _check_codes(codes: Tensor | None, rows: int, cols: int) -> list[list[int]] | None:
    if codes is None:
        return None
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a LongTensor [{rows}, {cols}] or None, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if tuple(codes.shape) != (rows, cols):
        raise ValueError(
            f"codes have shape {tuple(codes.shape)}, but the bucket needs [{rows}, {cols}] (rows, cols)"
        )
    if rows * cols and int(codes.min()) < 0:
        raise ValueError("codes must be non-negative VQ indices")
    return codes.tolist()


def _check_n_vit(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"number of ViT tokens must be a positive int, got {n!r}")
    return n


def _grid_block(
    w: _Writer,
    *,
    start: int,
    end: int,
    pad: int,
    eol: int | None,
    rows: int,
    cols: int,
    codes: list[list[int]] | None,
    label: bool,
    stop_after_start: bool = False,
) -> None:
    """``start`` (pad×cols [eol])×rows ``end`` with no EOL after the last row (or none at all)."""
    w.token(start, label=label)
    if stop_after_start:
        return
    for r in range(rows):
        w.codes(pad, codes[r] if codes is not None else None, cols)
        if eol is not None and r < rows - 1:
            w.token(eol, label=label)
    w.token(end, label=label)


def _target_response(
    w: _Writer,
    ids: TokenIds,
    rows: int,
    cols: int,
    codes: list[list[int]] | None,
    *,
    eol: bool,
    prompt_only: bool,
) -> None:
    """``<|im_start|>assistant\\n`` + generated block + ``<|im_end|>\\n`` (labelled from generate_start)."""
    _assistant_header(w, ids)
    _grid_block(
        w,
        start=ids.generate_start,
        end=ids.generate_end,
        pad=ids.generate_image_pad,
        eol=ids.eol if eol else None,
        rows=rows,
        cols=cols,
        codes=codes,
        label=True,
        stop_after_start=prompt_only,
    )
    if not prompt_only:
        w.token(ids.im_end, label=True)
        w.text("\n", label=True)


def _vit_block(w: _Writer, ids: TokenIds, n_vit: int) -> None:
    w.token(ids.vision_start)
    w.token(ids.image_pad, _check_n_vit(n_vit), vit=True)
    w.token(ids.vision_end)


def _t2i(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    prompt: str,
    bucket: Bucket,
    codes: Tensor | None,
    *,
    lang: str,
    template_index: int,
    layout: str,
    ds: int,
    drop_prompt: bool,
    prompt_only: bool,
) -> BuiltSample:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    rows, cols = bucket.grid(ds)
    code_rows = _check_codes(codes, rows, cols)
    text = generate_instruction(
        "" if drop_prompt else prompt, bucket, lang=lang, template_index=template_index
    )
    aspect = layout == "aspect"
    if aspect:  # resolve before writing: a missing indicator is a config error worth a clear message
        ind_h, ind_w = ids.indicator(bucket.h), ids.indicator(bucket.w)
    w = _Writer(tok)
    _system(w, ids)
    w.token(ids.im_start)
    w.text("user\n" + text)
    if aspect:
        w.text(" ")
        w.token(ind_h)
        w.token(ind_w)
    w.token(ids.im_end)
    w.text("\n")
    _target_response(w, ids, rows, cols, code_rows, eol=aspect, prompt_only=prompt_only)
    return w.finish("t2i", (rows, cols), prompt_only=prompt_only)


def build_t2i(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    prompt: str,
    bucket: Bucket,
    codes: Tensor | None,
    *,
    lang: str,
    template_index: int,
    layout: str,
    ds: int,
    drop_prompt: bool = False,
) -> BuiltSample:
    """A text-to-image training sample.

    ``layout="square"``: token_layout §3 (no EOL, no indicators). ``layout="aspect"``: §4.1 (EOL after
    every row but the last; ``' ' <indicator:h><indicator:w>`` ends the user turn). ``codes`` is a
    LongTensor [h/ds, w/ds] in raster order, or None. ``drop_prompt=True`` is the classifier-free-guidance
    null sample: the prompt becomes ``""`` while the template and indicators stay.
    """
    return _t2i(
        tok,
        ids,
        prompt,
        bucket,
        codes,
        lang=lang,
        template_index=template_index,
        layout=layout,
        ds=ds,
        drop_prompt=drop_prompt,
        prompt_only=False,
    )


def t2i_prompt(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    prompt: str,
    bucket: Bucket,
    *,
    lang: str,
    template_index: int,
    layout: str,
    ds: int,
    drop_prompt: bool = False,
) -> BuiltSample:
    """The :func:`build_t2i` layout cut right after ``<|generate_start|>`` (assistant header included).

    Labels are all -100; ``grid`` tells the sampler how many rows/cols to generate.
    """
    return _t2i(
        tok,
        ids,
        prompt,
        bucket,
        None,
        lang=lang,
        template_index=template_index,
        layout=layout,
        ds=ds,
        drop_prompt=drop_prompt,
        prompt_only=True,
    )


def _edit(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    instruction: str,
    bucket: Bucket,
    codes: Tensor | None,
    n_vit_tokens: int,
    *,
    lang: str,
    template_index: int,
    ds: int,
    drop_prompt: bool,
    prompt_only: bool,
) -> BuiltSample:
    rows, cols = bucket.grid(ds)
    code_rows = _check_codes(codes, rows, cols)
    _check_n_vit(n_vit_tokens)
    text = edit_instruction(
        "" if drop_prompt else instruction, bucket, lang=lang, template_index=template_index
    )
    ind_h, ind_w = ids.indicator(bucket.h), ids.indicator(bucket.w)
    w = _Writer(tok)
    _system(w, ids)
    w.token(ids.im_start)
    w.text("user\n")
    # Source pixel block first (the stage-4 `pixel_pad_left=True` layout); its <|image_pad|> slots take
    # pixel_adapter(latent), so they are not ViT tokens (mm type 0, 1-D positions).
    _grid_block(
        w,
        start=ids.pixel_start,
        end=ids.pixel_end,
        pad=ids.image_pad,
        eol=ids.eol,
        rows=rows,
        cols=cols,
        codes=None,
        label=False,
    )
    _vit_block(w, ids, n_vit_tokens)
    w.text(text + " ")
    w.token(ind_h)
    w.token(ind_w)
    w.token(ids.im_end)
    w.text("\n")
    _target_response(w, ids, rows, cols, code_rows, eol=True, prompt_only=prompt_only)
    return w.finish("edit", (rows, cols), prompt_only=prompt_only)


def build_edit(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    instruction: str,
    bucket: Bucket,
    codes: Tensor | None,
    n_vit_tokens: int,
    *,
    lang: str,
    template_index: int,
    ds: int,
    drop_prompt: bool = False,
) -> BuiltSample:
    """An editing training sample (token_layout §5.1).

    User turn: pixel block of the source (``bucket`` grid at ``ds``, the same grid as the target), ViT
    block of ``n_vit_tokens`` pads, the edit template and ``' ' <indicator:h><indicator:w>``. Response as
    aspect t2i. ``drop_prompt=True`` empties the instruction (the caller must also blacken the source
    image in both streams, as the reference CFG dropout does).
    """
    return _edit(
        tok,
        ids,
        instruction,
        bucket,
        codes,
        n_vit_tokens,
        lang=lang,
        template_index=template_index,
        ds=ds,
        drop_prompt=drop_prompt,
        prompt_only=False,
    )


def edit_prompt(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    instruction: str,
    bucket: Bucket,
    n_vit_tokens: int,
    *,
    lang: str,
    template_index: int,
    ds: int,
    drop_prompt: bool = False,
) -> BuiltSample:
    """The :func:`build_edit` layout cut right after ``<|generate_start|>`` (with the assistant header,
    unlike the released inference script). Labels are all -100."""
    return _edit(
        tok,
        ids,
        instruction,
        bucket,
        None,
        n_vit_tokens,
        lang=lang,
        template_index=template_index,
        ds=ds,
        drop_prompt=drop_prompt,
        prompt_only=True,
    )


# ----------------------------------------------------------------------------------------------------
# Understanding
# ----------------------------------------------------------------------------------------------------

_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# `<image>` plus one adjacent newline on each side, as the reference regex removes.
_IMAGE_TAG_RE = re.compile(r"\n?<image>\n?")

Conversation = Sequence[Mapping[str, str] | Sequence[str]]


def _normalise_conversation(
    conversation: Conversation, n_images: int, *, last_role: str
) -> list[tuple[str, str]]:
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversation):
        if isinstance(turn, Mapping):
            role, content = turn.get("role"), turn.get("content")
        elif isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2:
            role, content = turn
        else:
            raise ValueError(
                f"turn {i} must be {{'role': ..., 'content': ...}} or (role, content), got {turn!r}"
            )
        if role not in _ROLE_ALIASES:
            raise ValueError(f"turn {i}: unknown role {role!r}; expected 'user' or 'assistant'")
        if not isinstance(content, str):
            raise TypeError(f"turn {i}: content must be a str, got {type(content).__name__}")
        role = _ROLE_ALIASES[role]
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"turn {i} is {role!r}; turns must alternate user/assistant starting with user")
        if role == "assistant" and IMAGE_TAG in content:
            raise ValueError(f"turn {i}: <image> may only appear in user turns")
        turns.append((role, content))
    if not turns or turns[-1][0] != last_role:
        raise ValueError(f"the conversation must be non-empty and end with a {last_role} turn")
    n_tags = sum(content.count(IMAGE_TAG) for _, content in turns)
    if n_images and n_tags == 0:
        # The reference puts untagged images at the start of the first user turn.
        turns[0] = (turns[0][0], IMAGE_TAG + "\n" + turns[0][1])
        n_tags = n_images
    if n_tags != n_images:
        raise ValueError(f"the conversation has {n_tags} <image> tag(s) but {n_images} image(s) were given")
    return turns


def _und(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    conversation: Conversation,
    n_vit_tokens_per_image: Sequence[int],
    *,
    prompt_only: bool,
) -> BuiltSample:
    n_vit = [_check_n_vit(n) for n in n_vit_tokens_per_image]
    turns = _normalise_conversation(
        conversation, len(n_vit), last_role="user" if prompt_only else "assistant"
    )
    w = _Writer(tok)
    _system(w, ids)
    image_index = 0
    for role, content in turns:
        w.token(ids.im_start)
        if role == "user":
            w.text("user\n")
            parts = _IMAGE_TAG_RE.split(content)
            for k, part in enumerate(parts):
                w.text(part)
                if k < len(parts) - 1:
                    _vit_block(w, ids, n_vit[image_index])
                    image_index += 1
            w.token(ids.im_end)
            w.text("\n")
        else:
            # Header and answer are encoded apart so the label boundary is exact.
            w.text("assistant\n")
            w.text(content, label=True)
            w.token(ids.im_end, label=True)
            w.text("\n", label=True)
    if prompt_only:
        _assistant_header(w, ids)
    return w.finish("und", None, prompt_only=prompt_only)


def build_und(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    conversation: Conversation,
    n_vit_tokens_per_image: Sequence[int],
) -> BuiltSample:
    """An understanding training sample (token_layout §6).

    ``conversation``: alternating turns ``{"role": "user"|"assistant", "content": str}`` (or ``(role,
    content)`` pairs; LLaVA's "human"/"gpt" are accepted), starting with user and ending with assistant.
    Each ``<image>`` in a user turn becomes ``<|vision_start|><|image_pad|>×N<|vision_end|>`` (one adjacent
    ``\\n`` removed on each side); N comes from ``n_vit_tokens_per_image`` in order. Images without any tag
    go before the first user text (``<image>\\n`` prepended). Labels: each answer plus its ``<|im_end|>\\n``.
    """
    return _und(tok, ids, conversation, n_vit_tokens_per_image, prompt_only=False)


def und_prompt(
    tok: PreTrainedTokenizerBase,
    ids: TokenIds,
    conversation: Conversation,
    n_vit_tokens_per_image: Sequence[int],
) -> BuiltSample:
    """An understanding prompt: the conversation (history allowed, ending with a user turn) followed by
    ``<|im_start|>assistant\\n``. Labels are all -100."""
    return _und(tok, ids, conversation, n_vit_tokens_per_image, prompt_only=True)


# ----------------------------------------------------------------------------------------------------
# Batching and debugging
# ----------------------------------------------------------------------------------------------------


def collate(samples: Sequence[BuiltSample], pad_id: int, padding_side: str = "right") -> dict[str, Tensor]:
    """Stack samples to [B, L_max].

    ``input_ids`` padded with ``pad_id``, ``attention_mask`` 1/0 (long), ``labels`` and ``image_labels``
    padded with -100, ``mm_token_type_ids`` with 0. ``padding_side="left"`` is for batched inference.
    Optional image inputs are concatenated in sample order when any sample has them: ``pixel_values``
    [Σn, 1176], ``image_grid_thw`` [n_images, 3], ``pixel_latents`` [ΣR·C, D].
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    batch, length = len(samples), max(len(s) for s in samples)
    fills = {
        "input_ids": pad_id,
        "labels": IGNORE_INDEX,
        "image_labels": IGNORE_INDEX,
        "mm_token_type_ids": 0,
    }
    out = {k: torch.full((batch, length), v, dtype=torch.long) for k, v in fills.items()}
    out["attention_mask"] = torch.zeros(batch, length, dtype=torch.long)
    for i, s in enumerate(samples):
        sl = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
        for k in fills:
            out[k][i, sl] = getattr(s, k)
        out["attention_mask"][i, sl] = 1
    for k in ("pixel_values", "image_grid_thw", "pixel_latents"):
        parts = [getattr(s, k) for s in samples if getattr(s, k) is not None]
        if parts:
            out[k] = torch.cat(parts, dim=0)
    return out


def render_tokens(
    tok: PreTrainedTokenizerBase, ids: Tensor | Sequence[int], *, merge_text: bool = False
) -> str:
    """Render ids as the reference documents them: added/special tokens by name, runs of the same one as
    ``<|image_pad|>×24``, ordinary tokens quoted and JSON-escaped (``'\\n'``, ``' \\"'``).

    ``merge_text=True`` decodes each run of ordinary tokens as one quoted string, which makes a layout
    comparable across tokenizers (used by the tests; handy to see what the model is fed).
    """
    seq = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    added: dict[int, Any] = dict(tok.added_tokens_decoder)
    out: list[str] = []
    i = 0
    while i < len(seq):
        j = i + 1
        if seq[i] in added:
            while j < len(seq) and seq[j] == seq[i]:
                j += 1
            name = str(added[seq[i]])
            out.append(name if j - i == 1 else f"{name}×{j - i}")
        elif merge_text:
            while j < len(seq) and seq[j] not in added:
                j += 1
            out.append("'" + json.dumps(tok.decode(seq[i:j]), ensure_ascii=False)[1:-1] + "'")
        else:
            out.append("'" + json.dumps(tok.decode([seq[i]]), ensure_ascii=False)[1:-1] + "'")
        i = j
    return " ".join(out)
