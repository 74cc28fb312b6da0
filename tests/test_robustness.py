"""Robust training runs: non-finite steps are skipped (one process and two gloo ranks), too many in a row stop
the run, checkpoints are written atomically, and a ``wallaroo.fit`` run killed mid-save resumes to the same
weights and data position as an uninterrupted one. The CLIs' one-line errors are in ``test_cli_errors.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from stages.base import OptimConfig
from stages.stage1 import Stage1
from wallaroo.checkpoints import atomic_torch_save
from wallaroo.cli_errors import RunStopped

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from datamodules.shapes import write_shapes_shards

    root = tmp_path_factory.mktemp("robust")
    write_shapes_shards(root, samples=32, seed=0, tasks=("t2i",), shard_size=32, workers=1)
    return root


def make_datamodule(shards: Path):
    from datamodules import WallarooDataModule

    return WallarooDataModule(t2i={"shards": str(shards / "t2i"), "batch_size": 2, "epoch_samples": 1000,
                                   "shuffle_buffer": 0}, num_workers=0)  # fmt: skip


class PoisonedStage1(Stage1):
    """Tiny stage 1 whose loss (``mode="loss"``: loss x NaN, so the gradients are NaN too; ``"loss_only"``:
    loss + NaN, finite gradients) or one gradient element (``"grad"``: +inf) is made non-finite at the global
    steps in ``bad_steps``, on the ranks in ``bad_ranks`` (all when ``None``)."""

    def __init__(self, *args: Any, mode: str = "loss", bad_steps: tuple[int, ...] = (), bad_ranks=None, **kw: Any):
        super().__init__(*args, **kw)
        self.mode, self.bad_steps, self.bad_ranks = mode, set(bad_steps), bad_ranks

    def _poisoned(self) -> bool:
        return self.global_step in self.bad_steps and (self.bad_ranks is None or self.global_rank in self.bad_ranks)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self._poisoned() and self.mode == "loss":
            return loss * float("nan")
        if self._poisoned() and self.mode == "loss_only":
            return loss + torch.tensor(float("nan"))
        return loss

    def on_after_backward(self) -> None:
        if self._poisoned() and self.mode == "grad":
            grad = self.model.gen_head[0].weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("inf")


def make_stage(**kw: Any) -> PoisonedStage1:
    return PoisonedStage1(preset="tiny", overrides={"attn_implementation": "sdpa"},
                          optim=OptimConfig(lr=1e-3, warmup_steps=2), **kw)  # fmt: skip


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def snapshot(module: L.LightningModule, trainer: L.Trainer) -> dict[str, Any]:
    """This rank's trainable weights (local shards), optimiser state and scheduler position."""
    opt = trainer.optimizers[0]
    state = {
        i: {k: local(v) if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
        for i, p in enumerate(q for g in opt.param_groups for q in g["params"])
        if p in opt.state
    }
    sched = trainer.lr_scheduler_configs[0].scheduler
    weights = {n: local(p) for n, p in module.model.named_parameters() if p.requires_grad}
    return {"weights": weights, "optim": state, "sched": sched.last_epoch, "lr": sched.get_last_lr()[0]}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not same(x, y):
                return False
        elif torch.is_tensor(x):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


class Snapshots(L.Callback):
    """``before[s]`` / ``after[s]``: snapshots around global step ``s``."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, Any]] = {}
        self.after: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = snapshot(module, trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = snapshot(module, trainer)


def trainer_kwargs(**kw: Any) -> dict[str, Any]:
    base = dict(accelerator="cpu", precision="32-true", gradient_clip_val=1.0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    base.update(kw)
    return base


# ----------------------------------------------------------------------------------------------------
# Non-finite steps, one process
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_training_continues(mode, shards, caplog):
    torch.manual_seed(0)
    stage = make_stage(mode=mode, bad_steps=(2,))
    snaps = Snapshots()
    trainer = L.Trainer(devices=1, max_steps=5, callbacks=[snaps], **trainer_kwargs())
    with caplog.at_level(logging.WARNING, logger="stages.base"):
        trainer.fit(stage, datamodule=make_datamodule(shards))
    assert trainer.global_step == 5  # the run went on to max_steps
    # The bad step left every weight, the AdamW state and the schedule as they were ...
    assert same(snaps.after[2], snaps.before[2])
    assert snaps.after[2]["optim"][0]["step"] == 2  # AdamW counted only the two good steps
    assert snaps.after[2]["sched"] == snaps.before[2]["sched"] == 2
    # ... while the steps around it trained and stepped the schedule (warm-up: 2 steps).
    for s in (1, 3):
        assert not same(snaps.after[s]["weights"], snaps.before[s]["weights"]), s
        assert snaps.after[s]["sched"] == snaps.before[s]["sched"] + 1
        assert all(torch.isfinite(w).all() for w in snaps.after[s]["weights"].values())
    assert stage.skipped_steps == 1 and stage.bad_steps_in_a_row == 0
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    (record,) = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    what = "loss and gradients" if mode == "loss" else "gradients"
    assert record.startswith(f"step 2: non-finite {what} (batch of t2i)"), record


def test_too_many_bad_steps_in_a_row_stop_the_run(shards, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    stage = make_stage(mode="loss", bad_steps=tuple(range(1, 100)), max_bad_steps=3)
    snaps = Snapshots()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = L.Trainer(devices=1, max_steps=50, callbacks=[snaps, ckpt],
                        **trainer_kwargs(enable_checkpointing=True))  # fmt: skip
    with pytest.raises(RunStopped) as info:
        trainer.fit(stage, datamodule=make_datamodule(shards))
    last = tmp_path / "last.ckpt"
    assert str(info.value) == (
        "stopped at global step 3: 3 steps in a row had a non-finite loss or gradient (max_bad_steps=3; the last: "
        "loss and gradients); no update was applied since global step 1; the last checkpoint is "
        f"{last} (global step 3), whose weights are the last good ones"
    )
    # That checkpoint holds the weights of the one good step.
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and state["wallaroo_skipped_steps"] == 2
    for name, w in snaps.after[0]["weights"].items():
        assert torch.equal(state["state_dict"][f"model.{name}"], w), name


# ----------------------------------------------------------------------------------------------------
# Non-finite steps, two gloo ranks (FSDP2), only one rank's batch bad
# ----------------------------------------------------------------------------------------------------

WORLD = 2
BAD_STEP = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, root: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from wallaroo.parallel import ParallelConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    torch.set_num_threads(1)
    L.seed_everything(0)
    # Rank 1's loss is NaN at BAD_STEP while its gradients stay finite: only the reduced decision keeps rank 0
    # from stepping alone.
    stage = make_stage(mode="loss_only", bad_steps=(BAD_STEP,), bad_ranks={1},
                       parallel=ParallelConfig(strategy="fsdp2", param_dtype="fp32"))  # fmt: skip
    snaps = Snapshots()
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    trainer = L.Trainer(devices=WORLD, strategy=strategy, max_steps=3, callbacks=[snaps], **trainer_kwargs())
    trainer.fit(stage, datamodule=make_datamodule(Path(root)))
    torch.save({"before": snaps.before, "after": snaps.after, "skipped": stage.skipped_steps,
                "global_step": trainer.global_step}, Path(root) / f"rank{rank}.pt")  # fmt: skip


@pytest.mark.slow
def test_two_ranks_skip_together_when_one_rank_is_bad(shards):
    import torch.multiprocessing as mp

    ranks = mp.start_processes(_rank_worker, args=(_free_port(), str(shards)), nprocs=WORLD, start_method="spawn",
                               join=False)  # fmt: skip
    deadline = time.monotonic() + 300  # ranks that took different decisions would wait for each other forever
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            raise AssertionError("the two ranks hung")
    for rank in range(WORLD):
        got = torch.load(shards / f"rank{rank}.pt", weights_only=False)
        assert got["global_step"] == 3 and got["skipped"] == 1, rank
        before, after = got["before"], got["after"]
        assert same(after[BAD_STEP], before[BAD_STEP]), f"rank {rank} stepped on the bad step"
        assert after[BAD_STEP]["sched"] == before[BAD_STEP]["sched"]
        for s in (0, 2):
            assert not same(after[s]["weights"], before[s]["weights"]), (rank, s)


# ----------------------------------------------------------------------------------------------------
# Atomic checkpoint writes
# ----------------------------------------------------------------------------------------------------


def test_atomic_save_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


_KILLED_SAVE = """
import sys, time, torch
from pathlib import Path
from wallaroo.checkpoints import atomic_torch_save

class Blocks:  # pickling it blocks: the process is killed inside torch.save
    def __reduce__(self):
        Path(sys.argv[2]).write_text("saving")
        time.sleep(120)
        return (int, (0,))

atomic_torch_save({"step": 2, "w": torch.zeros(1000), "blocks": Blocks()}, sys.argv[1])
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} did not appear within {timeout:.0f}s")
        time.sleep(0.02)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    marker = tmp_path / "saving"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(path), str(marker)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(path, weights_only=True)["step"] == 1
    (stale,) = tmp_path.glob(".last.ckpt.*.tmp")  # what the killed save left ...
    atomic_torch_save({"step": 3, "w": torch.ones(3)}, path)
    assert not stale.exists()  # ... is removed by the next save
    assert torch.load(path, weights_only=True)["step"] == 3


