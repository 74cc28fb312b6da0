"""Weights directories: the exported ``understanding/`` part is a plain Qwen2.5-VL model for stock
``transformers``, and every source round-trips through ``load_any`` / ``build_from_weights``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image


def sharpen(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every weight like the golden case does (unit-gain fan-in scaling, norms near 1): with the
    default std-0.02 init attention is almost uniform and a position or mask mistake would hardly show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny editing model with sharpened random weights, its VQ and tokenizer, exported once."""
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel
    from wallaroo.tokens import tokenizer_for
    from wallaroo.vq import build_vq
    from wallaroo.weights import export_weights_dir

    torch.manual_seed(0)
    cfg = get_preset("tiny", edit=True, attn_implementation="sdpa")
    model = WallarooModel(cfg).eval()
    sharpen(model)
    vq = build_vq(cfg.vq).eval()
    tok, ids = tokenizer_for(cfg)
    out = export_weights_dir(model, vq, tok, cfg, tmp_path_factory.mktemp("export") / "tiny", stage="Stage4")
    return model, vq, tok, ids, out


def und_batch(model, tok, ids) -> dict[str, torch.Tensor]:
    """A two-turn understanding sample about a real photo, built by the package's own pipeline."""
    from skimage import data

    from wallaroo.images import VitImageProcessor
    from wallaroo.sequences import build_und, collate

    cfg = model.cfg
    proc = VitImageProcessor.for_config(cfg)
    image = Image.fromarray(np.asarray(data.astronaut())).resize((112, 84))
    pixel_values, grid = proc([image])
    conversation = [
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": "A person in a white suit."},
        {"role": "user", "content": "What color is it?"},
        {"role": "assistant", "content": "White."},
    ]
    sample = build_und(tok, ids, conversation, [int(grid.prod()) // 4])
    sample.pixel_values, sample.image_grid_thw = pixel_values, grid
    return collate([sample], ids.pad)


def test_layout(tiny):
    *_, out = tiny
    meta = json.loads((out / "wallaroo.json").read_text())
    assert meta["format"] == "wallaroo-weights" and meta["stage"] == "Stage4"
    assert meta["config"]["pretrained"] is None and meta["config"]["tokenizer"] == "tiny"
    for rel in (
        "understanding/config.json",
        "understanding/model.safetensors",
        "understanding/tokenizer.json",
        "understanding/preprocessor_config.json",
        "understanding/chat_template.json",
        "generation/model.safetensors",
        "generation/config.json",
        "generation/vq.safetensors",
        "generation/vq_config.json",
    ):
        assert (out / rel).is_file(), rel
    from safetensors import safe_open

    with safe_open(str(out / "generation" / "model.safetensors"), "pt") as f:
        prefixes = sorted({k.split(".")[0] for k in f.keys()})
    assert prefixes == ["edit_adapter", "edit_head", "gen_adapter", "gen_head", "pixel_adapter"]


def test_understanding_dir_is_a_stock_qwen25vl(tiny):
    """Stock ``from_pretrained`` on ``DIR/understanding`` gives our logits on an understanding sample."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model, _, tok, ids, out = tiny
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(out / "understanding"), local_files_only=True, attn_implementation="sdpa"
    ).eval()
    batch = und_batch(model, tok, ids)
    with torch.no_grad():
        hidden = model.decode(model.prepare_inputs(batch, None, "und"))
        ours = model.lm_head(hidden)
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
        ).logits
        # Sensitivity: without mm_token_type_ids transformers gives the ViT tokens 1-D positions.
        flat = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits
    scale = ours.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale
    assert (ours - flat).abs().max().item() > 1e-3 * scale
    # The saved tokenizer is the one we trained with, Wallaroo tokens included.
    saved = AutoTokenizer.from_pretrained(str(out / "understanding"), local_files_only=True)
    text = "<|im_start|>user\n画一只猫 a cat<|im_end|><|generate_start|><|end_of_line>|<indicator:64>"
    assert saved(text)["input_ids"] == tok(text)["input_ids"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_build_from_weights_round_trip(tiny):
    from wallaroo.weights import build_from_weights

    model, vq, _, ids, out = tiny
    model2, vq2, _, ids2 = build_from_weights(out)
    assert_same_state(model.state_dict(), model2.state_dict())
    assert_same_state(vq.state_dict(), vq2.state_dict())
    assert ids2 == ids and model2.has_edit and not model2.training
    # Recomputed rotary tables (non-persistent buffers, never in a checkpoint) equal the original ones.
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), model2.named_buffers(), strict=True):
        assert n1 == n2 and torch.equal(b1, b2), n1


def test_build_from_weights_casts_dtype(tiny):
    from wallaroo.weights import build_from_weights

    *_, out = tiny
    model, vq, _, _ = build_from_weights(out, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vq.parameters()} == {torch.float32}  # the VQ stays fp32


def test_export_refuses_to_clobber(tiny, tmp_path):
    from wallaroo.weights import export_weights_dir

    model, vq, tok, _, _ = tiny
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_weights_dir(model, vq, tok, model.cfg, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_lightning_checkpoint_and_consolidated_safetensors(tmp_path):
    """A real stage checkpoint (dataclass hyper-parameters included) and a ``model.*``/``vq.*`` safetensors
    file load with ``load_any``; ``convert export`` turns the checkpoint into a weights directory."""
    import lightning as L
    from safetensors.torch import save_file

    from stages.base import OptimConfig
    from stages.stage1 import Stage1
    from wallaroo.convert import main
    from wallaroo.weights import SOURCE_LIGHTNING, SOURCE_SAFETENSORS, build_from_weights, load_any

    stage = Stage1(preset="tiny", overrides={"attn_implementation": "sdpa"}, optim=OptimConfig(lr=1e-3))
    stage.configure_model()
    trainer = L.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_progress_bar=False
    )
    trainer.strategy.connect(stage)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)

    loaded = load_any(ckpt)
    assert loaded.source == SOURCE_LIGHTNING and loaded.config.name == "tiny" and not loaded.has_edit
    assert loaded.config.attn_implementation == "sdpa"
    assert_same_state(loaded.model_state, stage.model.state_dict())
    assert_same_state(loaded.vq_state, stage.vq.state_dict())

    out = main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "weights")])
    model, vq, _, _ = build_from_weights(out)
    assert_same_state(model.state_dict(), stage.model.state_dict())
    assert_same_state(vq.state_dict(), stage.vq.state_dict())

    flat = {f"model.{k}": v.contiguous() for k, v in stage.model.state_dict().items()}
    flat.update({f"vq.{k}": v.contiguous() for k, v in stage.vq.state_dict().items()})
    save_file(flat, str(tmp_path / "consolidated.safetensors"))
    loaded = load_any(tmp_path / "consolidated.safetensors")
    assert loaded.source == SOURCE_SAFETENSORS and loaded.config is None
    assert_same_state(loaded.model_state, stage.model.state_dict())
    with pytest.raises(ValueError, match="pass config"):
        build_from_weights(tmp_path / "consolidated.safetensors")
    model, vq, _, _ = build_from_weights(tmp_path / "consolidated.safetensors", config=stage.model_config)
    assert_same_state(model.state_dict(), stage.model.state_dict())
