"""ShapesEval (spec ``shared/specs/shapes-world.md``, section "Scores") as torchmetrics ``Metric`` s.

Three metrics and one helper score:

- :class:`T2IAccuracy` - text-to-image: an image is correct when its size equals the requested size AND the
  detector (:mod:`metrics.detector`) reads exactly the prompt's scene;
- :class:`UndAccuracy` - understanding: exact match after the spec's normalisation
  (:func:`datamodules.shapes_world.answer_correct`; captions compared as parsed scenes);
- :class:`EditAccuracy` - editing: the output has the source's size and its detected scene equals the
  target scene;
- :func:`tokenizer_ceiling` - T2I accuracy of ground-truth scenes passed through an image tokenizer's
  encode + decode (the best any generator can score with that tokenizer).

All counters are ``long`` tensor states with ``dist_reduce_fx="sum"``, so the metrics run inside Lightning
validation loops and ``compute()`` syncs them across processes. Each metric also keeps a Python list of
failures (``metric.failures``) for reports; it is local to the process (never synced) and capped at
``max_failures`` entries. ``compute()`` returns a dict of float tensors; a group without samples gives NaN.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from datamodules.shapes_world import (
    EDIT_OPS,
    LANGS,
    QTYPES,
    SIZES,
    Scene,
    answer_correct,
    scene_triples,
    t2i_samples,
)
from metrics.detector import Triple, detect

__all__ = [
    "EditAccuracy",
    "T2IAccuracy",
    "UndAccuracy",
    "to_uint8",
    "tokenizer_ceiling",
]

#: Anything :func:`to_uint8` accepts: one batch tensor/array or a sequence of single images.
Images = Tensor | np.ndarray | Sequence[Any]

_SIZE_KEYS: tuple[str, ...] = tuple(f"{w}x{h}" for w, h in SIZES)


# --------------------------------------------------------------------------------------------------
# Image conversion
# --------------------------------------------------------------------------------------------------


def _float_to_uint8(x: Tensor) -> Tensor:
    # [-1, 1] -> [0, 255]: clamp first so that out-of-range decoder outputs saturate instead of wrapping.
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _tensor_batch(t: Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] or [3, H, W] tensor (uint8, or float in [-1, 1]) -> list of uint8 [H, W, 3]."""
    t = t.detach().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected an image tensor [B, 3, H, W] or [3, H, W], got shape {tuple(t.shape)}")
    if t.is_floating_point():
        t = _float_to_uint8(t)
    elif t.dtype != torch.uint8:
        raise TypeError(f"image tensors must be uint8 or float in [-1, 1], got {t.dtype}")
    return list(t.permute(0, 2, 3, 1).contiguous().numpy())


def _array_batch(a: np.ndarray) -> list[np.ndarray]:
    """[B, H, W, 3] or [H, W, 3] array (uint8, or float in [-1, 1]) -> list of uint8 [H, W, 3]."""
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected an image array [B, H, W, 3] or [H, W, 3], got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        return _tensor_batch(torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2))
    if a.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 or float in [-1, 1], got {a.dtype}")
    return [np.ascontiguousarray(x) for x in a]


