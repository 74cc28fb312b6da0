"""Image fidelity through torchmetrics: FID, KID, Inception Score and CLIP score.

The standard feature extractor is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-ported
Inception v3 that FID/KID/IS numbers in papers use), loaded from a LOCAL weights file
(``weights-inception-2015-12-05-6726825d.pth``) so that nothing is ever downloaded. torch-fidelity needs
torchvision, which cannot be installed next to the CPU build of torch, so it is optional
(``pip install '.[eval]'`` on a machine with torchvision) and imported lazily: this module imports, and
its tests run, without it, using small custom feature extractors.

torchmetrics (1.9) accepts any ``nn.Module`` as ``feature`` of ``FrechetInceptionDistance``,
``KernelInceptionDistance`` and ``InceptionScore``: FID reads ``module.num_features`` (or probes the module
with a dummy 299x299 uint8 image), and each metric calls ``module(imgs)`` expecting an ``[N, d]`` tensor.
:func:`compute_fidelity` runs the extractor once per batch and feeds the features to the three metrics
through an identity module, so FID and KID share one forward pass.

CLIP score uses torchmetrics ``CLIPScore`` with a loader callable over a local directory (never a hub
id). The loader wraps the model so that ``get_image_features``/``get_text_features`` return tensors:
transformers 5 returns ``BaseModelOutputWithPooling`` from them, which torchmetrics 1.9 cannot normalise.

Run ``python -m metrics.fidelity --generated DIR --reference DIR --inception PATH`` for FID/KID/IS of two
image folders.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "INCEPTION_WEIGHTS_FILE",
    "InceptionFeatures",
    "build_feature_extractor",
    "clip_score",
    "compute_fidelity",
    "load_image_folder",
]

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

#: kind -> (torch-fidelity feature name, output width)
_INCEPTION_KINDS: dict[str, tuple[str, int]] = {
    "inception": ("2048", 2048),  # pool features: FID and KID
    "inception-logits": ("logits_unbiased", 1008),  # class logits without bias: Inception Score
}


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` reduced to one output, as torchmetrics expects.

    torch-fidelity's extractor returns a tuple (one tensor per requested feature); torchmetrics' metrics
    call ``feature(imgs)`` and need a single ``[N, d]`` tensor, and FID reads ``num_features``. The wrapped
    extractor is ``self.net``. Input: ``uint8 [N, 3, H, W]`` of any size (resized to 299 inside, with
    torch-fidelity's TF1-compatible bilinear interpolation). The module never leaves eval mode (batch
    norm statistics must not move if a parent module is put in training mode).
    """

    def __init__(self, net: nn.Module, feature: str, num_features: int) -> None:
        super().__init__()
        self.net = net
        self.feature = feature
        self.num_features = int(num_features)
        self.eval()

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"Inception features need uint8 images [N, 3, H, W], got {x.dtype}")
        out = self.net(x)
        if isinstance(out, tuple | list):
            out = out[0]
        return out.reshape(x.shape[0], -1)


def _install_problems(weights: str | None) -> list[str]:
    problems = []
    if weights is None:
        problems.append(
            f"no Inception weights given: point --inception PATH (inception_weights=...) at torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE} (it is never downloaded)"
        )
    elif not Path(weights).is_file():
        problems.append(f"Inception weights file not found: {weights} (expected torch-fidelity's "
                        f"{INCEPTION_WEIGHTS_FILE})")
    try:
        importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except Exception as e:  # ImportError, or torchvision failing with CPU torch
        problems.append(
            f"torch-fidelity is not importable ({type(e).__name__}: {e}); install it with "
            f"pip install '.[eval]' on a machine with torchvision"
        )
    return problems


