"""Can a reader get shapes out of the frozen ViT's tokens? Probes on a ShapesWorld checkpoint's merged ViT features.

    python benchmarks/vit_probe.py --ckpt runs/shapes/pretrain/last.ckpt [--vit-scale 3.5] [--json]

The features are what the LLM receives (``WallarooModel.vit_features``: merged ViT tokens plus the canvas-place
features of ``vit_position_scale``), computed once for random 48x48 scenes. Two probes, held-out accuracy:

1. **linear**: one Linear over all tokens of a one-object image (standardised), its shape and its colour;
2. **attention reader**: the LLM's problem without the words. A learned query per cell attends once over the
   tokens of a 1-3 object scene (RMSNorm, keys, values, a GELU MLP) and names the shape in that cell. Batch 16,
   AdamW at 1e-3, accuracy at a few step counts, to set against the LLM's shape questions at the same steps;
3. **word reader**: the same, queried by the mean of learned embeddings of the place phrase's tokens (the model's
   tokenizer on "the top left", "左上", ...), once per language.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import shapes_world as sw  # noqa: E402

SHAPES = tuple(sw.SHAPES)
COLOURS = tuple(sw.COLOURS)
# The nine places in cell order (row * 3 + column), as the questions name them.
PLACES = [sw.POSITIONS[(r, c)] for r in range(3) for c in range(3)]


def features(model, cfg, images: list[np.ndarray]) -> torch.Tensor:
    from wallaroo.images import VitImageProcessor

    proc = VitImageProcessor.for_config(cfg)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 200):
            chunk = images[i : i + 200]
            pv, thw = proc(chunk)
            f = model.vit_features(pv, thw)
            out.append(f.reshape(len(chunk), -1, f.shape[-1]))
    return torch.cat(out)


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, n_train: int) -> float:
    x = x.reshape(len(x), -1)
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    net = nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(300):
        loss = nn.functional.cross_entropy(net(x[:n_train]), y[:n_train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((net(x[n_train:]).argmax(1) == y[n_train:]).float().mean())


class CellReader(nn.Module):
    """One attention read over the image tokens, queried by a learned vector per cell."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.query = nn.Embedding(9, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, len(SHAPES)))

    def forward(self, tokens: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.read(tokens, self.query(cell))

    def read(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        att = torch.einsum("bd,btd->bt", query, self.key(x)) / x.shape[-1] ** 0.5
        return self.out(torch.einsum("bt,btd->bd", att.softmax(-1), self.value(x)))


class WordReader(CellReader):
    """The reader queried by the mean embedding of a place phrase's token ids (``-1`` pads)."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__(dim)
        self.words = nn.Embedding(vocab, dim)

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids >= 0).float()
        emb = self.words(ids.clamp(min=0)) * keep[..., None]
        return self.read(tokens, emb.sum(1) / keep.sum(1, keepdim=True))


def train_reader(reader, feats, img, query, y, n_train: int, marks: list[int]) -> dict[int, float]:
    """Batch-16 AdamW (1e-3) training; held-out accuracy at each step in ``marks``."""
    opt = torch.optim.AdamW(reader.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    acc = {}
    for step in range(1, marks[-1] + 1):
        b = torch.randint(0, n_train, (16,), generator=g)
        loss = nn.functional.cross_entropy(reader(feats[img[b]], query[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in marks:
            with torch.no_grad():
                pred = reader(feats[img[n_train:]], query[n_train:]).argmax(1)
            acc[step] = float((pred == y[n_train:]).float().mean())
    return acc


def main(argv: list[str] | None = None) -> dict:
    from wallaroo.weights import build_from_weights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="a ShapesWorld checkpoint (e.g. runs/shapes/pretrain/last.ckpt)")
    ap.add_argument("--vit-scale", type=float, default=None, help="override the preset's vit_scale")
    ap.add_argument("--scenes", type=int, default=4000)
    ap.add_argument("--steps", default="100,200,400,800")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, _, tok, _ = build_from_weights(args.ckpt, device="cpu", dtype=torch.float32)
    if args.vit_scale is not None:
        model.cfg = model.cfg.with_overrides(vit_scale=args.vit_scale)
    rng = np.random.default_rng(0)
    result: dict = {"ckpt": args.ckpt, "vit_scale": model.cfg.vit_scale}

    # 1. linear probes on one-object scenes
    objs = [
        sw.ShapeObject(COLOURS[rng.integers(6)], SHAPES[rng.integers(4)], (int(rng.integers(3)), int(rng.integers(3))))
        for _ in range(1500)
    ]
    feats = features(model, model.cfg, [sw.render(sw.make_scene([o]), 48, 48) for o in objs])
    result["tokens_per_image"] = int(feats.shape[1])
    result["linear_shape"] = linear_probe(feats, torch.tensor([SHAPES.index(o.shape) for o in objs]), 4, 1200)
    result["linear_colour"] = linear_probe(feats, torch.tensor([COLOURS.index(o.colour) for o in objs]), 6, 1200)

    # 2. the cell-queried attention reader on 1-3 object scenes
    scenes = [sw.random_scene(rng, size=(48, 48)) for _ in range(args.scenes)]
    feats = features(model, model.cfg, [sw.render(s, 48, 48) for s in scenes])
    pairs = [(i, o.cell[0] * 3 + o.cell[1], SHAPES.index(o.shape)) for i, s in enumerate(scenes) for o in s]
    img, cell, y = (torch.tensor(c) for c in zip(*pairs, strict=True))
    n_train = int(0.85 * len(pairs))
    marks = sorted(int(s) for s in args.steps.split(","))
    result["reader_shape"] = train_reader(CellReader(feats.shape[-1]), feats, img, cell, y, n_train, marks)

    # 3. the word-queried reader, per language
    for lang, places in (("en", [f"the {p.en}" for p in PLACES]), ("zh", [p.zh for p in PLACES])):
        ids = [tok.encode(places[c], add_special_tokens=False) for c in cell.tolist()]
        width = max(map(len, ids))
        ids = torch.tensor([i + [-1] * (width - len(i)) for i in ids])
        reader = WordReader(feats.shape[-1], int(ids.max()) + 1)
        result[f"word_reader_shape_{lang}"] = train_reader(reader, feats, img, ids, y, n_train, marks)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.ckpt}: {result['tokens_per_image']} ViT tokens per 48x48 image (vit_scale {result['vit_scale']})")
        shape, colour = result["linear_shape"], result["linear_colour"]
        print(f"linear probe, one-object scenes: shape {shape:.3f}, colour {colour:.3f}")
        for step, acc in result["reader_shape"].items():
            en, zh = result["word_reader_shape_en"][step], result["word_reader_shape_zh"][step]
            print(f"step {step}: shape in the cell, cell-queried reader {acc:.3f}, word-queried {en:.3f} / {zh:.3f}")
    return result


if __name__ == "__main__":
    main()