# ----------------------------------------------------------------------------------------------------
# wallaroo.fit end to end: killed mid-save and resumed; fuzzed data with NaN steps
# ----------------------------------------------------------------------------------------------------


class BlockTheSave(L.Callback):
    """Test-only callback for ``wallaroo.fit`` (``--trainer.callbacks+=tests.test_robustness.BlockTheSave``):
    at the checkpoint of global step ``$WALLAROO_TEST_BLOCK_STEP`` it adds an entry whose pickling writes
    ``$WALLAROO_TEST_MARKER`` and blocks, so the test can kill the run inside ``torch.save``."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == int(os.environ["WALLAROO_TEST_BLOCK_STEP"]):
            checkpoint["blocks"] = _BlockingEntry(os.environ["WALLAROO_TEST_MARKER"])


class _BlockingEntry:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text("saving")
        time.sleep(300)
        return (int, (0,))


def _fit_args(root: Path, run: str, steps: int) -> list[str]:
    return ["--stage", "shapes/stage1.yaml", "--model.init_args.preset", "tiny", "--model.init_args.init_from", "null",
            "--model.init_args.overrides.vq_path", "null", "--data.init_args.t2i.batch_size", "4",
            "--data.init_args.t2i.epoch_samples", "64", "--data.init_args.num_workers", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", str(steps), "--checkpoint.every_n_train_steps", "2",
            "--checkpoint.dirpath", str(root / run), "--trainer.default_root_dir", str(root / run),
            "--trainer.logger.init_args.save_dir", str(root / run)]  # fmt: skip


def _position(ckpt: dict[str, Any]) -> Any:
    """The data position a checkpoint records: the loaders' states and the fit loop's progress."""
    loop = ckpt["loops"]["fit_loop"]
    return loop["state_dict"].get("combined_loader"), loop["epoch_loop.batch_progress"]["total"]


@pytest.fixture
def fit_env(monkeypatch, tmp_path) -> Path:
    from datamodules.shapes import write_shapes_shards

    monkeypatch.setenv("WALLAROO_SHAPES", str(tmp_path))
    write_shapes_shards(str(tmp_path / "data"), 48, seed=0, tasks=("t2i",), workers=1)
    return tmp_path


@pytest.mark.slow
def test_fit_killed_mid_save_resumes_to_the_same_weights_and_data_position(fit_env):
    from wallaroo.fit import main

    root = fit_env
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               WALLAROO_TEST_BLOCK_STEP="4", WALLAROO_TEST_MARKER=str(root / "saving"))  # fmt: skip
    cmd = [sys.executable, "-m", "wallaroo.fit", *_fit_args(root, "killed", 8),
           "--trainer.callbacks+=tests.test_robustness.BlockTheSave"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(root / "saving", proc)  # inside the save of step 4, after the one of step 2
    except AssertionError:
        raise AssertionError(proc.communicate()[1].decode()[-3000:]) from None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = root / "killed" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2  # whole, the step-2 one
    assert list((root / "killed").glob(".last.ckpt.*.tmp"))  # the killed save's bytes went to a temporary file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses
    try:
        main(_fit_args(root, "straight", 8))
    finally:
        torch.set_num_threads(threads)
    resumed = subprocess.run([sys.executable, "-m", "wallaroo.fit", *_fit_args(root, "killed", 8), "--ckpt_path",
                              str(last)], cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torch.load(root / "straight" / "last.ckpt", map_location="cpu", weights_only=True)
    again = torch.load(last, map_location="cpu", weights_only=True)
    assert straight["global_step"] == again["global_step"] == 8
    assert _position(again) == _position(straight)
    assert straight["state_dict"].keys() == again["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value, again["state_dict"][key], atol=1e-6), key
    assert again["lr_schedulers"] == straight["lr_schedulers"]
    for mine, theirs in zip(again["optimizer_states"][0]["state"].values(),
                            straight["optimizer_states"][0]["state"].values(), strict=True):  # fmt: skip
        assert mine["step"] == theirs["step"] and torch.allclose(mine["exp_avg"], theirs["exp_avg"], atol=1e-6)
    assert not list((root / "killed").glob(".last.ckpt.*.tmp"))  # the killed save's leftover is gone


@pytest.mark.slow
def test_fit_on_fuzzed_shards_with_nan_steps_finishes(fit_env, monkeypatch):
    """Bad samples mixed into good shards (as the data tests do) and NaN losses at two steps: the run
    finishes, counts the skipped samples and the skipped steps, and its weights stay finite."""
    import numpy as np
    import webdataset as wds

    from stages.base import WallarooStage
    from wallaroo.fit import AtomicCheckpointIO, main

    root = fit_env
    good = next((root / "data" / "t2i").glob("*.tar"))
    records = list(wds.WebDataset(str(good), shardshuffle=False))[:12]
    png = records[0]["png"]
    bad = [
        {"__key__": "bad-truncated", "png": png[: len(png) // 2], "json": records[0]["json"]},
        {"__key__": "bad-nocaption", "png": png, "json": json.dumps({"lang": "en"}).encode()},
        {"__key__": "bad-json", "png": png, "json": b"{not json"},
        {"__key__": "bad-noimage", "json": records[0]["json"]},
    ]
    with wds.TarWriter(str(root / "data" / "t2i" / "mixed.tar")) as w:
        for r in records[:6] + bad + records[6:]:
            w.write({k: v for k, v in r.items() if k in ("__key__", "png", "json")})
    (root / "data" / "t2i" / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(3000))

    shared_step = WallarooStage.shared_step

    def nan_at_steps_2_and_3(self, batch, split):
        loss = shared_step(self, batch, split)
        return loss * float("nan") if split == "train" and self.global_step in (2, 3) else loss

    monkeypatch.setattr(WallarooStage, "shared_step", nan_at_steps_2_and_3)
    cli = main(_fit_args(root, "fuzzed", 6))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    stage = cli.model
    assert cli.trainer.global_step == 6 and stage.skipped_steps == 2 and stage.bad_steps_in_a_row == 0
    assert sum(cli.datamodule.skipped_counts().values()) > 0
    assert all(torch.isfinite(p).all() for p in stage.model.parameters())
    state = torch.load(root / "fuzzed" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["wallaroo_skipped_steps"] == 2


def test_max_bad_steps_is_validated_and_recorded():
    assert make_stage(max_bad_steps=0).hparams["max_bad_steps"] == 0
    assert make_stage().max_bad_steps == 20
    with pytest.raises(ValueError, match="max_bad_steps"):
        make_stage(max_bad_steps=-1)
