"""Stages: what each stage trains, optimiser groups, schedules, and the stage files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stages.base import OptimConfig, lr_lambda, param_groups
from stages.summary import summarize_stage
from wallaroo.config import get_preset
from wallaroo.freezing import set_trainable
from wallaroo.model import WallarooModel

STAGES = Path(__file__).resolve().parents[1] / "stages"

# DESIGN.md §1 / issue 3: trainable parameters of the 7B recipes.
EXPECTED_7B_TRAINABLE = {
    "stage1.yaml": 84_449_792,
    "stage2.yaml": 7_700_066_304,
    "stage3.yaml": 7_700_066_304,
    "stage3_aspect.yaml": 7_700_066_304,
    "stage4.yaml": 7_797_396_992,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_7B_TRAINABLE))
def test_7b_stage_trainable_counts(name):
    report = summarize_stage(name)
    assert report["trainable"] == EXPECTED_7B_TRAINABLE[name]
    assert report["modules"]["backbone.visual"]["trainable"] == 0


EXPECTED_SHAPES_PARTS = {
    "shapes/pretrain.yaml": {"llm"},  # train_vit: false (see the recipe)
    "shapes/stage1.yaml": {"gen_adapter", "gen_head"},
    "shapes/stage2.yaml": {"llm", "gen_adapter", "gen_head"},
    "shapes/stage3.yaml": {"llm", "gen_adapter", "gen_head"},
    "shapes/stage4.yaml": {"llm", "gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SHAPES_PARTS))
def test_shapes_stage_trainable_sets(name):
    report = summarize_stage(name)
    modules = report["modules"]
    trainable = {k for k, v in modules.items() if v["trainable"] and k not in ("model", "backbone")}
    expected = set()
    for part in EXPECTED_SHAPES_PARTS[name]:
        expected.add({"vit": "backbone.visual", "llm": "backbone.llm"}.get(part, part))
    assert trainable == expected
    for key in expected:
        assert modules[key]["trainable"] == modules[key]["total"]


def test_summary_cli_json(capsys):
    from wallaroo.summary import main

    main(["--stage", "stage4.yaml", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["trainable"] == 7_797_396_992
    assert report["modules"]["model"]["total"] == 8_473_947_136


def test_set_trainable_is_idempotent_and_evals_frozen_towers():
    model = WallarooModel(get_preset("tiny", edit=True))
    first = set_trainable(model, ["llm", "gen_adapter", "gen_head"])
    second = set_trainable(model, ["llm", "gen_adapter", "gen_head"])
    assert first == second
    model.train()
    assert not model.visual.training and model.language_model.training
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert not any(p.requires_grad for p in model.edit_head.parameters())
    with pytest.raises(ValueError, match="unknown trainable"):
        set_trainable(model, ["decoder"])
    plain = WallarooModel(get_preset("tiny"))
    with pytest.raises(ValueError, match="not in this model"):
        set_trainable(plain, ["edit_head"])


@pytest.mark.parametrize("train_vit", [True, False])
def test_pretrain_train_vit_switch(train_vit):
    from stages import VLMPretrain

    stage = VLMPretrain("tiny", train_vit=train_vit)
    stage.configure_model()
    assert all(p.requires_grad == train_vit for p in stage.model.visual.parameters())
    assert all(p.requires_grad for p in stage.model.language_model.parameters())
    assert stage.hparams["train_vit"] is train_vit  # saved with the checkpoint


def test_param_groups_partition_by_rule():
    model = WallarooModel(get_preset("tiny"))
    set_trainable(model, ["gen_adapter", "gen_head"])
    groups = param_groups(model, weight_decay=0.1)
    decay, no_decay = groups
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.ndim <= 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lr_scale_puts_a_part_in_groups_of_its_own_at_its_lr():
    from stages.pretrain import VLMPretrain

    stage = VLMPretrain(preset="tiny", optim=OptimConfig(lr=1e-3, weight_decay=0.1, lr_scale={"vit": 0.1}))
    stage.configure_model()
    opt = stage.configure_optimizers()["optimizer"]
    vit = {id(p) for p in stage.model.backbone.model.visual.parameters()}
    assert vit and all(p.requires_grad for p in stage.model.backbone.model.visual.parameters())
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        if g.get("part") == "vit":
            assert ids <= vit and g["lr"] == pytest.approx(1e-4)
        else:
            assert not ids & vit and g["lr"] == pytest.approx(1e-3)
    assert {id(p) for g in opt.param_groups if g.get("part") == "vit" for p in g["params"]} == vit
    assert {g["weight_decay"] for g in opt.param_groups if g.get("part") == "vit"} == {0.0, 0.1}
    with pytest.raises(ValueError, match="unknown part 'visual'"):
        OptimConfig(lr_scale={"visual": 0.1})
    with pytest.raises(ValueError, match="lr_scale.vit must be positive"):
        OptimConfig(lr_scale={"vit": 0})


def test_lr_schedules():
    assert lr_lambda(0, 10, 100, "constant", 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, "constant", 0.1) == 1.0
    assert lr_lambda(50, 10, 100, "constant", 0.1) == 1.0
    assert lr_lambda(10, 10, 110, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 10, 110, "cosine", 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert lr_lambda(500, 10, 110, "cosine", 0.1) == pytest.approx(0.1)
    # A time budget half spent at step 10 of 110: the cosine is half-way, whichever horizon is nearer.
    assert lr_lambda(10, 10, 110, "cosine", 0.1, time_progress=0.5) == pytest.approx(0.55)
    assert lr_lambda(60, 10, 110, "cosine", 0.1, time_progress=0.1) == pytest.approx(0.55)
    assert lr_lambda(10, 10, None, "cosine", 0.1, time_progress=1.0) == pytest.approx(0.1)
    assert lr_lambda(50, 10, 110, "constant", 0.1, time_progress=0.9) == 1.0
    # wsd: flat for the first 80% after warm-up, then a cosine over the last 20% (here steps 90..110).
    assert lr_lambda(89, 10, 110, "wsd", 0.1) == 1.0
    assert lr_lambda(100, 10, 110, "wsd", 0.1) == pytest.approx(0.55)
    assert lr_lambda(110, 10, 110, "wsd", 0.1) == pytest.approx(0.1)
    assert lr_lambda(10, 10, 110, "wsd", 0.1, time_progress=0.9) == pytest.approx(0.55)
    assert lr_lambda(60, 10, 110, "wsd", 0.1, decay_fraction=1.0) == lr_lambda(60, 10, 110, "cosine", 0.1)
    with pytest.raises(ValueError, match="decay_fraction"):
        OptimConfig(schedule="wsd", decay_fraction=0)
    with pytest.raises(ValueError):
        OptimConfig(schedule="linear")


def test_time_horizon_anneals_by_the_trainers_time_limit(monkeypatch):
    """``optim.time_horizon``: with ``max_time`` the cosine follows the time spent when it runs ahead of steps;
    without the option (or without a time limit) it follows steps only."""
    import lightning as L
    from lightning.pytorch.callbacks import Timer

    from stages.stage1 import Stage1

    def multiplier_after_warmup(time_horizon: bool, max_time: dict | None) -> float:
        optim = OptimConfig(lr=1.0, warmup_steps=2, schedule="cosine", time_horizon=time_horizon)
        stage = Stage1(preset="tiny", optim=optim)
        stage.configure_model()
        trainer = L.Trainer(max_steps=1002, max_time=max_time, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, accelerator="cpu")
        stage.trainer = trainer
        for timer in (c for c in trainer.callbacks if isinstance(c, Timer)):
            monkeypatch.setattr(timer, "time_elapsed", lambda *a, **k: 75.0)
        sched = stage.configure_optimizers()["lr_scheduler"]["scheduler"]
        return sched.lr_lambdas[0](2)

    three_quarters = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75))
    assert multiplier_after_warmup(True, {"seconds": 100}) == pytest.approx(three_quarters, rel=1e-3)
    assert multiplier_after_warmup(False, {"seconds": 100}) == pytest.approx(1.0)
    assert multiplier_after_warmup(True, None) == pytest.approx(1.0)


def test_training_step_gradients_reach_only_trainable_parts():
    """One stage-4 step on a tiny batch: trainable parts get gradients, frozen ones none."""
    from stages.stage4 import Stage4

    stage = Stage4(preset="tiny")
    stage.configure_model()
    batch = tiny_edit_batch(stage)
    loss = stage.shared_step({"edit": batch}, "val")
    loss.backward()
    for name, p in stage.model.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, name
    assert stage.model.edit_head[2].weight.grad is not None
    assert stage.model.pixel_adapter[0].weight.grad is not None


def tiny_edit_batch(stage) -> dict[str, torch.Tensor]:
    from wallaroo.images import VitImageProcessor
    from wallaroo.sequences import BUCKET_SETS, build_edit, collate
    from wallaroo.tokens import tokenizer_for

    cfg = stage.model_config
    tok, ids = tokenizer_for(cfg)
    bucket = next(iter(BUCKET_SETS["shapes"].values()))
    proc = VitImageProcessor.for_config(cfg)
    src = (torch.rand(bucket.h, bucket.w, 3) * 255).to(torch.uint8).numpy()
    pv, grid = proc([src])
    n_vit = int(grid.prod()) // 4
    sample = build_edit(
        tok,
        ids,
        "Remove the circle.",
        bucket,
        None,
        n_vit,
        lang="en",
        template_index=0,
        ds=stage.vq.downsample,
    )
    sample.pixel_values, sample.image_grid_thw = pv, grid
    batch = collate([sample], ids.pad)
    images = torch.rand(1, 3, bucket.h, bucket.w) * 2 - 1
    batch["target_images"] = images
    batch["source_images"] = images
    return batch


def test_initializer_range_sets_the_random_init_of_the_backbone() -> None:
    """The ``shapes`` preset initialises its backbone at 0.04 (README: why text-to-image learned slowly);
    other presets keep Qwen's 0.02, and the field reaches transformers' config at every level."""
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel

    torch.manual_seed(0)
    for name, std in (("shapes", 0.04), ("tiny", 0.02)):
        cfg = get_preset(name)
        assert cfg.backbone.initializer_range == std
        hf = cfg.backbone.to_hf(cfg.special_base)
        assert hf.initializer_range == hf.text_config.initializer_range == std
        model = WallarooModel(cfg)
        q = model.language_model.layers[0].self_attn.q_proj.weight
        assert abs(float(q.std()) - std) < 0.1 * std
    over = get_preset("tiny", **{"backbone.initializer_range": 0.05})
    assert over.backbone.to_hf(over.special_base).initializer_range == 0.05
    # The CLI's dotted ``--model.init_args.overrides.backbone.rope_theta 100`` arrives nested.
    nested = get_preset("tiny", backbone={"rope_theta": 100.0, "initializer_range": 0.05})
    assert nested.backbone.rope_theta == 100.0 and nested.backbone.initializer_range == 0.05
    assert nested.backbone.vocab_size == get_preset("tiny").backbone.vocab_size
    with pytest.raises(ValueError, match="backbone.nope"):
        get_preset("tiny", backbone={"nope": 1})


def test_stage4_edit_from_gen_copies_the_trained_generation_modules(tmp_path):
    """``edit_from_gen``: the editing modules that ``init_from`` lacks start as copies of gen_adapter /
    gen_head; without it they keep their own random initialisation."""
    from stages.stage2 import Stage2
    from stages.stage4 import Stage4

    prev = Stage2(preset="tiny")
    prev.configure_model()
    with torch.no_grad():
        for p in list(prev.model.gen_adapter.parameters()) + list(prev.model.gen_head.parameters()):
            p.add_(0.5)  # "trained": unlike any fresh initialisation
    ckpt = tmp_path / "stage2.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in prev.model.state_dict().items()}}, ckpt)

    copied = Stage4(preset="tiny", init_from=str(ckpt), edit_from_gen=True)
    copied.configure_model()
    assert copied.created_fresh == ("pixel_adapter", "edit_adapter", "edit_head")
    m = copied.model
    for new, old in (("edit_adapter", "gen_adapter"), ("pixel_adapter", "gen_adapter"), ("edit_head", "gen_head")):
        for (k, a), b in zip(getattr(m, new).state_dict().items(), getattr(m, old).state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=f"{new}.{k}")
    assert m.edit_head[2].weight.data_ptr() != m.gen_head[2].weight.data_ptr()  # copies, not shared

    fresh = Stage4(preset="tiny", init_from=str(ckpt))
    fresh.configure_model()
    assert not torch.equal(fresh.model.edit_head[2].weight, fresh.model.gen_head[2].weight)
