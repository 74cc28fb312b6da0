"""Fidelity metrics (FID / KID / IS through torchmetrics) with tiny in-test feature extractors, the clear
errors when the standard Inception or a local CLIP directory is missing, and the image-folder loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from metrics.fidelity import (
    INCEPTION_WEIGHTS_FILE,
    build_feature_extractor,
    clip_score,
    compute_fidelity,
    load_image_folder,
)


class TinyFeatures(nn.Module):
    """A fixed random conv net: uint8 [B, 3, H, W] -> [B, 64] (any H, W)."""

    num_features = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.conv2 = nn.Conv2d(16, 64, 3, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return x.mean(dim=(2, 3))


class TinyLogits(nn.Module):
    """uint8 images -> [B, 10] class logits (for the Inception Score)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = TinyFeatures(seed=1)
        self.head = nn.Linear(64, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(10, 64, generator=torch.Generator().manual_seed(2)) * 3)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _images(n: int, seed: int, shift: int = 0, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, size, size), generator=g, dtype=torch.int32) + shift
    return x.clamp(0, 255).to(torch.uint8)


def _batches(x: torch.Tensor, b: int = 32) -> list[torch.Tensor]:
    return list(x.split(b))


def test_fid_kid_is_with_custom_extractors() -> None:
    real = _images(96, seed=0)
    same = compute_fidelity(_batches(real), _batches(real), TinyFeatures(), kid_subset_size=50,
                            kid_subsets=8, is_feature_extractor=TinyLogits(), is_splits=4)
    assert set(same) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "n_generated", "n_reference",
                         "kid_subset_size"}
    assert same["n_generated"] == same["n_reference"] == 96 and same["kid_subset_size"] == 50
    assert abs(same["fid"]) < 1e-6
    assert abs(same["kid_mean"]) < 0.02  # unbiased MMD estimate on random subsets: zero up to noise
    assert same["is_mean"] >= 1.0

    kw = dict(kid_subset_size=50, kid_subsets=8, with_is=False)
    other = compute_fidelity(_batches(_images(96, seed=1)), _batches(real), TinyFeatures(), **kw)
    shifted = compute_fidelity(_batches(_images(96, seed=1, shift=50)), _batches(real), TinyFeatures(), **kw)
    assert "is_mean" not in other
    # A fresh sample of the same distribution is close; a brightness shift is much further.
    assert 0 < other["fid"] < shifted["fid"] / 10
    assert abs(other["kid_mean"]) < 0.02 and shifted["kid_mean"] > 0.5


def test_fidelity_is_reproducible_and_leaves_global_rng_alone() -> None:
    a, b = _images(64, seed=3), _images(64, seed=4, shift=20)
    feats, logits = TinyFeatures(), TinyLogits()  # built first: nn init draws from the global RNG
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    r1 = compute_fidelity([a], [b], feats, kid_subset_size=20, kid_subsets=10, is_feature_extractor=logits,
                          is_splits=2, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    r2 = compute_fidelity([a], [b], feats, kid_subset_size=20, kid_subsets=10, is_feature_extractor=logits,
                          is_splits=2, seed=5)
    assert r1 == r2


def test_kid_subset_size_is_capped_and_inputs_checked() -> None:
    a, b = _images(12, seed=0), _images(10, seed=1)
    r = compute_fidelity([a], [b], TinyFeatures(), kid_subset_size=1000, with_is=False)
    assert r["kid_subset_size"] == 10
    with pytest.raises(TypeError, match="uint8"):
        compute_fidelity([a.float()], [b], TinyFeatures(), with_is=False)
    with pytest.raises(ValueError, match="2"):
        compute_fidelity([a[:1]], [b], TinyFeatures(), with_is=False)
    with pytest.raises(ValueError, match="is_feature_extractor"):
        compute_fidelity([a], [b], TinyFeatures())  # IS needs logits


def test_standard_inception_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        build_feature_extractor("inception", None)
    msg = str(info.value)
    assert "--inception PATH" in msg and INCEPTION_WEIGHTS_FILE in msg
    try:
        import torch_fidelity  # noqa: F401
    except Exception:
        assert "pip install '.[eval]'" in msg and "torchvision" in msg
    with pytest.raises(RuntimeError, match="not found"):
        build_feature_extractor("inception", str(tmp_path / INCEPTION_WEIGHTS_FILE))
    with pytest.raises(ValueError, match="kind"):
        build_feature_extractor("vgg", None)
    with pytest.raises(RuntimeError, match="--inception"):
        compute_fidelity([_images(4, 0)], [_images(4, 1)], None, None)


def test_clip_score_needs_a_local_directory(tmp_path: Path) -> None:
    img = _images(1, seed=0)
    for bad in ("openai/clip-vit-large-patch14", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ValueError, match="local directory|config.json"):
            clip_score(img, ["a cat"], bad)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="local directory"):
        clip_score(img, ["a cat"], str(f))


def _tiny_clip(path: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(path / "clip"))
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(path / "clip"))


def test_clip_score_with_a_tiny_local_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("this transformers has no PIL CLIP image processor")
    _tiny_clip(tmp_path)
    images = _images(4, seed=0, size=40)
    texts = ["a red cat", "dog", "blue sky", "tree"]
    whole = clip_score(images, texts, tmp_path / "clip")
    batched = clip_score(list(images.split(2)), texts, tmp_path / "clip")
    assert 0.0 <= whole <= 100.0 and whole == pytest.approx(batched, abs=1e-4)
    with pytest.raises(ValueError, match="texts"):
        clip_score(images, texts[:3], tmp_path / "clip")


def test_load_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (h, w) in {"b.png": (8, 8), "a.jpg": (8, 8), "c.PNG": (6, 10), "d.png": (8, 8)}.items():
        a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        arrays[name] = a
        Image.fromarray(a).save(tmp_path / name, format="PNG")  # PNG bytes even in a.jpg: lossless compare
    Image.fromarray(arrays["d.png"]).convert("RGBA").save(tmp_path / "d.png")  # alpha is dropped
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")

    skipped: list[tuple[str, str]] = []
    batches = list(load_image_folder(tmp_path, batch_size=2, skipped=skipped))
    # sorted: a.jpg, b.png, broken.png (skipped), c.PNG (6x10: new batch), d.png
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 6, 10), (1, 3, 8, 8)]
    assert all(b.dtype == torch.uint8 for b in batches)
    assert torch.equal(batches[0][1], torch.from_numpy(arrays["b.png"]).permute(2, 0, 1))
    assert torch.equal(batches[2][0], torch.from_numpy(arrays["d.png"]).permute(2, 0, 1))
    assert len(skipped) == 1 and skipped[0][0].endswith("broken.png")

    resized = list(load_image_folder(tmp_path, size=(12, 9), batch_size=8))
    assert [tuple(b.shape) for b in resized] == [(4, 3, 9, 12)]
