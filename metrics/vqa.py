"""Understanding accuracy for free-form (VQA-style) answers, English and Chinese.

:func:`normalize_answer` maps an answer to a canonical form; :class:`VQAAccuracy` scores normalised exact
match against one or several reference answers, with the VQAv2 rule ``min(#matching references / 3, 1)``
when three or more references are given.

This is for open benchmarks and free-form answers; ShapesWorld's own answers are scored with the spec's
stricter rule (:func:`datamodules.shapes_world.answer_correct`) by :class:`metrics.shapes_eval.UndAccuracy`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["VQAAccuracy", "normalize_answer", "vqa_score"]

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_ZH_NUMERALS = {
    "零": "0", "一": "1", "二": "2", "两": "2", "三": "3", "四": "4", "五": "5",
    "六": "6", "七": "7", "八": "8", "九": "9", "十": "10",
}
# Apostrophes are dropped rather than turned into spaces so that "don't" / "dont" and "it's" / "its" agree.
_APOSTROPHES = frozenset("'\u2018\u2019\u02bc`")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_GAP = re.compile(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])")
_ZH_COUNT = re.compile(rf"([{''.join(_ZH_NUMERALS)}]|\d+)\s*[个個]?")


def normalize_answer(text: str) -> str:
    """Canonical form of a free-form answer (English or Chinese).

    Steps, in order:

    1. Unicode NFKC (full-width ``，？！（）１２`` etc. become ASCII) and lower case;
    2. thousands separators inside numbers removed (``1,000`` -> ``1000``);
    3. apostrophes removed (``don't`` -> ``dont``); every other Unicode punctuation character (ASCII and
       Chinese: ``。、，“”《》…``) becomes a space, except a ``.`` between two digits (``3.5`` is kept);
    4. English articles ``a``/``an``/``the`` dropped; number words ``zero`` .. ``twenty`` -> digits;
    5. whitespace collapsed to single spaces and stripped; whitespace between two CJK characters removed
       (Chinese does not separate words with spaces);
    6. a bare Chinese count - one numeral ``零一二两三...十`` or digits, optionally followed by the
       classifier ``个`` - becomes digits (``三个`` -> ``3``, ``3个`` -> ``3``).
    """
    t = _THOUSANDS.sub("", unicodedata.normalize("NFKC", text).lower())
    chars: list[str] = []
    for i, ch in enumerate(t):
        if ch in _APOSTROPHES:
            continue
        if unicodedata.category(ch).startswith("P"):
            decimal = ch == "." and 0 < i < len(t) - 1 and t[i - 1].isdigit() and t[i + 1].isdigit()
            chars.append(ch if decimal else " ")
        else:
            chars.append(ch)
    words = [_NUMBER_WORDS.get(w, w) for w in "".join(chars).split() if w not in _ARTICLES]
    out = _CJK_GAP.sub("", " ".join(words))
    m = _ZH_COUNT.fullmatch(out)
    if m is not None:
        out = _ZH_NUMERALS.get(m.group(1), m.group(1))
    return out


def vqa_score(pred: str, references: str | Sequence[str]) -> float:
    """Score of one prediction against its reference answer(s), after :func:`normalize_answer`.

    One or two references: 1.0 when the prediction matches any of them, else 0.0. Three or more (VQAv2
    style, usually 10 human answers): ``min(#matching references / 3, 1)``.
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("each question needs at least one reference answer")
    p = normalize_answer(pred)
    matches = sum(normalize_answer(r) == p for r in refs)
    if len(refs) >= 3:
        return min(matches / 3.0, 1.0)
    return float(matches > 0)


class VQAAccuracy(Metric):
    """Mean :func:`vqa_score` over questions, synced across processes.

    ``update(preds, references)``: ``preds`` a list of answers; ``references`` one entry per prediction,
    either a single reference string or a list of reference strings (see :func:`vqa_score` for the rule).
    ``compute()`` returns the mean score as a float tensor (NaN before any update).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    score_sum: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # float64 sum: thirds (1/3, 2/3) accumulate without visible drift over large benchmarks.
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Add a batch of predictions with their reference answer(s)."""
        if isinstance(preds, str):
            raise TypeError("preds must be a list of strings, not a single string")
        if len(preds) != len(references):
            raise ValueError(f"{len(preds)} predictions but {len(references)} reference entries")
        self.score_sum += sum(vqa_score(p, r) for p, r in zip(preds, references, strict=True))
        self.total += len(preds)

    def compute(self) -> Tensor:
        """Mean score in ``[0, 1]`` (float32 tensor); NaN when nothing was scored."""
        if int(self.total) == 0:
            return torch.tensor(float("nan"))
        return (self.score_sum / self.total).float()
