"""Config fields a laptop preset may set instead of the paper's design: ``image_head``, ``vit_position_scale`` and
``code_position_scale``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wallaroo.config import get_preset
from wallaroo.model import WallarooModel, canvas_position_features, grid_place_features


def test_linear_image_head_shapes_loss_and_edit_copy():
    cfg = get_preset("tiny", image_head="linear", edit=True)
    model = WallarooModel(cfg)
    for head in (model.gen_head, model.edit_head):
        assert len(head) == 1 and isinstance(head[0], nn.Linear)
        assert head[0].bias is None and head[0].weight.shape == (cfg.codebook_size, model.hidden_size)
    mlp = WallarooModel(get_preset("tiny"))
    assert [type(m) for m in mlp.gen_head] == [nn.Linear, nn.GELU, nn.Linear]  # the paper's head stays the default
    with pytest.raises(ValueError, match="image_head must be 'mlp' or 'linear'"):
        get_preset("tiny", image_head="conv")


def test_linear_image_head_survives_checkpoint_and_export(tmp_path):
    import lightning as L

    from stages.base import OptimConfig
    from stages.stage1 import Stage1
    from wallaroo.convert import main
    from wallaroo.weights import build_from_weights, load_any

    stage = Stage1(preset="tiny", overrides={"image_head": "linear"}, optim=OptimConfig(lr=1e-3))
    stage.configure_model()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert load_any(tmp_path / "last.ckpt").config.image_head == "linear"
    out = main(["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "weights")])
    model, _, _, _ = build_from_weights(out)
    assert model.cfg.image_head == "linear"
    want = stage.model.state_dict()
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_canvas_position_features_follow_raster_order_and_canvas_fractions():
    # Two images: a 4x4 merged grid (8x8 patches) and a 6x4 one (12 rows of patches, 8 columns).
    pos = canvas_position_features(torch.tensor([[1, 8, 8], [1, 12, 8]]), 2, 64)
    assert pos.shape == (16 + 24, 64)
    a, b = pos[:16].view(4, 4, 64), pos[16:].view(6, 4, 64)
    # Columns at the same fraction of the width read the same; rows differ by grid height.
    assert torch.allclose(a[0, :, 32:], b[0, :, 32:])
    assert torch.allclose(a[:, 0, :32], a[:, 3, :32]) and not torch.allclose(a[0, 0, :32], a[1, 0, :32])
    # Every place of one canvas is different from every other.
    flat = a.reshape(16, 64)
    dist = torch.cdist(flat, flat) + torch.eye(16) * 10
    assert float(dist.min()) > 0.1
    # The centre row of a 6-row grid sits between rows 2 and 3; a 3-row grid puts a row at 0.5 exactly.
    odd = canvas_position_features(torch.tensor([[1, 6, 2]]), 2, 64)
    centre = canvas_position_features(torch.tensor([[1, 2, 2]]), 2, 64)
    assert torch.allclose(odd[1, :32], centre[0, :32])


def _twins(**overrides: float) -> tuple[WallarooModel, WallarooModel]:
    """The tiny model and a copy with the same weights and these config overrides, both in eval mode."""
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    plain = WallarooModel(cfg).eval()
    changed = WallarooModel(cfg.with_overrides(**overrides)).eval()
    changed.load_state_dict(plain.state_dict())
    return plain, changed


def test_vit_position_scale_adds_the_place_features_to_vit_tokens():
    from datamodules import shapes_world as sw
    from wallaroo.images import VitImageProcessor

    plain, placed = _twins(vit_position_scale=0.5)
    cfg = plain.cfg
    rng = np.random.default_rng(0)
    pixels, thw = VitImageProcessor.for_config(cfg)([sw.render(sw.random_scene(rng), 48, 48)])
    with torch.no_grad():
        base, moved = plain.vit_features(pixels, thw), placed.vit_features(pixels, thw)
    merge = plain.backbone.config.vision_config.spatial_merge_size
    want = base + 0.5 * canvas_position_features(thw, merge, base.shape[-1])
    assert torch.allclose(moved, want, atol=1e-6)


def _places(model: WallarooModel, batch: dict) -> list[tuple[int, int, int]]:
    """(token id, row, column) of every token that carries a place."""
    places = model.code_places(batch["input_ids"], batch["mm_token_type_ids"])[0]
    ids = batch["input_ids"][0]
    return [(int(ids[i]), int(r), int(c)) for i, (r, c) in enumerate(places.tolist()) if r >= 0]


def test_code_places_of_generated_and_source_blocks():
    from wallaroo.sequences import Bucket, build_edit, build_t2i, collate
    from wallaroo.tokens import tokenizer_for

    cfg = get_preset("tiny")
    model = WallarooModel(cfg)
    tok, ids = tokenizer_for(cfg)
    bucket, codes = Bucket(w=72, h=48), torch.arange(6).view(2, 3)  # 2 rows x 3 columns of codes at ds 24
    kw = dict(lang="en", template_index=0, ds=24)
    pad = ids.generate_image_pad
    # Aspect layout: generate_start -> (0, 0); a code -> the next code of its row; the EOL -> (1, 0); the last
    # code of each row (followed by EOL or generate_end) carries none.
    aspect = collate([build_t2i(tok, ids, "a red circle", bucket, codes, layout="aspect", **kw)], ids.pad)
    assert _places(model, aspect) == [(ids.generate_start, 0, 0), (pad, 0, 1), (pad, 0, 2), (ids.eol, 1, 0),
                                      (pad, 1, 1), (pad, 1, 2)]
    # Square layout: no EOL, so the last code of row 0 announces (1, 0); the width is the root of the count.
    square = collate([build_t2i(tok, ids, "a red circle", Bucket(w=48, h=48), codes[:, :2], layout="square",
                                **kw)], ids.pad)
    assert _places(model, square) == [(ids.generate_start, 0, 0), (pad, 0, 1), (pad, 1, 0), (pad, 1, 1)]
    # Editing: the source pixel block's slots carry their own places, the target block as above.
    edit = collate([build_edit(tok, ids, "Remove the circle.", bucket, codes, 4, **kw)], ids.pad)
    got = _places(model, edit)
    assert got[:6] == [(ids.image_pad, r, c) for r in range(2) for c in range(3)]
    assert got[6:] == _places(model, aspect)


def test_code_position_scale_adds_features_only_where_places_are():
    from wallaroo.sequences import Bucket, build_t2i, collate
    from wallaroo.tokens import tokenizer_for

    plain, placed = _twins(code_position_scale=0.5)
    cfg = plain.cfg
    tok, ids = tokenizer_for(cfg)
    batch = collate([build_t2i(tok, ids, "a red circle", Bucket(w=72, h=48), torch.arange(6).view(2, 3),
                               lang="en", template_index=0, layout="aspect", ds=24)], ids.pad)
    codebook = torch.randn(cfg.codebook_size, cfg.codebook_dim)
    with torch.no_grad():
        a = plain.prepare_inputs(batch, codebook, "t2i").inputs_embeds
        b = placed.prepare_inputs(batch, codebook, "t2i").inputs_embeds
    places = plain.code_places(batch["input_ids"], batch["mm_token_type_ids"])
    want = a + 0.5 * grid_place_features(places, a.shape[-1])
    assert torch.allclose(b, want, atol=1e-6)
    has = (places[..., 0] >= 0)[0]
    assert torch.equal((a - b).abs().sum(-1)[0] > 0, has) and int(has.sum()) == 6
    # Every place of a 32x32 grid has its own features.
    grid = torch.stack(torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij"), -1).view(-1, 2)
    feats = grid_place_features(grid, 64)
    assert float((torch.cdist(feats, feats) + torch.eye(1024) * 10).min()) > 0.1


def test_patch_embedding_runs_as_a_matrix_product_equal_to_the_conv3d():
    from wallaroo.model import patch_embed_as_linear

    torch.manual_seed(0)
    model = WallarooModel(get_preset("tiny"))
    embed = model.backbone.model.visual.patch_embed
    assert "forward" in vars(embed)  # the product, not the class's Conv3d forward
    assert isinstance(embed.proj, nn.Conv3d) and "proj.weight" in dict(embed.named_parameters())
    pixels = torch.randn(12, embed.in_channels * embed.temporal_patch_size * embed.patch_size**2)
    with torch.no_grad():
        conv = type(embed).forward(embed, pixels)  # the transformers forward (Conv3d)
        assert torch.allclose(embed(pixels), conv, atol=1e-5)
    embed.proj = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="expected Conv3d"):
        patch_embed_as_linear(model.backbone)


def test_patch_embed_benchmark_runs_and_finds_the_two_equal():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "patch_embed.py"
    spec = importlib.util.spec_from_file_location("patch_embed_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--repeats", "1"])
    assert {r["case"] for r in rows} == {"shapes stage-4 batch (32 images)", "7B ViT, one 448x448 image"}
    for r in rows:
        assert r["max_abs_diff"] < (1e-4 if r["dtype"] == "float32" else 5e-2)
        assert r["conv3d_ms"] > 0 and r["product_ms"] > 0
