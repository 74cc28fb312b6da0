"""Tests for the LlamaGen-compatible VQ tokenizer (``wallaroo/vq.py``): CPU, no network, a few seconds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wallaroo.vq import (
    CODEBOOK_USED_LEN,
    VQ_PRESETS,
    AttnBlock,
    VQConfig,
    VQModel,
    build_vq,
    load_llamagen,
)

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "reference" / "llamagen_vq16_state_dict.json"
LLAMAGEN_PARAMS = 71_883_403


def _manifest() -> dict:
    if not MANIFEST.exists():  # the manifest lives next to the checkout, not inside it
        pytest.skip(f"reference manifest not found at {MANIFEST}")
    return json.loads(MANIFEST.read_text())


def _meta_ds16() -> VQModel:
    with torch.device("meta"):
        return build_vq("llamagen-ds16")


# ------------------------------------------------------------------------------------------------
# Layout of the real checkpoint
# ------------------------------------------------------------------------------------------------


def test_ds16_state_dict_matches_llamagen_manifest() -> None:
    manifest = _manifest()
    model = _meta_ds16()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: shape for k, shape in manifest["keys"]}
    assert len(got) == manifest["num_keys"] == 344
    assert sorted(set(want) - set(got)) == [], "keys missing from VQModel"
    assert sorted(set(got) - set(want)) == [], "keys VQModel has but the checkpoint does not"
    assert {k: s for k, s in got.items() if want[k] != s} == {}, "shape mismatches"

    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"] == LLAMAGEN_PARAMS
    for prefix, count in manifest["params_by_prefix"].items():
        assert sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix + ".")) == count
    # The usage ring buffer is saved but is not a parameter.
    buffers = dict(model.named_buffers())
    assert list(buffers) == ["quantize.codebook_used"]
    assert buffers["quantize.codebook_used"].shape == (CODEBOOK_USED_LEN,)


@pytest.mark.parametrize(
    ("width", "height", "rows", "cols"),
    [(704, 352, 22, 44), (512, 512, 32, 32), (352, 704, 44, 22), (384, 384, 24, 24)],
)
def test_ds16_code_grid_shapes_for_buckets(width: int, height: int, rows: int, cols: int) -> None:
    # The meta device runs the real architecture's shape logic without any arithmetic.
    model = _meta_ds16()
    assert model.downsample == 16
    images = torch.empty(2, 3, height, width, device="meta")
    codes, latents = model.encode(images)
    assert codes.shape == (2, rows, cols) and codes.dtype == torch.long
    assert latents.shape == (2, rows, cols, 8)
    assert model.decode_codes(codes).shape == (2, 3, height, width)
    assert model.grid_shape(height, width) == (rows, cols)


def test_ds16_narrow_variant_computes_on_cpu() -> None:
    # Same levels, attention placement and 16x downsampling as LlamaGen, narrow enough to run for real.
    cfg = replace(VQ_PRESETS["llamagen-ds16"], ch=8, z_channels=16, codebook_size=128, norm_groups=8)
    model = VQModel(cfg).eval()
    images = torch.rand(1, 3, 32, 48) * 2 - 1  # 48 wide x 32 tall -> 2 rows x 3 cols
    with torch.no_grad():
        codes, latents = model.encode(images)
        recon = model.decode_codes(codes)
    assert codes.shape == (1, 2, 3) and latents.shape == (1, 2, 3, 8)
    assert recon.shape == images.shape and torch.isfinite(recon).all()


# ------------------------------------------------------------------------------------------------
# Encode / decode contract (tiny preset)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> VQModel:
    torch.manual_seed(0)
    return build_vq("tiny-ds8").eval()


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 96), (96, 64), (8, 40)])
def test_tiny_round_trip_shapes(tiny: VQModel, height: int, width: int) -> None:
    images = torch.rand(3, 3, height, width) * 2 - 1
    with torch.no_grad():
        codes, latents = tiny.encode(images)
        recon = tiny.decode_codes(codes)
    rows, cols = height // 8, width // 8
    assert codes.shape == (3, rows, cols) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < tiny.config.codebook_size
    assert latents.shape == (3, rows, cols, tiny.config.codebook_dim)
    assert recon.shape == (3, 3, height, width)
    torch.testing.assert_close(latents.norm(dim=-1), torch.ones(3, rows, cols))


def test_codes_are_nearest_normalised_codebook_entry(tiny: VQModel) -> None:
    images = torch.rand(4, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        codes, latents = tiny.encode(images)
    book = F.normalize(tiny.quantize.embedding.weight, dim=-1)
    assert torch.equal((latents @ book.T).argmax(dim=-1), codes)
    # codebook_vectors is the normalised lookup, for any index shape.
    assert torch.equal(tiny.codebook_vectors(codes), book[codes])
    assert tiny.codebook_vectors(torch.tensor([[1, 2, 3]])).shape == (1, 3, tiny.config.codebook_dim)
    # decode_codes is decode of the looked-up vectors, i.e. what forward() reconstructs from.
    with torch.no_grad():
        # Not bit-equal: forward() adds (q - z) to z for the straight-through estimator.
        torch.testing.assert_close(tiny.decode_codes(codes), tiny(images).recon, rtol=1e-4, atol=1e-4)


def test_patch_context_codes_see_only_their_patch() -> None:
    torch.manual_seed(0)
    image_cfg = VQ_PRESETS["tiny-ds8"]
    patch = build_vq(replace(image_cfg, encoder_context="patch")).eval()
    whole = build_vq(image_cfg).eval()
    # Same modules and keys as LlamaGen's encoder: weights move freely between the two settings.
    whole.load_state_dict(patch.state_dict())
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    images[:, :, :8, :8] = images[:, :, 8:16, 16:24]  # two identical patches in each image
    changed = images.clone()
    changed[:, :, 24:, 40:] = -1.0  # another patch, far from the first two
    with torch.no_grad():
        codes, latents = patch.encode(images)
        codes2, latents2 = patch.encode(changed)
        whole_latents = whole.encode(images)[1]
        # Each patch is the whole image of its own: encode it alone and compare.
        alone = patch.encode(images[:, :, 8:16, 16:24])[1]
    torch.testing.assert_close(latents[:, 0, 0], latents[:, 1, 2])
    torch.testing.assert_close(latents[:, 1, 2], alone[:, 0, 0])
    torch.testing.assert_close(latents[:, :3, :5], latents2[:, :3, :5])
    assert not torch.allclose(latents[:, 3, 5], latents2[:, 3, 5])
    assert torch.equal(codes[:, 0, 0], codes[:, 1, 2]) and torch.equal(codes[:, :3, :5], codes2[:, :3, :5])
    # The image-context encoder mixes neighbours, so its latents differ.
    assert not torch.allclose(whole_latents, latents)
    with pytest.raises(ValueError, match="encoder_context"):
        VQConfig(encoder_context="tile")  # type: ignore[arg-type]


def test_encode_rejects_sizes_not_multiple_of_downsampling(tiny: VQModel) -> None:
    with pytest.raises(ValueError, match="70x64"):
        tiny.encode(torch.zeros(1, 3, 64, 70))


def test_attention_matches_explicit_formula() -> None:
    # LlamaGen's attention: softmax(q^T k / sqrt(C)) over all positions, single head, residual.
    torch.manual_seed(0)
    block = AttnBlock(16, VQ_PRESETS["tiny-ds8"]).eval()
    x = torch.randn(2, 16, 3, 5)
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # [B, C, HW]
    attn = torch.softmax(q.transpose(1, 2) @ k * 16**-0.5, dim=-1)  # [B, HW(query), HW(key)]
    ref = x + block.proj_out((v @ attn.transpose(1, 2)).reshape_as(x))
    torch.testing.assert_close(block(x), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Loading the released checkpoint format
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds16_state() -> dict[str, torch.Tensor]:
    # Uninitialised CPU storage is free to get; a distinct constant per tensor lets the test check
    # that every tensor landed under its own name.
    model = _meta_ds16().to_empty(device="cpu")
    state = model.state_dict()
    for i, tensor in enumerate(state.values()):
        tensor.fill_(float(i))
    return state


def test_load_llamagen_strict_round_trip(tmp_path: Path, ds16_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "vq_ds16_t2i.pt"
    torch.save({"model": ds16_state}, path)
    model = load_llamagen(path)
    assert not model.training
    loaded = model.state_dict()
    assert list(loaded) == list(ds16_state)
    for i, (name, tensor) in enumerate(loaded.items()):
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32, name
        assert float(tensor.reshape(-1)[0]) == float(i) and float(tensor.reshape(-1)[-1]) == float(i), name


def test_load_llamagen_names_missing_and_unexpected_keys(tmp_path: Path, ds16_state: dict[str, torch.Tensor]) -> None:
    broken = {k: v for k, v in ds16_state.items() if k != "decoder.conv_out.bias"}
    broken["quantize.extra"] = torch.zeros(1)
    path = tmp_path / "broken_vq.pt"
    torch.save({"model": broken}, path)
    with pytest.raises(ValueError) as err:
        load_llamagen(path)
    message = str(err.value)
    assert "broken_vq.pt" in message
    assert "decoder.conv_out.bias" in message and "quantize.extra" in message


def test_load_accepts_bare_state_dict_and_reports_shape_mismatch(tmp_path: Path) -> None:
    cfg = VQ_PRESETS["tiny-ds8"]
    state = VQModel(cfg).state_dict()
    torch.save(state, tmp_path / "bare.pt")
    assert isinstance(load_llamagen(tmp_path / "bare.pt", config=cfg), VQModel)
    state["quant_conv.bias"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError, match=r"quant_conv\.bias"):
        load_llamagen(tmp_path / "bad_shape.pt", config=cfg)


# ------------------------------------------------------------------------------------------------
# Presets and configuration
# ------------------------------------------------------------------------------------------------


def test_presets_and_build() -> None:
    assert VQ_PRESETS["llamagen-ds16"].downsample == 16
    assert VQ_PRESETS["shapes-ds8"].downsample == 8
    assert VQ_PRESETS["tiny-ds8"].downsample == 8
    model = build_vq("tiny-ds8", codebook_size=32)
    assert model.quantize.embedding.weight.shape == (32, 8)
    assert build_vq(VQ_PRESETS["tiny-ds8"]).config == VQ_PRESETS["tiny-ds8"]
    with pytest.raises(KeyError, match="tiny-ds8"):
        build_vq("no-such-preset")
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(ch=12, norm_groups=8)
    # YAML gives lists; the config keeps a tuple.
    assert VQConfig(ch_mult=[1, 2]).ch_mult == (1, 2)  # type: ignore[arg-type]


def test_shapes_preset_grids() -> None:
    model = build_vq("shapes-ds8").eval()
    with torch.no_grad():
        for (height, width), grid in {(64, 64): (8, 8), (64, 96): (8, 12), (96, 64): (12, 8)}.items():
            codes, _ = model.encode(torch.zeros(2, 3, height, width))
            assert codes.shape == (2, *grid)
            assert model.decode_codes(codes).shape == (2, 3, height, width)


# ------------------------------------------------------------------------------------------------
# Training from scratch
# ------------------------------------------------------------------------------------------------


def _flat_squares(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """White canvases, each with one axis-aligned square of a random flat colour, in [-1, 1]."""
    images = torch.ones(n, 3, size, size)
    for i in range(n):
        side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=generator))
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        images[i, :, y : y + side, x : x + side] = torch.rand(3, 1, 1, generator=generator) * 2 - 1
    return images


def test_training_reduces_loss_and_tracks_usage() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    # 32 x 32 canvases (4 x 4 codes): at 16 x 16 (2 x 2 codes) the tiny model needs far more steps.
    data = _flat_squares(16, 32, generator)
    model = build_vq("tiny-ds8").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for step in range(120):
        batch = data[torch.randint(0, len(data), (4,), generator=generator)]
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step == 0:
            # Nothing but the 4 x 4 x 4 codes of this batch has been recorded yet.
            assert model.quantize.codebook_used[-64:].long().tolist() == out.codes.flatten().tolist()
            assert model.quantize.codebook_used[:-64].eq(0).all()
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.35 * first, (first, last)  # typically ~0.18
    assert 0 < model.usage() <= 1

    model.eval()
    with torch.no_grad():
        out = model(data)
        codes, latents = model.encode(data)
    assert torch.equal(out.codes, codes)
    assert torch.allclose(out.latents, latents)
    assert float(out.recon_loss) < 0.35 * losses[0]
    before = model.quantize.codebook_used.clone()
    model(data)  # eval mode must not touch the usage buffer
    assert torch.equal(model.quantize.codebook_used, before)


def test_losses_and_straight_through_gradients() -> None:
    torch.manual_seed(0)
    model = build_vq(replace(VQ_PRESETS["tiny-ds8"], recon_loss="l1+l2", entropy_weight=0.1)).train()
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    out = model(images)
    cfg = model.config
    expected = out.recon_loss + out.codebook_loss + cfg.commit_beta * out.commit_loss + 0.1 * out.entropy_loss
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.recon_loss, F.l1_loss(out.recon, images) + F.mse_loss(out.recon, images))
    out.loss.backward()
    # Straight-through: the recon loss reaches the encoder; the codebook loss reaches the codebook.
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is not None
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_dead_code_restart_reuses_batch_latents() -> None:
    torch.manual_seed(0)
    cfg = replace(VQ_PRESETS["tiny-ds8"], restart_dead_codes=True, usage_window=64)
    model = build_vq(cfg).train()
    images = _flat_squares(4, 32, torch.Generator().manual_seed(1))  # 4 x 4 x 4 = 64 codes per call
    first = model(images)
    assert first.restarted == 0  # the window was not full yet: no entry had its chance
    used = set(first.codes.flatten().tolist())
    dead = sorted(set(range(cfg.codebook_size)) - used)
    assert dead and model.usage() == len(used) / cfg.codebook_size

    second = model(images)
    assert second.restarted == len(dead)
    book = F.normalize(model.quantize.embedding.weight.detach(), dim=-1)
    latents = second.latents.detach().reshape(-1, cfg.codebook_dim)
    # Every restarted entry is now (the direction of) one of this batch's latents ...
    similarity = book[dead] @ latents.T
    assert torch.allclose(similarity.max(dim=-1).values, torch.ones(len(dead)), atol=1e-5)
    # ... and the in-place write happened before the codebook entered the graph.
    second.loss.backward()


def test_dead_code_restart_goes_to_badly_fitted_latents() -> None:
    torch.manual_seed(0)
    cfg = replace(VQ_PRESETS["tiny-ds8"], restart_dead_codes=True, usage_window=8)
    quantize = build_vq(cfg).quantize
    book = quantize.codebook().detach()
    # 63 latents sit exactly on entry 0 (like plain white patches); one is far from every entry.
    outlier = F.normalize(-book.sum(0), dim=-1)
    latents = torch.cat([book[:1].expand(63, -1), outlier[None]])
    quantize.record(torch.zeros(8, dtype=torch.long))  # a full window in which only entry 0 was used
    assert quantize.restart_dead(latents) == cfg.codebook_size - 1
    new = F.normalize(quantize.embedding.weight.detach()[1:], dim=-1)
    # Uniform draws would put ~98% of the restarts on entry 0's latent again; all go to the outlier.
    torch.testing.assert_close(new, outlier.expand_as(new))
    # When every latent already sits on an entry, the draw falls back to uniform over the rows.
    quantize.record(torch.zeros(8, dtype=torch.long))
    assert quantize.restart_dead(book[:1].expand(4, -1)) == cfg.codebook_size - 1


def test_usage_ring_buffer_keeps_most_recent_codes() -> None:
    model = build_vq(replace(VQ_PRESETS["tiny-ds8"], usage_window=8))
    quantize = model.quantize
    assert model.usage() == 1 / 64  # nothing recorded: the stored zeros read as code 0 (LlamaGen)
    quantize.record(torch.tensor([5, 6, 7]))
    assert model.usage() == 3 / 64  # only what was recorded counts, not the initial zeros
    quantize.record(torch.arange(10, 20))
    assert quantize.codebook_used[-10:].long().tolist() == list(range(10, 20))
    assert model.usage() == 8 / 64  # window of 8
    quantize.record(torch.arange(CODEBOOK_USED_LEN + 5) % 64)  # longer than the buffer: keeps the tail
    assert quantize.codebook_used[-1].item() == (CODEBOOK_USED_LEN + 4) % 64


def test_tokenizer_stage_foreground_weighting() -> None:
    from stages.tokenizer import TokenizerStage

    generator = torch.Generator().manual_seed(1)
    images = _flat_squares(3, 32, generator)
    fg = (images < 0.95).any(dim=1, keepdim=True)
    recon = images + 0.1 * torch.randn(images.shape, generator=generator)
    for kind in ("l1", "l2", "l1+l2"):
        plain = TokenizerStage("tiny-ds8", {"recon_loss": kind})
        out_plain = plain.weighted_recon(recon, images)
        # Weight 0 is the VQ's own (unweighted) pixel loss.
        assert torch.allclose(out_plain, plain.vq._recon_loss(recon, images), atol=1e-6)
    # With a weight, only the foreground pixels' error counts more: an error on the background alone
    # costs less than the same error on the foreground alone.
    stage = TokenizerStage("tiny-ds8", {"recon_loss": "l1"}, foreground_weight=10.0)
    on_fg = images + 0.5 * fg
    on_bg = images + 0.5 * (~fg)
    per_pixel_fg = stage.weighted_recon(on_fg, images) / fg.float().mean()
    per_pixel_bg = stage.weighted_recon(on_bg, images) / (~fg).float().mean()
    assert per_pixel_fg > 5 * per_pixel_bg
    assert stage.hparams["foreground_weight"] == 10.0
    with pytest.raises(ValueError, match="foreground_weight"):
        TokenizerStage("tiny-ds8", foreground_weight=-1.0)


def test_tokenizer_stage_edge_weighting() -> None:
    from stages.tokenizer import TokenizerStage

    # One 4x4 square in an 8x8 white image: its outline is the ring of pixels either side of its border.
    images = torch.ones(1, 3, 8, 8)
    images[:, :, 2:6, 2:6] = -1.0
    stage = TokenizerStage("tiny-ds8", foreground_weight=2.0, edge_weight=5.0)
    weight = stage.pixel_weight(images)[0, 0]
    assert weight[3, 3] == 3.0  # inside, not on the outline: 1 + foreground
    assert weight[2, 2] == 8.0 and weight[2, 4] == 8.0  # inner ring: 1 + foreground + edge
    assert weight[1, 1] == 6.0 and weight[6, 3] == 6.0  # outer ring (background): 1 + edge
    assert weight[0, 0] == 1.0 and weight[7, 7] == 1.0  # far background
    # An error on the outline costs more than the same error inside the object.
    on_edge = images.clone()
    on_edge[:, :, 2, 2] += 0.5
    inside = images.clone()
    inside[:, :, 3, 3] += 0.5
    assert stage.weighted_recon(on_edge, images) > stage.weighted_recon(inside, images)
    assert TokenizerStage("tiny-ds8").pixel_weight(images) is None
    with pytest.raises(ValueError, match="edge_weight"):
        TokenizerStage("tiny-ds8", edge_weight=-1.0)


def test_tokenizer_checkpoints_record_their_config_and_refuse_another(tmp_path: Path) -> None:
    from stages.tokenizer import TokenizerStage
    from wallaroo.vq import VQ_STAMP_KEY
    from wallaroo.weights import load_vq_file

    stage = TokenizerStage("tiny-ds8", {"encoder_context": "patch"})
    checkpoint = {"state_dict": {f"vq.{k}": v for k, v in stage.vq.state_dict().items()}}
    stage.on_save_checkpoint(checkpoint)
    assert checkpoint[VQ_STAMP_KEY]["encoder_context"] == "patch"
    path = tmp_path / "vq.ckpt"
    torch.save(checkpoint, path)
    trained = stage.vq.config
    state = load_vq_file(path, trained)
    assert state.keys() == stage.vq.state_dict().keys()
    # Training-only fields may differ: the weights compute the same tokenizer.
    load_vq_file(path, replace(trained, recon_loss="l2", restart_dead_codes=False))
    # Same keys and shapes, another tokenizer: refused, naming the file and the field.
    with pytest.raises(ValueError, match=r"vq\.ckpt.*encoder_context: trained 'patch', expected 'image'"):
        load_vq_file(path, replace(trained, encoder_context="image"))
    # Files from before the record (and LlamaGen's own) carry none and load as they are.
    del checkpoint[VQ_STAMP_KEY]
    torch.save(checkpoint, path)
    load_vq_file(path, replace(trained, encoder_context="image"))
