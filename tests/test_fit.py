"""``wallaroo.fit`` end to end on CPU: every ShapesWorld step, init_from chaining, TensorBoard, resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from wallaroo.cli_errors import UsageError
from wallaroo.fit import STAGES_DIR, main, resolve_stage_path

ALL_YAML = sorted(str(p.relative_to(STAGES_DIR)) for p in STAGES_DIR.rglob("*.yaml"))
ENV = {"WALLAROO_QWEN_DIR": "/nonexistent/qwen", "WALLAROO_VQ": "/nonexistent/vq.pt", "WALLAROO_DATA": "/data"}


@pytest.fixture
def recipe_env(monkeypatch, tmp_path):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("WALLAROO_SHAPES", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", ALL_YAML)
def test_print_config_parses_every_recipe(name, recipe_env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--stage", name, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("stages.")
    assert printed["data"]["class_path"] == "datamodules.WallarooDataModule"
    if not name.startswith("shapes/"):
        overrides = printed["model"]["init_args"]
        assert "/nonexistent/" in yaml.safe_dump(overrides), "7B recipes take paths from the environment"


def test_bare_stage_names_resolve_and_unknown_fails():
    assert resolve_stage_path("stage1.yaml") == str(STAGES_DIR / "stage1.yaml")
    with pytest.raises(UsageError, match="available"):
        resolve_stage_path("stage9.yaml")


def test_missing_env_var_fails_before_heavy_work(monkeypatch):
    monkeypatch.delenv("WALLAROO_QWEN_DIR", raising=False)
    with pytest.raises(UsageError, match="WALLAROO_QWEN_DIR"):
        main(["--stage", "stage1.yaml", "--print_config"])


TINY = ["--model.init_args.preset", "tiny"]


def fit(step: str, *extra: str) -> None:
    common = ["--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false"]
    data = ["--data.init_args.num_workers", "0"]
    main(["--stage", f"shapes/{step}.yaml", *common, *data, *extra])


def event_tags(run_dir: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.mark.slow
def test_every_shapes_step_runs_and_chains(recipe_env):
    from datamodules.shapes import write_shapes_shards

    root = recipe_env
    write_shapes_shards(str(root / "data"), 48, seed=0)
    small = ["--data.init_args.t2i.batch_size", "4", "--data.init_args.t2i.epoch_samples", "64"]
    fit("vq", "--model.init_args.vq", "tiny-ds8", *small)
    assert (root / "vq" / "last.ckpt").exists()
    per_step = {
        "pretrain": ["--data.init_args.und.batch_size", "4"],
        "stage1": small,
        "stage2": small + ["--data.init_args.und.batch_size", "4"],
        "stage3": small + ["--data.init_args.und.batch_size", "4"],
        "stage4": small + ["--data.init_args.und.batch_size", "4", "--data.init_args.edit.batch_size", "4"],
    }
    expected_losses = {
        "pretrain": {"train/loss_und"},
        "stage1": {"train/loss_t2i", "train/loss_t2i_text", "train/loss_t2i_image"},
        "stage2": {"train/loss_t2i", "train/loss_und"},
        "stage3": {"train/loss_t2i", "train/loss_und"},
        "stage4": {"train/loss_t2i", "train/loss_und", "train/loss_edit", "train/loss_edit_image"},
    }
    for step, extra in per_step.items():
        fit(
            step,
            *TINY,
            "--model.init_args.preview.every_n_steps",
            "1",
            "--model.init_args.preview.max_new_tokens",
            "4",
            *extra,
        )
        run = root / step
        assert (run / "last.ckpt").exists(), step
        assert (run / "tb").is_dir()
        scalars, images = event_tags(run)
        assert expected_losses[step] <= scalars, (step, scalars)
        assert images, f"{step}: no preview image in TensorBoard"
        assert {"train/lr", "train/grad_norm"} <= scalars
        configs = list(run.rglob("config.yaml"))
        assert configs, "the resolved config is saved in the run dir"
    # The stage-4 checkpoint holds the editing modules and loads with weights_only=True.
    ckpt = root / "stage4" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("model.edit_head.") for k in state)
    # It records the VQ config its tokenizer weights go with; a loader building another one refuses them.
    from wallaroo.vq import VQ_PRESETS, VQ_STAMP_KEY, vq_stamp
    from wallaroo.weights import build_from_weights, load_any

    for trained, stale in ((root / "vq" / "last.ckpt", root / "stale_vq.ckpt"), (ckpt, root / "stale.ckpt")):
        full = torch.load(trained, map_location="cpu", weights_only=True)
        assert full[VQ_STAMP_KEY] == vq_stamp(VQ_PRESETS["tiny-ds8"])
        full[VQ_STAMP_KEY]["encoder_context"] = "patch"
        torch.save(full, stale)
    with pytest.raises(ValueError, match=r"stale_vq\.ckpt.*encoder_context: trained .patch."):
        build_from_weights(ckpt, vq_path=root / "stale_vq.ckpt")
    # Without a vq_path the stage checkpoint's own VQ weights are used, and its record is checked.
    own_vq = load_any(ckpt).config.with_overrides(vq_path=None)
    build_from_weights(ckpt, config=own_vq)
    with pytest.raises(ValueError, match=r"stale\.ckpt.*encoder_context: trained .patch."):
        build_from_weights(root / "stale.ckpt", config=own_vq)
    # The three generate sub-commands work on a checkpoint written by the recipes.
    from PIL import Image

    from wallaroo.generate import main as generate

    generate(["t2i", "--ckpt", str(ckpt), "--prompt", "a red circle at the top left", "--size", "48x72",
              "--out", str(root / "gen_t2i")])  # fmt: skip
    assert Image.open(next((root / "gen_t2i").glob("*.png"))).size == (48, 72)
    source = next((root / "gen_t2i").glob("*.png"))
    generate(["edit", "--ckpt", str(ckpt), "--image", str(source), "--instruction", "Remove the circle.",
              "--out", str(root / "gen_edit")])  # fmt: skip
    assert Image.open(next((root / "gen_edit").glob("*.png"))).size == (48, 72)
    generate(["understand", "--ckpt", str(ckpt), "--image", str(source), "--question", "图中有几个图形？",
              "--max-new-tokens", "3"])  # fmt: skip


@pytest.mark.slow
def test_resume_continues_the_same_run(recipe_env):
    from datamodules.shapes import write_shapes_shards

    root = recipe_env
    write_shapes_shards(str(root / "data"), 48, seed=0)
    base = [*TINY, "--model.init_args.init_from", "null", "--model.init_args.overrides.vq_path", "null",
            "--data.init_args.t2i.batch_size", "4", "--data.init_args.t2i.epoch_samples", "64",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--data.init_args.num_workers", "0", "--checkpoint.every_n_train_steps", "4"]  # fmt: skip

    def run(dirname: str, steps: int, *extra: str) -> float:
        main(["--stage", "shapes/stage1.yaml", *base, "--trainer.max_steps", str(steps),
              "--checkpoint.dirpath", str(root / dirname), "--trainer.default_root_dir", str(root / dirname),
              "--trainer.logger.init_args.save_dir", str(root / dirname), *extra])  # fmt: skip
        state = torch.load(root / dirname / "last.ckpt", map_location="cpu", weights_only=True)
        return state

    straight = run("straight", 8)
    run("resumed", 4)
    resumed = run("resumed", 8, "--ckpt_path", str(root / "resumed" / "last.ckpt"))
    assert straight["global_step"] == resumed["global_step"] == 8
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value, resumed["state_dict"][key], atol=1e-6), key


def test_env_is_clean():
    # The recipes never contain machine paths.
    for name in ALL_YAML:
        text = Path(resolve_stage_path(name)).read_text()
        assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text, name
    assert os.sep == "/"