def build_feature_extractor(kind: str = "inception", weights: str | None = None) -> nn.Module:
    """The standard FID/KID/IS feature extractor, from a local weights file.

    ``kind``: ``"inception"`` -> 2048-d pool features (FID, KID); ``"inception-logits"`` -> 1008 class
    logits without bias (``logits_unbiased``, torch-fidelity's Inception Score feature). ``weights``: path
    to torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``; it is passed to
    ``FeatureExtractorInceptionV3(name, features_list, feature_extractor_weights_path=weights)``, which then
    ``torch.load`` s it instead of downloading.

    Returns an :class:`InceptionFeatures` wrapping the torch-fidelity extractor (``.net``). Raises
    ``RuntimeError`` listing what is missing (torch-fidelity not importable: ``pip install '.[eval]'`` on a
    machine with torchvision; no or a missing weights file: ``--inception PATH``), ``ValueError`` for an
    unknown ``kind``.
    """
    if kind not in _INCEPTION_KINDS:
        raise ValueError(
            f"unknown feature extractor kind {kind!r}; expected one of {tuple(_INCEPTION_KINDS)}"
        )
    problems = _install_problems(weights)
    if problems:
        raise RuntimeError("cannot build the Inception feature extractor:\n  - " + "\n  - ".join(problems))
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    feature, width = _INCEPTION_KINDS[kind]
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", [feature], feature_extractor_weights_path=str(weights)
    )
    return InceptionFeatures(net, feature, width)


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' metrics consume features computed elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)  # FID reads this instead of probing with a dummy image

    def forward(self, x: Tensor) -> Tensor:
        return x


# --------------------------------------------------------------------------------------------------
# FID / KID / IS
# --------------------------------------------------------------------------------------------------


def _as_batch(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"expected uint8 image tensors [B, 3, H, W], got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        got = f"{images.dtype} {tuple(images.shape)}"
        raise TypeError(f"expected uint8 image tensors [B, 3, H, W], got {got}")
    return images


def _module_device(module: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _extract(
    nets: Sequence[tuple[nn.Module, torch.device]], batches: Iterable[Tensor]
) -> list[Tensor]:
    """Run every ``(net, device)`` on each batch in ONE pass over ``batches`` (which may be a one-shot
    iterator of many images: nothing but the features is kept). Returns float64 CPU features per net."""
    feats: list[list[Tensor]] = [[] for _ in nets]
    for batch in batches:
        b = _as_batch(batch)
        for (net, dev), out in zip(nets, feats, strict=True):
            f = net(b.to(dev))
            if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] != b.shape[0]:
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"feature extractor must return [N, d] for N images, got {got}")
            out.append(f.detach().double().cpu())
    if not feats[0]:
        raise ValueError("no images given")
    return [torch.cat(f) for f in feats]


