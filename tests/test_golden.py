"""The official tiny golden case: losses, logits, embeddings and positions of the released model."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import need_reference

RTOL = 1e-4


def vit_token_types(ids: torch.Tensor, vision_start: int = 969, vision_end: int = 970) -> torch.Tensor:
    """1 strictly between <|vision_start|> and <|vision_end|> (the ViT pads), 0 elsewhere."""
    types = torch.zeros_like(ids)
    for i, row in enumerate(ids):
        starts = (row == vision_start).nonzero().flatten().tolist()
        ends = (row == vision_end).nonzero().flatten().tolist()
        for s, e in zip(starts, ends, strict=True):
            types[i, s + 1 : e] = 1
    return types


def case_batch(c: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    ids = c[f"{name}.input_ids"]
    batch = {
        "input_ids": ids,
        "attention_mask": c[f"{name}.attention_mask"],
        "labels": c[f"{name}.text_token_labels"] if name != "c" else c["c.labels"],
        "mm_token_type_ids": vit_token_types(ids),
    }
    if name != "c":
        batch["image_labels"] = c[f"{name}.image_token_labels"]
    if name == "b":
        batch["pixel_values"] = torch.cat([c["b.pixel_values.0"], c["b.pixel_values.1"]])
        batch["image_grid_thw"] = c["b.image_grid_thw"]
        batch["pixel_latents"] = torch.cat([c["b.z_masked.0"], c["b.z_masked.1"]])
    if name == "c":
        batch["pixel_values"] = c["c.pixel_values"]
        batch["image_grid_thw"] = c["c.image_grid_thw"]
    return batch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-4) -> None:
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, rtol=RTOL, atol=atol), f"{what}: max abs err {err}"


TASKS = {"a": "t2i", "b": "edit", "c": "und"}


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_golden_losses(golden_model, golden_cases, golden_codebook, name):
    c = golden_cases
    with torch.no_grad():
        out = golden_model(case_batch(c, name), TASKS[name], golden_codebook, pixel_mask_ratio=0.0)
    expected = c[f"{name}.expected.loss"].item()
    assert abs(out.loss.item() - expected) <= RTOL * abs(expected)
    if name != "c":
        assert out.text.item() == pytest.approx(c[f"{name}.expected.text_token_loss"].item(), rel=RTOL)
        assert out.image.item() == pytest.approx(c[f"{name}.expected.image_token_loss"].item(), rel=RTOL)


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_golden_positions_embeddings_logits(golden_model, golden_cases, golden_codebook, name):
    c = golden_cases
    model = golden_model
    batch = case_batch(c, name)
    with torch.no_grad():
        prepared = model.prepare_inputs(batch, golden_codebook, TASKS[name], pixel_mask_ratio=0.0)
        hidden = model.decode(prepared)
    # 3-D M-RoPE ids exactly, pads included (the reference puts them at 1).
    assert torch.equal(prepared.position_ids, c[f"{name}.position_ids"])
    assert_close(prepared.inputs_embeds, c[f"{name}.expected.inputs_embeds"], "inputs_embeds")
    assert_close(hidden, c[f"{name}.expected.last_hidden"], "last_hidden")
    pos = c[f"{name}.logit_positions"]
    h = torch.stack([hidden[i, pos[i]] for i in range(pos.shape[0])])
    with torch.no_grad():
        assert_close(model.lm_head(h), c[f"{name}.expected.text_logits"], "text logits")
        if name != "c":
            head = model.head(TASKS[name])
            assert_close(head(h), c[f"{name}.expected.image_logits"], "image logits")


def test_golden_adapter_features(golden_model, golden_cases, golden_codebook):
    c = golden_cases
    with torch.no_grad():
        gen = golden_model.code_embeddings(c["a.target_codes"], golden_codebook, "t2i")
        assert_close(gen, c["a.expected.gen_input_features"], "gen adapter")
        for i in range(2):
            pix = golden_model.pixel_adapter(c[f"b.z_masked.{i}"])
            assert_close(pix, c[f"b.expected.pixel_features.{i}"], "pixel adapter")
            vit = golden_model.vit_features(c[f"b.pixel_values.{i}"], c["b.image_grid_thw"][i : i + 1])
            assert_close(vit, c[f"b.expected.vit_embeds.{i}"], "vit features")


def test_preset_matches_official_tiny_config():
    """The ``tiny`` preset is the official tiny configuration (apart from the codebook size)."""
    from wallaroo.config import get_preset

    official = json.loads((need_reference() / "config.json").read_text())
    hf = get_preset("tiny").backbone.to_hf(960)
    t, v = hf.text_config, hf.vision_config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(t, key) == official[key], key
    assert t.num_key_value_heads == official["num_key_value_heads"]
    assert t.rope_parameters["mrope_section"] == official["rope_scaling"]["mrope_section"]
    for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "window_size", "out_hidden_size"):
        assert getattr(v, key) == official["vision_config"][key], key
    assert list(v.fullatt_block_indexes) == official["vision_config"]["fullatt_block_indexes"]
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(hf, key) == official[key], key


def test_pixel_masking_matches_reference_rule(golden_model, golden_cases):
    """Training masks int(n*0.6) rows to the constant -1 vector, keeping int(n*0.4) rows unchanged."""
    z = torch.cat([golden_cases["b.z_unmasked.0"], golden_cases["b.z_unmasked.1"]])
    torch.manual_seed(0)
    masked = golden_model.mask_latents(z, [12, 12], 0.6)
    for block, orig in zip(masked.split(12), z.split(12), strict=True):
        kept = (block == orig).all(-1)
        assert int(kept.sum()) == int(12 * 0.4)
        assert (block[~kept] == -1).all()