def to_uint8(images: Images) -> list[np.ndarray]:
    """Convert images to a list of ``uint8 [H, W, 3]`` arrays (the detector's input).

    Accepted (channel order follows each library's convention):

    - a tensor ``[B, 3, H, W]`` or ``[3, H, W]``: ``uint8`` as is, float taken as ``[-1, 1]`` (the model's
      range), clamped, mapped to ``[0, 255]`` and rounded to nearest;
    - a numpy array ``[B, H, W, 3]`` or ``[H, W, 3]``: ``uint8`` as is, float taken as ``[-1, 1]``;
    - a sequence (list/tuple) of single images, each a tensor ``[3, H, W]``, an array ``[H, W, 3]`` or a
      ``PIL.Image`` (converted to RGB); images may differ in size.

    Raises ``ValueError`` for a wrong shape and ``TypeError`` for an unsupported dtype or object.
    """
    if isinstance(images, Tensor):
        return _tensor_batch(images)
    if isinstance(images, np.ndarray):
        return _array_batch(images)
    if isinstance(images, Sequence) and not isinstance(images, str | bytes):
        out: list[np.ndarray] = []
        for img in images:
            if isinstance(img, Tensor):
                if img.ndim != 3:
                    raise ValueError(f"list elements must be single images [3, H, W], got {tuple(img.shape)}")
                out.extend(_tensor_batch(img))
            elif isinstance(img, np.ndarray):
                if img.ndim != 3:
                    raise ValueError(f"list elements must be single images [H, W, 3], got {img.shape}")
                out.extend(_array_batch(img))
            elif hasattr(img, "convert") and hasattr(img, "size"):  # PIL.Image without importing PIL here
                out.append(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
            else:
                raise TypeError(f"unsupported image type {type(img).__name__}")
        return out
    raise TypeError(f"unsupported images type {type(images).__name__}")


# --------------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------------


def _fmt_triples(triples: Iterable[Triple]) -> str:
    return "[" + ", ".join(f"{c} {s} @{r},{k}" for c, s, (r, k) in sorted(triples)) + "]"


def _scene_diff(detected: frozenset[Triple], expected: frozenset[Triple]) -> str:
    parts = []
    missing, extra = expected - detected, detected - expected
    if missing:
        parts.append(f"missing {_fmt_triples(missing)}")
    if extra:
        parts.append(f"extra {_fmt_triples(extra)}")
    return "; ".join(parts)


def _check_len(name: str, values: Sequence[Any], n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected {n} (one per sample)")


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")


class _GroupAccuracy(Metric):
    """Hits and totals per named group, as two ``long`` vector states summed across processes.

    Subclasses set :attr:`GROUPS` (``"all"`` first) and map group names to output keys in
    :meth:`_key`. ``failures`` is a per-process Python list of dicts with at least ``index`` (the
    sample's position among all samples this metric has seen since the last reset, in update order)
    and ``reason``.
    """

    full_state_update = False  # the state is a plain sum of batch states: forward() needs one update
    is_differentiable = False
    higher_is_better = True

    GROUPS: tuple[str, ...] = ("all",)

    hits: Tensor
    totals: Tensor

    def __init__(self, max_failures: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._index = {g: i for i, g in enumerate(self.GROUPS)}
        self.add_state("hits", torch.zeros(len(self.GROUPS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("totals", torch.zeros(len(self.GROUPS), dtype=torch.long), dist_reduce_fx="sum")
        self.max_failures = int(max_failures)
        self.failures: list[dict[str, Any]] = []
        self._n_seen = 0  # samples seen by this process since reset (failure indices)

    # -- bookkeeping --------------------------------------------------------------------------------

    def _accumulate(self, hits: list[int], totals: list[int]) -> None:
        # One tensor add per update (not per sample) keeps update cheap on GPU-resident states.
        self.hits += torch.tensor(hits, dtype=torch.long, device=self.hits.device)
        self.totals += torch.tensor(totals, dtype=torch.long, device=self.totals.device)

    def _new_counts(self) -> tuple[list[int], list[int]]:
        return [0] * len(self.GROUPS), [0] * len(self.GROUPS)

    def _count(self, hits: list[int], totals: list[int], groups: Iterable[str], ok: bool) -> None:
        for g in groups:
            i = self._index.get(g)
            if i is not None:  # unknown groups (e.g. a non-ShapesWorld size) only count in "all"
                totals[i] += 1
                hits[i] += int(ok)

    def _fail(self, record: dict[str, Any]) -> None:
        if len(self.failures) < self.max_failures:
            self.failures.append(record)

    # -- results ------------------------------------------------------------------------------------

    def _key(self, group: str) -> str:
        return "accuracy" if group == "all" else f"accuracy_{group}"

    def compute(self) -> dict[str, Tensor]:
        """Accuracy per group as float tensors; NaN for a group without samples."""
        hits, totals = self.hits.double(), self.totals.double()
        acc = torch.where(totals > 0, hits / totals.clamp_min(1), torch.full_like(totals, float("nan")))
        return {self._key(g): acc[i].float() for i, g in enumerate(self.GROUPS)}

    def counts(self) -> dict[str, int]:
        """Number of samples per group (``n`` overall, ``n_<group>`` otherwise), for reports."""
        totals = self.totals.tolist()
        return {("n" if g == "all" else f"n_{g}"): int(totals[i]) for i, g in enumerate(self.GROUPS)}

    # -- torchmetrics hooks -------------------------------------------------------------------------

    def reset(self) -> None:
        """Reset the synced counters and the local failure list."""
        super().reset()
        self.failures = []
        self._n_seen = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """As ``Metric.forward`` (returns the batch's ``compute()``), keeping the running failure list.

        The base class resets the metric to compute the batch value, which would drop earlier failures
        and restart indices; they are restored here and the batch's indices shifted after them.
        """
        failures, seen = self.failures, self._n_seen
        out = super().forward(*args, **kwargs)
        batch = [{**f, "index": f["index"] + seen} for f in self.failures]
        self.failures = (failures + batch)[: self.max_failures]
        self._n_seen += seen
        return out

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge counters (``Metric.merge_state``); an incoming metric's failures are appended with their
        indices shifted after this metric's samples (the merged order is "ours, then theirs")."""
        seen = self._n_seen
        super().merge_state(incoming_state)
        if isinstance(incoming_state, _GroupAccuracy):
            shifted = [{**f, "index": f["index"] + seen} for f in incoming_state.failures]
            self.failures = (self.failures + shifted)[: self.max_failures]
            self._n_seen = seen + incoming_state._n_seen


# --------------------------------------------------------------------------------------------------
# Text-to-image
# --------------------------------------------------------------------------------------------------


def _attribute_checks(detected: frozenset[Triple], expected: frozenset[Triple]) -> dict[str, bool]:
    """Per-attribute agreement of a detected scene with the expected one (see :class:`T2IAccuracy`)."""
    return {
        "count": len(detected) == len(expected),
        "colour": Counter(c for c, _, _ in detected) == Counter(c for c, _, _ in expected),
        "shape": Counter(s for _, s, _ in detected) == Counter(s for _, s, _ in expected),
        "position": Counter(p for _, _, p in detected) == Counter(p for _, _, p in expected),
    }


class T2IAccuracy(_GroupAccuracy):
    """ShapesEval text-to-image accuracy.

    ``update(images, scenes, sizes, langs, keys=None)``: one entry per generated image; ``images`` as
    :func:`to_uint8` accepts (a ``[B, 3, H, W]`` tensor in ``[-1, 1]`` or ``uint8``, or a list of ``uint8
    [H, W, 3]`` arrays, which may differ in size), ``scenes`` the prompts' scenes, ``sizes`` the requested
    ``(width, height)``, ``langs`` the prompt languages (``"en"``/``"zh"``), ``keys`` optional sample ids
    copied into failure records.

    An image is **correct** when its size equals the requested size AND its detected scene (the set of
    ``(colour, shape, cell)``) equals the prompt's scene exactly.

    ``compute()`` keys (float tensors, NaN for a group without samples):

    - ``accuracy`` overall; ``accuracy_en``/``accuracy_zh`` per prompt language; ``accuracy_n1``/``_n2``/
      ``_n3`` per object count of the prompt's scene; ``accuracy_48x48``/``_72x48``/``_48x72`` per requested
      size (``WxH``; other sizes only count overall);
    - per attribute, over all images, comparing the detected scene D with the expected scene E on the
      image's content alone (independent of the size check):

      - ``count``: ``|D| == |E|`` (number of detected objects equals the expected number);
      - ``colour``: the multiset of colours in D equals that of E (every colour right);
      - ``shape``: the multiset of shapes in D equals that of E (every shape right);
      - ``position``: the multiset of cells in D equals that of E (every position right);
      - ``size``: the image is exactly the requested ``width x height``.

      Multisets make the checks independent of one another: a wrong colour on a correctly placed shape
      fails ``colour`` only; an object in the wrong cell fails ``position`` only; a missing object fails
      ``count`` (and the attributes it carried).

    ``failures``: dicts ``{index, key, reason, lang, size, expected, detected}`` for wrong images.
    """

    GROUPS = ("all", *LANGS, "n1", "n2", "n3", *_SIZE_KEYS, "count", "colour", "shape", "position", "size")
    _ATTRS = ("count", "colour", "shape", "position", "size")

    def _key(self, group: str) -> str:
        return group if group in self._ATTRS else super()._key(group)

    def update(
        self,
        images: Images,
        scenes: Sequence[Scene],
        sizes: Sequence[tuple[int, int]],
        langs: Sequence[str],
        keys: Sequence[str] | None = None,
    ) -> None:
        """Score a batch of generated images; see the class docstring for the arguments."""
        imgs = to_uint8(images)
        n = len(imgs)
        _check_len("scenes", scenes, n)
        _check_len("sizes", sizes, n)
        _check_len("langs", langs, n)
        if keys is not None:
            _check_len("keys", keys, n)
        hits, totals = self._new_counts()
        for i, (img, scene, (w, h), lang) in enumerate(zip(imgs, scenes, sizes, langs, strict=True)):
            _check_lang(lang)
            expected = scene_triples(scene)
            detected = detect(img)
            size_ok = img.shape[0] == int(h) and img.shape[1] == int(w)
            ok = size_ok and detected == expected
            self._count(hits, totals, ("all", lang, f"n{len(scene)}", f"{int(w)}x{int(h)}"), ok)
            attrs = {**_attribute_checks(detected, expected), "size": size_ok}
            for name, good in attrs.items():
                self._count(hits, totals, (name,), good)
            if not ok:
                reasons = [] if size_ok else [f"size {img.shape[1]}x{img.shape[0]}, requested {w}x{h}"]
                if detected != expected:
                    reasons.append(_scene_diff(detected, expected))
                self._fail({
                    "index": self._n_seen + i, "key": None if keys is None else keys[i],
                    "reason": "; ".join(reasons), "lang": lang, "size": (int(w), int(h)),
                    "expected": sorted(expected), "detected": sorted(detected),
                })
        self._n_seen += n
        self._accumulate(hits, totals)


# --------------------------------------------------------------------------------------------------
# Understanding
# --------------------------------------------------------------------------------------------------


class UndAccuracy(_GroupAccuracy):
    """ShapesEval understanding accuracy.

    ``update(preds, answers, qtypes, langs, scenes=None)``: one entry per question; ``preds`` the model's
    answers, ``answers`` the expected answers, ``qtypes`` from ``("colour", "shape", "count", "position",
    "caption")``, ``langs`` ``"en"``/``"zh"``, ``scenes`` the image scenes (optional; used for
    ``caption`` questions, which are scored by parsing the prediction into a scene and comparing scenes;
    without a scene the expected caption is parsed instead).

    A prediction is correct per :func:`datamodules.shapes_world.answer_correct`: exact match ignoring
    case, surrounding spaces and a final full stop.

    ``compute()`` keys: ``accuracy``, ``accuracy_en``, ``accuracy_zh`` and ``accuracy_<qtype>`` for each
    question type. ``failures``: dicts ``{index, reason, qtype, lang, pred, expected}``.
    """

    GROUPS = ("all", *LANGS, *QTYPES)

    def update(
        self,
        preds: Sequence[str],
        answers: Sequence[str],
        qtypes: Sequence[str],
        langs: Sequence[str],
        scenes: Sequence[Scene | None] | None = None,
    ) -> None:
        """Score a batch of answers; see the class docstring for the arguments."""
        n = len(preds)
        _check_len("answers", answers, n)
        _check_len("qtypes", qtypes, n)
        _check_len("langs", langs, n)
        if scenes is not None:
            _check_len("scenes", scenes, n)
        hits, totals = self._new_counts()
        for i in range(n):
            qtype, lang = qtypes[i], langs[i]
            scene = None if scenes is None else scenes[i]
            ok = answer_correct(preds[i], answers[i], qtype, lang, scene)  # validates qtype and lang
            self._count(hits, totals, ("all", lang, qtype), ok)
            if not ok:
                self._fail({
                    "index": self._n_seen + i, "reason": f"answered {preds[i]!r}, expected {answers[i]!r}",
                    "qtype": qtype, "lang": lang, "pred": preds[i], "expected": answers[i],
                })
        self._n_seen += n
        self._accumulate(hits, totals)


# --------------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------------


class EditAccuracy(_GroupAccuracy):
    """ShapesEval editing accuracy.

    ``update(images, target_scenes, sizes, ops, langs)``: one entry per edited image; ``images`` as
    :func:`to_uint8` accepts, ``target_scenes`` the scenes the edit should produce, ``sizes`` the SOURCE
    image sizes ``(width, height)`` (an edit keeps the size), ``ops`` from ``("recolor", "remove", "add",
    "move")``, ``langs`` ``"en"``/``"zh"``.

    An edit is correct when the output is exactly the source's size AND its detected scene equals the
    target scene.

    ``compute()`` keys: ``accuracy``, ``accuracy_en``, ``accuracy_zh``, ``accuracy_<op>`` per op, and
    ``size`` (share of outputs with the source's size). ``failures``: dicts ``{index, reason, op, lang,
    size, expected, detected}``.
    """

    GROUPS = ("all", *LANGS, *EDIT_OPS, "size")

    def _key(self, group: str) -> str:
        return group if group == "size" else super()._key(group)

    def update(
        self,
        images: Images,
        target_scenes: Sequence[Scene],
        sizes: Sequence[tuple[int, int]],
        ops: Sequence[str],
        langs: Sequence[str],
    ) -> None:
        """Score a batch of edited images; see the class docstring for the arguments."""
        imgs = to_uint8(images)
        n = len(imgs)
        _check_len("target_scenes", target_scenes, n)
        _check_len("sizes", sizes, n)
        _check_len("ops", ops, n)
        _check_len("langs", langs, n)
        hits, totals = self._new_counts()
        for i, (img, scene, (w, h), op, lang) in enumerate(
            zip(imgs, target_scenes, sizes, ops, langs, strict=True)
        ):
            _check_lang(lang)
            if op not in EDIT_OPS:
                raise ValueError(f"unknown edit op {op!r}; expected one of {EDIT_OPS}")
            expected = scene_triples(scene)
            detected = detect(img)
            size_ok = img.shape[0] == int(h) and img.shape[1] == int(w)
            ok = size_ok and detected == expected
            self._count(hits, totals, ("all", lang, op), ok)
            self._count(hits, totals, ("size",), size_ok)
            if not ok:
                reasons = [] if size_ok else [f"size {img.shape[1]}x{img.shape[0]}, source {w}x{h}"]
                if detected != expected:
                    reasons.append(_scene_diff(detected, expected))
                self._fail({
                    "index": self._n_seen + i, "reason": "; ".join(reasons), "op": op, "lang": lang,
                    "size": (int(w), int(h)), "expected": sorted(expected), "detected": sorted(detected),
                })
        self._n_seen += n
        self._accumulate(hits, totals)


# --------------------------------------------------------------------------------------------------
# Tokenizer ceiling
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def tokenizer_ceiling(
    vq_roundtrip: Callable[[Tensor], Tensor],
    n: int,
    seed: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    metric: T2IAccuracy | None = None,
) -> float:
    """T2I accuracy of ground-truth ShapesWorld images passed through an image tokenizer.

    Takes the first ``n`` samples of ``datamodules.shapes_world.t2i_samples(n, seed)`` (languages
    alternate, the three sizes cycle, so all sizes are covered once ``n >= 6``), renders their ground
    truth, and scores ``vq_roundtrip`` outputs with :class:`T2IAccuracy` against the samples' scenes and
    sizes. This is the best any generator can score through that tokenizer.

    ``vq_roundtrip`` maps a float batch ``[B, 3, H, W]`` in ``[-1, 1]`` (all images of one size; on
    ``device`` when given) to decoded images ``[B, 3, H', W']`` (float in ``[-1, 1]`` or ``uint8``); it runs
    under ``torch.no_grad``. Samples are batched by size, at most ``batch_size`` per call. Pass ``metric``
    to receive the full breakdown and failures (it is updated, not reset; failure ``key`` s name the
    samples). Returns the overall accuracy in ``[0, 1]``.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    metric = T2IAccuracy() if metric is None else metric
    by_size: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for sample in t2i_samples(n, seed):
        by_size.setdefault(sample["size"], []).append(sample)
    for size, samples in by_size.items():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            x = torch.from_numpy(np.stack([s["image"] for s in chunk])).permute(0, 3, 1, 2)
            x = x.float() / 127.5 - 1.0  # exact: 0 -> -1, 255 -> 1, and back by to_uint8's rounding
            if device is not None:
                x = x.to(device)
            y = vq_roundtrip(x)
            metric.update(
                y, [s["scene"] for s in chunk], [size] * len(chunk), [s["lang"] for s in chunk],
                keys=[s["key"] for s in chunk],
            )
    return float(metric.compute()["accuracy"])