def compute_fidelity(
    generated: Iterable[Tensor],
    reference: Iterable[Tensor],
    feature_extractor: nn.Module | None = None,
    inception_weights: str | None = None,
    kid_subset_size: int = 1000,
    with_is: bool = True,
    *,
    kid_subsets: int = 100,
    is_feature_extractor: nn.Module | None = None,
    is_splits: int = 10,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """FID, KID and (optionally) Inception Score of ``generated`` against ``reference`` images.

    ``generated``/``reference``: iterables of ``uint8 [B, 3, H, W]`` batches (sizes may differ between
    batches; the extractor handles resizing). ``feature_extractor``: a module mapping such a batch to
    ``[B, d]`` features; when None, :func:`build_feature_extractor` ``("inception", inception_weights)``.
    IS uses ``is_feature_extractor`` (class logits ``[B, k]``), else the Inception logits built from
    ``inception_weights``; with a custom ``feature_extractor`` and neither, pass ``with_is=False``.

    The extractor runs once per batch (on ``device``, default: where its parameters are); features feed
    torchmetrics' ``FrechetInceptionDistance``, ``KernelInceptionDistance`` and ``InceptionScore`` (float64
    FID statistics). KID uses subsets of ``min(kid_subset_size, #generated, #reference)`` samples;
    KID and IS subsets are drawn from a torch generator seeded with ``seed`` (the global RNG is left as
    it was), so results are reproducible.

    Returns ``{"fid", "kid_mean", "kid_std", "is_mean", "is_std" (when with_is), "n_generated",
    "n_reference", "kid_subset_size"}``. Raises ``RuntimeError`` (from :func:`build_feature_extractor`)
    when the standard extractor is needed but unavailable, ``ValueError`` for fewer than 2 images a side.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    logits_net: nn.Module | None = None
    if with_is:
        if is_feature_extractor is not None:
            logits_net = is_feature_extractor
        elif feature_extractor is None or inception_weights is not None:
            logits_net = build_feature_extractor("inception-logits", inception_weights)
        else:
            raise ValueError(
                "with_is=True needs class logits: pass is_feature_extractor, or inception_weights, "
                "or with_is=False when using a custom feature_extractor"
            )
    net = feature_extractor
    if net is None:
        net = build_feature_extractor("inception", inception_weights)
    nets = [(net, _module_device(net, device))]
    if logits_net is not None:
        nets.append((logits_net, _module_device(logits_net, device)))
    for module, dev in nets:
        module.to(dev).eval()

    gen = _extract(nets, generated)  # features (+ IS logits) of the generated images in one pass
    gen_feats = gen[0]
    (ref_feats,) = _extract(nets[:1], reference)
    n_gen, n_ref = gen_feats.shape[0], ref_feats.shape[0]
    if n_gen < 2 or n_ref < 2:
        raise ValueError(f"FID/KID need 2+ images per side, got {n_gen} generated and {n_ref} reference")
    d = gen_feats.shape[1]
    subset = min(int(kid_subset_size), n_gen, n_ref)

    with warnings.catch_warnings():
        # KID/IS warn that they buffer all features: expected here, the features are already in memory.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        fid = FrechetInceptionDistance(feature=_Precomputed(d))
        kid = KernelInceptionDistance(feature=_Precomputed(d), subsets=int(kid_subsets), subset_size=subset)
        isc = InceptionScore(feature=_Precomputed(1), splits=int(is_splits)) if with_is else None
    fid.update(gen_feats, real=False)
    fid.update(ref_feats, real=True)
    kid.update(gen_feats, real=False)
    kid.update(ref_feats, real=True)
    out: dict[str, float] = {"fid": float(fid.compute())}
    # KID and IS draw subsets with torch.randperm on the global generator: fork it so that the result is
    # a function of ``seed`` and the caller's RNG stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
        out.update(kid_mean=float(kid_mean), kid_std=float(kid_std))
        if isc is not None:
            isc.update(gen[1])
            is_mean, is_std = isc.compute()
            out.update(is_mean=float(is_mean), is_std=float(is_std))
    out.update(n_generated=n_gen, n_reference=n_ref, kid_subset_size=subset)
    return out


# --------------------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------------------


class _ClipFeatures(nn.Module):
    """A ``CLIPModel`` whose ``get_*_features`` return projected tensors under transformers 4 and 5."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        return self._tensor(
            self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        )


