"""``wallaroo.demo`` helpers that do not need a training run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wallaroo.demo import ProgressThrottle, run_parallel


def test_progress_throttle_keeps_log_lines_and_thins_bar_redraws() -> None:
    throttle = ProgressThrottle(every=3600.0)
    bar = "Epoch 0:   5%|5         | {}/1400 [00:10<03:20,  6.62it/s, v_num=0, train/loss=0.5]\n"
    assert throttle.show(bar.format(70))  # the first redraw shows
    assert not throttle.show(bar.format(80))  # then at most one per interval
    assert throttle.show(bar.format(1400))  # the finished bar always shows, once
    assert not throttle.show(bar.format(1400))
    assert throttle.show("== evaluating stage1\n")
    assert not throttle.show("/venv/lib/python3.11/site-packages/x.py:1: UserWarning: noise\n")
    assert not throttle.show("\n")
    assert not throttle.show("Sanity Checking: |          | 0/? [00:00<?, ?it/s]/venv/x.py:21: warning\n")
    assert not throttle.show("Training: |          | 0/? [00:00<?, ?it/s]\n")


def test_run_parallel_logs_each_job_and_names_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ok = [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"]
    bad = [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"]
    run_parallel([("a", ok, tmp_path / "a.log"), ("b", ok, tmp_path / "b.log")], {})
    out = capsys.readouterr().out
    assert "[a] threads" in out and "[b] threads" in out
    assert (tmp_path / "a.log").read_text().startswith("threads")
    with pytest.raises(SystemExit, match=r"b \(3\)[\s\S]*b2\.log"):
        run_parallel([("a", ok, tmp_path / "a2.log"), ("b", bad, tmp_path / "b2.log")], {})
    assert "about to fail" in (tmp_path / "b2.log").read_text()


def test_budget_and_overrides_parse_and_name_bad_input() -> None:
    from wallaroo.demo import parse_budget, parse_overrides

    assert parse_budget("stage2=800, stage4=300") == {"stage2": 800, "stage4": 300}
    assert parse_budget("") == {}
    with pytest.raises(ValueError, match="stage9=5"):
        parse_budget("stage9=5")
    with pytest.raises(ValueError, match="stage2=many"):
        parse_budget("stage2=many")
    assert parse_overrides(["stages:model.init_args.overrides.code_position_scale=0.35"]) == [
        ("stages", "model.init_args.overrides.code_position_scale", "0.35")
    ]
    assert parse_overrides(["stage4:--trainer.precision=bf16-mixed"]) == [("stage4", "trainer.precision", "bf16-mixed")]
    for bad in ("stage4", "nostep:model.x=1", "stage4:model.x"):
        with pytest.raises(ValueError, match="STEP:KEY=VALUE"):
            parse_overrides([bad])


def test_run_parallel_splits_the_cores_it_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A sweep gives each demo a share of the machine through OMP_NUM_THREADS; two jobs then split that share.
    ok = [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"]
    run_parallel([("a", ok, tmp_path / "a.log"), ("b", ok, tmp_path / "b.log")], {"OMP_NUM_THREADS": "6"})
    assert (tmp_path / "a.log").read_text().strip() == "threads 3"


def test_shards_are_rewritten_when_samples_seed_or_edit_ops_change(tmp_path: Path) -> None:
    from datamodules.shapes import write_shapes_shards
    from wallaroo.demo import EDIT_OPS_MIX, shards_current

    manifest = tmp_path / "manifest.json"
    mix = list(EDIT_OPS_MIX)
    assert not shards_current(manifest, 6, 0, mix)
    write_shapes_shards(tmp_path, 6, 0, ["t2i", "edit"], shard_size=6, workers=1, edit_ops=mix)
    assert shards_current(manifest, 6, 0, mix)
    assert not shards_current(manifest, 7, 0, mix)
    assert not shards_current(manifest, 6, 1, mix)
    assert not shards_current(manifest, 6, 0, ["recolor", "remove", "add", "move"])


def test_time_cap_stops_the_last_step_in_time_and_keeps_its_last_checkpoint(tmp_path: Path) -> None:
    import torch

    from wallaroo.demo import TIME_RESERVE_S, time_cap_args, trained_steps

    assert time_cap_args(0, 500) == []  # no limit
    args = time_cap_args(1200, 1200 - TIME_RESERVE_S - 3725)  # 3725 s left for training: 1 h 2 min 5 s
    assert args == ["--trainer.max_time", "00:01:02:05", "--model.init_args.optim.time_horizon", "true",
                    "--checkpoint.every_n_train_steps", "0"]
    assert time_cap_args(1200, 1300)[1] == "00:00:00:01"  # over time already: stop after the first step
    torch.save({"global_step": 613, "state_dict": {"w": torch.zeros(2)}}, tmp_path / "last.ckpt")
    assert trained_steps(tmp_path / "last.ckpt") == 613
    torch.save({"state_dict": {}}, tmp_path / "weights.ckpt")
    assert trained_steps(tmp_path / "weights.ckpt") is None
