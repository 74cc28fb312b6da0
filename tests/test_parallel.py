"""Distribution (``wallaroo.parallel``): FSDP2 on CPU with gloo, sharded checkpoints, FSDP1 policy.

The two-process tests share one run (``fsdp2_run``): two spawned ranks train a tiny ShapesWorld stage 2
under ``ModelParallelStrategy`` for three steps from the real data module, save a sharded checkpoint, resume
from it for two more steps and save again. The parent then replays the batches each rank saw in one process
(gradient accumulation over the two ranks' batches = the same global batch) and checks losses and weights,
and consolidates the checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stages.stage2 import Stage2
from wallaroo.parallel import (
    ParallelConfig,
    apply_activation_checkpointing,
    block_class_names,
    clip_grad_norm,
    consolidate_checkpoint,
    fsdp1_strategy,
    gathered,
    grad_norm,
    shard_units,
)

WORLD = 2
STEPS = 3  # before the checkpoint
MORE = 2  # after resuming
LR = 1e-3
CLIP = 0.05  # below the tiny model's O(1) gradient norms: the clipping path runs on sharded gradients


class ParallelStage2(Stage2):
    """Stage 2 that records its step losses (the FSDP2 wiring is the base class's own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_losses: list[float] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.step_losses.append(float(loss.detach()))
        return loss


def make_stage(init_from: str, parallel: ParallelConfig | None = None) -> ParallelStage2:
    from stages.base import OptimConfig

    return ParallelStage2(
        preset="tiny",
        overrides={"attn_implementation": "sdpa"},
        init_from=init_from,
        optim=OptimConfig(lr=LR, warmup_steps=0),
        parallel=parallel,
    )


def trainer_kwargs() -> dict[str, Any]:
    return dict(
        accelerator="cpu",
        precision="32-true",
        gradient_clip_val=CLIP,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def make_datamodule(shards: Path):
    from datamodules import WallarooDataModule

    common = dict(batch_size=2, epoch_samples=1000, shuffle_buffer=0)
    return WallarooDataModule(
        t2i={"shards": str(shards / "t2i"), **common},
        und={"shards": str(shards / "und"), "cfg_drop": 0.0, **common},
        num_workers=0,
    )


def eval_loss(stage: ParallelStage2, batch: dict[str, dict[str, torch.Tensor]]) -> float:
    """The stage's summed task losses on a batch, without Lightning's logging."""
    with torch.no_grad():
        losses = [stage.model(stage.tokenize_images(t, sub), t, stage.codebook).loss for t, sub in batch.items()]
    return float(sum(losses))


def greedy_codes(stage: ParallelStage2) -> torch.Tensor:
    """A 4x4 code grid sampled greedily with classifier-free guidance (cond + uncond rows)."""
    from wallaroo.sampling import SamplingConfig, generate_images
    from wallaroo.sequences import Bucket, collate, t2i_prompt
    from wallaroo.tokens import tokenizer_for

    tok, ids = tokenizer_for(stage.model_config)
    rows = [
        collate([t2i_prompt(tok, ids, "a red circle", Bucket(32, 32), lang="en", template_index=0, layout="square",
                            ds=stage.vq.downsample, drop_prompt=drop)], ids.pad, padding_side="left")
        for drop in (False, True)
    ]  # fmt: skip
    was_training = stage.model.training
    stage.model.eval()
    codes = generate_images(stage.model, stage.codebook, rows[0], rows[1], (4, 4), "t2i", SamplingConfig(top_k=1))
    stage.model.train(was_training)
    return codes


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights of a (possibly sharded) module on the CPU; a collective when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------------
# The two-process run
# ----------------------------------------------------------------------------------------------------


def _worker(rank: int, port: int, root: str) -> None:
    """One rank: train, checkpoint, resume, checkpoint; writes what the parent checks into ``root``."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.tensor import DTensor

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    out = Path(root)
    init_from = str(out / "init.safetensors")
    parallel = ParallelConfig(strategy="fsdp2", activation_checkpointing=True, param_dtype="fp32")

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            torch.save(batch, out / f"batch_r{rank}_s{trainer.global_step}.pt")

    def strategy() -> ModelParallelStrategy:
        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)

    L.seed_everything(0)
    stage = make_stage(init_from, parallel)
    trainer = L.Trainer(devices=WORLD, strategy=strategy(), max_steps=STEPS, callbacks=[Record()], **trainer_kwargs())
    trainer.fit(stage, datamodule=make_datamodule(out / "shards"))
    trainer.save_checkpoint(out / "first.ckpt")
    live = full_state(stage)
    model = stage.model
    report = {
        "losses": stage.step_losses,
        "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
        "vit_frozen": not any(p.requires_grad for p in model.visual.parameters()),
        "llm_trainable": all(p.requires_grad for p in model.language_model.parameters()),
        "checkpointed": sum(isinstance(m, CheckpointWrapper) for m in model.modules()),
    }
    # Rank 0 alone runs the gathered model (as sample previews do) while rank 1 moves on.
    batch = torch.load(out / "batch_r0_s0.pt", weights_only=True)
    with gathered(model):
        if rank == 0:
            stage.eval()
            with torch.no_grad():
                report["gathered_loss"] = eval_loss(stage, batch)
                report["gathered_codes"] = greedy_codes(stage).tolist()  # the sampling engine's direct calls
            stage.train()
    after = full_state(stage)  # a collective again: both ranks are back in step
    report["unchanged_by_gathered"] = all(torch.equal(after[k], live[k]) for k in live)

    class Restored(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            state = full_state(module)
            if rank == 0:
                torch.save(state, out / "restored.pt")
                (out / "resumed_at.txt").write_text(str(trainer.global_step))

    stage2 = make_stage(init_from, parallel)
    trainer2 = L.Trainer(devices=WORLD, strategy=strategy(), max_steps=STEPS + MORE, callbacks=[Restored()],
                         **trainer_kwargs())  # fmt: skip
    trainer2.fit(stage2, datamodule=make_datamodule(out / "shards"), ckpt_path=out / "first.ckpt")
    trainer2.save_checkpoint(out / "second.ckpt")
    live2 = full_state(stage2)
    report["global_step_after_resume"] = trainer2.global_step
    if rank == 0:
        torch.save(live, out / "live_first.pt")
        torch.save(live2, out / "live_second.pt")
    (out / f"report_r{rank}.json").write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Path:
    """Shards, initial weights, then the two-rank run (about a minute on two cores)."""
    import torch.multiprocessing as mp
    from safetensors.torch import save_file

    from datamodules.shapes import write_shapes_shards

    root = tmp_path_factory.mktemp("fsdp2")
    write_shapes_shards(root / "shards", samples=24, seed=0, tasks=("t2i", "und"), shard_size=24, workers=1)
    torch.manual_seed(0)
    stage = make_stage(None)
    stage.configure_model()
    state = {f"model.{k}": v for k, v in stage.model.state_dict().items()}
    state.update({f"vq.{k}": v for k, v in stage.vq.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "init.safetensors"))
    mp.start_processes(_worker, args=(_free_port(), str(root)), nprocs=WORLD, start_method="spawn")
    return root


def _reference(root: Path) -> tuple[ParallelStage2, list[float]]:
    """One process, the same global batches: each step accumulates rank 0's then rank 1's batch."""
    import lightning as L
    from torch.utils.data import DataLoader

    batches = [torch.load(root / f"batch_r{r}_s{s}.pt", weights_only=True) for s in range(STEPS) for r in range(WORLD)]
    L.seed_everything(0)
    stage = make_stage(str(root / "init.safetensors"))
    trainer = L.Trainer(devices=1, max_steps=STEPS, accumulate_grad_batches=WORLD, **trainer_kwargs())
    trainer.fit(stage, train_dataloaders=DataLoader(batches, batch_size=None))
    return stage, stage.step_losses


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process(fsdp2_run):
    reports = [json.loads((fsdp2_run / f"report_r{r}.json").read_text()) for r in range(WORLD)]
    stage, ref_losses = _reference(fsdp2_run)
    # Rank r's loss at step s is the reference's micro-batch (s, r): the same weights saw the same batch.
    got = [reports[r]["losses"][s] for s in range(STEPS) for r in range(WORLD)]
    assert got == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    live = torch.load(fsdp2_run / "live_first.pt", weights_only=True)
    ref = {f"model.{k}": v for k, v in stage.model.state_dict().items()}
    worst = max((live[k] - v).abs().max().item() for k, v in ref.items())
    moved = max((live[k] - v).abs().max().item() for k, v in _init_state(fsdp2_run).items() if k.startswith("model."))
    assert moved > 0.5 * STEPS * LR  # training really changed the weights (Adam moves by up to LR a step) ...
    assert worst < 1e-5, worst  # ... identically in both runs
    for r in reports:
        assert r["all_dtensor"] and r["vit_frozen"] and r["llm_trainable"]
        assert r["checkpointed"] == 2 + 4  # decoder layers + ViT blocks of the tiny preset
        assert r["unchanged_by_gathered"]
    # The gathered rank-0 forward is the full model's forward.
    stage.eval()
    batch = torch.load(fsdp2_run / "batch_r0_s0.pt", weights_only=True)
    with torch.no_grad():
        stage.model.load_state_dict({k[len("model.") :]: v for k, v in live.items() if k.startswith("model.")})
        expected = eval_loss(stage, batch)
    assert reports[0]["gathered_loss"] == pytest.approx(expected, rel=1e-5)
    assert reports[0]["gathered_codes"] == greedy_codes(stage).tolist()


def _init_state(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(root / "init.safetensors"))


@pytest.mark.slow
def test_sharded_checkpoint_resumes_and_consolidates(fsdp2_run, tmp_path):
    from wallaroo.convert import main as convert_main
    from wallaroo.parallel import consolidated_hyper_parameters
    from wallaroo.weights import load_any

    assert (fsdp2_run / "first.ckpt" / ".metadata").is_file()  # a sharded (DCP) directory
    live = torch.load(fsdp2_run / "live_first.pt", weights_only=True)
    restored = torch.load(fsdp2_run / "restored.pt", weights_only=True)
    assert (fsdp2_run / "resumed_at.txt").read_text() == str(STEPS)
    assert set(restored) == set(live) and all(torch.equal(restored[k], live[k]) for k in live)
    report = json.loads((fsdp2_run / "report_r0.json").read_text())
    assert report["global_step_after_resume"] == STEPS + MORE

    out = consolidate_checkpoint(fsdp2_run / "first.ckpt", tmp_path / "first.safetensors")
    loaded = load_any(out, config=make_stage(None).model_config)
    assert set(loaded.model_state) == {k[len("model.") :] for k in live if k.startswith("model.")}
    assert all(torch.equal(loaded.model_state[k], live[f"model.{k}"]) for k in loaded.model_state)
    assert loaded.vq_state is not None and all(torch.equal(v, live[f"vq.{k}"]) for k, v in loaded.vq_state.items())
    assert consolidated_hyper_parameters(out)["preset"] == "tiny"

    # The CLI, on the checkpoint written after resuming.
    second = tmp_path / "second.safetensors"
    convert_main(["consolidate", "--ckpt", str(fsdp2_run / "second.ckpt"), "--out", str(second)])
    live2 = torch.load(fsdp2_run / "live_second.pt", weights_only=True)
    loaded2 = load_any(second, config=make_stage(None).model_config)
    assert all(torch.equal(loaded2.model_state[k], live2[f"model.{k}"]) for k in loaded2.model_state)
    assert any(not torch.equal(live2[k], live[k]) for k in live)  # the resumed steps trained


# ----------------------------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel

    torch.manual_seed(0)
    return WallarooModel(get_preset("tiny", edit=True, attn_implementation="sdpa"))


def test_shard_units_follow_no_split_modules(tiny_model):
    assert block_class_names(tiny_model) == ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock")
    names = {id(m): n for n, m in tiny_model.named_modules()}
    units = [names[id(m)] for m in shard_units(tiny_model)]
    cfg = tiny_model.cfg.backbone
    assert len(units) == cfg.num_hidden_layers + cfg.vision_depth + 7
    assert units[-7:] == [
        "gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head",
        "backbone.model.language_model.embed_tokens", "backbone.lm_head",
    ]  # fmt: skip
    # Unit parameters are disjoint; the root keeps the final norm, the ViT patch embedding and merger.
    seen: set[int] = set()
    for unit in shard_units(tiny_model):
        ids = {id(p) for p in unit.parameters()}
        assert not ids & seen
        seen |= ids
    root_only = [n for n, p in tiny_model.named_parameters() if id(p) not in seen]
    assert any("language_model.norm" in n for n in root_only) and any("merger" in n for n in root_only)
    assert not any("embed_tokens" in n or "lm_head" in n for n in root_only)


def test_tied_embeddings_stay_in_the_root():
    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel

    model = WallarooModel(get_preset("tiny", **{"backbone.tie_word_embeddings": True}))
    assert model.lm_head.weight is model.language_model.embed_tokens.weight
    units = shard_units(model)
    assert model.lm_head not in units and model.language_model.embed_tokens not in units


def test_activation_checkpointing_keeps_keys_and_numbers():
    import copy

    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel
    from wallaroo.vq import build_vq

    torch.manual_seed(0)
    cfg = get_preset("tiny", attn_implementation="sdpa")
    model, vq = WallarooModel(cfg), build_vq(cfg.vq).eval()
    wrapped = copy.deepcopy(model)
    assert apply_activation_checkpointing(wrapped) == 6
    assert apply_activation_checkpointing(wrapped) == 6  # idempotent
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert len(shard_units(wrapped)) == len(shard_units(model))
    assert all(type(u).__name__ == "CheckpointWrapper" for u in shard_units(wrapped)[:6])
    batch = _t2i_batch(cfg, vq)
    losses = []
    grads = []
    for m in (model, wrapped):
        m.zero_grad()
        out = m(batch, "t2i", vq.quantize.embedding.weight)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(m.language_model.embed_tokens.weight.grad.clone())
    assert torch.equal(losses[0], losses[1])
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def _t2i_batch(cfg, vq) -> dict[str, torch.Tensor]:
    """One aspect-layout t2i sample with the codes of a random image."""
    from wallaroo.sequences import BUCKET_SETS, build_t2i, collate
    from wallaroo.tokens import tokenizer_for

    tok, ids = tokenizer_for(cfg)
    bucket = next(iter(BUCKET_SETS["shapes"].values()))
    with torch.no_grad():
        codes, _ = vq.encode(torch.rand(1, 3, bucket.h, bucket.w) * 2 - 1)
    sample = build_t2i(
        tok, ids, "a red circle", bucket, codes[0], lang="en", template_index=0, layout="aspect", ds=vq.downsample
    )
    return collate([sample], ids.pad)


def test_clip_grad_norm_matches_torch_on_plain_tensors():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    for m in (a, b):
        m(x).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.1)
    got = clip_grad_norm(b.parameters(), 0.1)
    assert torch.allclose(got, expected)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad)
    assert grad_norm(b.parameters()) == pytest.approx(0.1, rel=1e-4)
    assert float(grad_norm([nn.Parameter(torch.zeros(2))])) == 0.0


def test_parallel_config_validation():
    assert ParallelConfig().param_torch_dtype == torch.bfloat16
    assert ParallelConfig(reduce_dtype="fp32").reduce_torch_dtype == torch.float32
    with pytest.raises(ValueError, match="parallel.strategy"):
        ParallelConfig(strategy="zero3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="param_dtype"):
        ParallelConfig(param_dtype="int8")  # type: ignore[arg-type]


def test_fsdp1_strategy_wraps_the_same_units(tiny_model):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            fsdp1_strategy()
    strategy = fsdp1_strategy(ParallelConfig(strategy="fsdp"), require_gpu=False)
    from lightning.pytorch.strategies import FSDPStrategy

    from wallaroo.parallel import WallarooFSDPStrategy

    assert isinstance(strategy, FSDPStrategy) and isinstance(strategy, WallarooFSDPStrategy)
    assert strategy.mixed_precision.param_dtype == torch.bfloat16
    assert strategy.mixed_precision.reduce_dtype == torch.float32
    holder = nn.ModuleDict({"model": tiny_model})  # FSDP1 wraps the LightningModule around the model
    wrapped = strategy.kwargs["auto_wrap_policy"]._run_policy(holder, set(), {})
    assert {id(m) for m in wrapped} == {id(m) for m in shard_units(tiny_model)}
    with pytest.raises(ValueError, match="one mechanism"):
        WallarooFSDPStrategy(activation_checkpointing_policy={nn.Linear})


def test_consolidate_is_a_convert_subcommand():
    from wallaroo.convert import SUBCOMMANDS, build_parser

    assert "consolidate" in SUBCOMMANDS
    args = build_parser().parse_args(["consolidate", "--ckpt", "a.ckpt", "--out", "b.safetensors"])
    assert args.ckpt == "a.ckpt" and args.out == "b.safetensors"


def test_compile_llm_trains_through_the_compiled_model_and_keeps_keys_and_numbers():
    import copy

    from wallaroo.config import get_preset
    from wallaroo.model import WallarooModel
    from wallaroo.vq import build_vq

    torch.manual_seed(0)
    cfg = get_preset("tiny", attn_implementation="sdpa")
    model, vq = WallarooModel(cfg), build_vq(cfg.vq).eval()
    compiled = copy.deepcopy(model)
    calls: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        def run(*args: Any) -> Any:
            calls.append(1)
            return gm.forward(*args)

        return run

    compiled.compile_llm(backend=backend)
    assert compiled.compiled_llm is not None and model.compiled_llm is None
    assert list(compiled.state_dict()) == list(model.state_dict())
    batch = _t2i_batch(cfg, vq)
    losses, grads = [], []
    for m in (model, compiled):
        m.train()
        m.zero_grad()
        out = m(batch, "t2i", vq.quantize.embedding.weight)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(m.language_model.embed_tokens.weight.grad.clone())
    assert calls, "the training forward did not run the compiled text model"
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)
    calls.clear()
    compiled.eval()
    with torch.no_grad():
        compiled(batch, "t2i", vq.quantize.embedding.weight)
    assert not calls, "evaluation must keep the eager text model"


def test_compile_is_refused_with_fsdp_and_skipped_without_a_compiler(monkeypatch):
    import torch._inductor.config as inductor_config

    from stages.stage2 import Stage2
    from wallaroo.model import WallarooModel
    from wallaroo.parallel import compile_unavailable, configure_unsharded

    for strategy in ("fsdp", "fsdp2"):
        with pytest.raises(ValueError, match="parallel.compile is for one device or ddp"):
            ParallelConfig(strategy=strategy, compile=True)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-c++-compiler"))
    assert "no C++ compiler" in compile_unavailable(torch.device("cpu"))
    stage = Stage2(preset="tiny", parallel=ParallelConfig(compile=True))
    stage.model = WallarooModel(stage.model_config)
    with pytest.warns(UserWarning, match="training without torch.compile"):
        configure_unsharded(stage)
    assert stage.model.compiled_llm is None