def _clip_loader(clip_path: str | Path) -> Callable[[], tuple[nn.Module, Any]]:
    path = Path(clip_path)
    if not path.is_dir():
        raise ValueError(
            f"clip_path must be a local directory holding a saved CLIP model and processor "
            f"(save_pretrained output), got {str(clip_path)!r}; hub ids are never downloaded"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a saved CLIP model directory")

    def load() -> tuple[nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        return _ClipFeatures(model).eval(), processor

    return load


def clip_score(
    images: Tensor | Iterable[Tensor],
    texts: Sequence[str],
    clip_path: str | Path,
    device: torch.device | str | None = None,
) -> float:
    """Mean CLIP score (``100 * max(cos(image, text), 0)``, torchmetrics ``CLIPScore``) of image-text pairs.

    ``images``: ``uint8 [N, 3, H, W]`` or an iterable of such batches, in the order of ``texts`` (one text
    per image). ``clip_path``: a LOCAL directory with a saved ``CLIPModel`` and ``CLIPProcessor``; anything
    else (a hub id, a file, a missing path) raises ``ValueError`` before any loading.
    """
    loader = _clip_loader(clip_path)
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=loader)
    if device is not None:
        metric = metric.to(device)
    batches = [images] if isinstance(images, Tensor) else images
    texts = list(texts)
    pos = 0
    for batch in batches:
        b = _as_batch(batch)
        if pos + b.shape[0] > len(texts):
            raise ValueError(f"more images than texts ({len(texts)})")
        metric.update(b.to(device) if device is not None else b, texts[pos:pos + b.shape[0]])
        pos += b.shape[0]
    if pos != len(texts):
        raise ValueError(f"{pos} images for {len(texts)} texts")
    return float(metric.compute())


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def load_image_folder(
    directory: str | Path,
    size: tuple[int, int] | None = None,
    batch_size: int = 1,
    recursive: bool = False,
    skipped: list[tuple[str, str]] | None = None,
) -> Iterator[Tensor]:
    """Yield the PNG/JPEG images of ``directory`` as ``uint8 [B, 3, H, W]`` batches, in sorted path order.

    ``size``: ``(width, height)`` to resize to (bicubic), else native size; a batch only holds images of
    one size, so with native sizes a size change starts a new batch. ``recursive``: include
    subdirectories (e.g. GenEval's ``<index>/samples/*.png``). Unreadable or corrupt files are skipped,
    logged as warnings and appended to ``skipped`` as ``(path, reason)`` when a list is given. Images are
    converted to RGB (alpha dropped, greyscale expanded).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    paths = sorted(
        p for p in (root.rglob("*") if recursive else root.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    pending: list[Tensor] = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                rgb = im.convert("RGB")
            if size is not None and rgb.size != tuple(size):
                rgb = rgb.resize(tuple(size), Image.Resampling.BICUBIC)
        except Exception as e:  # PIL raises several exception types for corrupt files
            reason = f"{type(e).__name__}: {e}"
            log.warning("skipping unreadable image %s (%s)", p, reason)
            if skipped is not None:
                skipped.append((str(p), reason))
            continue
        t = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3)
        t = t.permute(2, 0, 1)
        if pending and pending[0].shape != t.shape:
            yield torch.stack(pending)
            pending = []
        pending.append(t)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``python -m metrics.fidelity``: FID/KID/IS of a folder of generated images against a reference
    folder with torch-fidelity's Inception (``--inception PATH``); prints and optionally writes JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generated", required=True, help="folder of generated PNG/JPEG images")
    ap.add_argument("--reference", required=True, help="folder of reference PNG/JPEG images")
    ap.add_argument("--inception", default=None, help=f"path to torch-fidelity's {INCEPTION_WEIGHTS_FILE}")
    ap.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None, help="resize images first")
    ap.add_argument("--recursive", action="store_true", help="include subfolders")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--kid-subset-size", type=int, default=1000)
    ap.add_argument("--no-is", action="store_true", help="skip the Inception Score")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the scores as JSON here")
    args = ap.parse_args(argv)

    skipped: list[tuple[str, str]] = []
    size = tuple(args.size) if args.size else None

    def folder(d: str) -> Iterator[Tensor]:
        return load_image_folder(d, size=size, batch_size=args.batch_size, recursive=args.recursive,
                                 skipped=skipped)

    scores: dict[str, Any] = dict(compute_fidelity(
        folder(args.generated), folder(args.reference), None, args.inception,
        kid_subset_size=args.kid_subset_size, with_is=not args.no_is, device=args.device, seed=args.seed,
    ))
    scores["skipped_files"] = [{"path": p, "reason": r} for p, r in skipped]
    text = json.dumps(scores, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return scores


if __name__ == "__main__":
    main()
