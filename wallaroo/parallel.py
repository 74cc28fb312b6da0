"""Distribution, in one place: FSDP2 / FSDP1 sharding, activation checkpointing, sharded checkpoints.

Model code (``wallaroo.model``) is single-device PyTorch; everything here is applied to it from outside
(torchtitan's ``parallelize.py`` pattern). The shard units are derived, not listed: every module whose class
is named in the backbone's ``_no_split_modules`` (``Qwen2_5_VLDecoderLayer``, ``Qwen2_5_VLVisionBlock``),
each of our adapters and heads, and the (untied) input embedding and ``lm_head``; the rest (final norm, the
ViT patch embedding and merger, a tied embedding) lives in the root unit.

Strategies (``ParallelConfig.strategy``, the stage's ``parallel:`` init argument):

- ``fsdp2`` (trainer: ``lightning.pytorch.strategies.ModelParallelStrategy``): :func:`parallelize_stage` builds
  the model (real tensors on global rank 0 only, meta elsewhere), loads ``init_from``, freezes, checkpoints
  activations, ``fully_shard``-s, then broadcasts the weights from rank 0. CPU (gloo) and GPU.
- ``fsdp`` (trainer: ``WallarooFSDPStrategy``, FSDP1, GPU only): Lightning wraps the same units
  (:func:`shard_units`).
- ``ddp`` (trainer: ``ddp``): a replicated model.
- ``auto``: FSDP2 when the trainer provides a device mesh, else unsharded.

Activation checkpointing has one mechanism whatever the strategy: torch's ``checkpoint_wrapper``
(non-reentrant) around the block classes (:func:`apply_activation_checkpointing`), applied before sharding so
that a shard unit is ``CheckpointWrapper(block)``. The wrapper's ``_checkpoint_wrapped_module.`` prefix never
reaches a checkpoint: both ``Module.state_dict`` and ``torch.distributed.checkpoint`` strip it.

Sharded checkpoints: Lightning saves a distributed-checkpoint directory (``last.ckpt/`` holding ``.metadata``,
``__*_*.distcp`` and ``meta.pt``). :func:`consolidate_checkpoint` turns one into a single ``.safetensors`` file
of ``model.*`` / ``vq.*`` keys that ``wallaroo.weights.load_any`` reads (``python -m wallaroo.convert
consolidate``); it needs no process group.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.device_mesh import DeviceMesh

    from stages.base import WallarooStage
    from wallaroo.model import WallarooModel

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp", "fsdp2")
# Our own shard units besides the backbone's blocks: the generation and editing pathways (wallaroo.model).
HEAD_MODULES: tuple[str, ...] = ("gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head")
# Keys of a Lightning distributed checkpoint: ModelParallelStrategy nests the module state under
# "state_dict", FSDPStrategy(state_dict_type="sharded") under "model".
_DCP_STATE_PREFIXES: tuple[str, ...] = ("state_dict.", "model.")
_META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME
_HPARAMS_METADATA_KEY = "wallaroo_hyper_parameters"


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class ParallelConfig:
    """How a stage is distributed (YAML: ``model.init_args.parallel``).

    Attributes:
        strategy: ``fsdp2`` | ``fsdp`` | ``ddp`` | ``auto`` (see the module docstring). It must agree with
            ``trainer.strategy``; the stage checks it when the model is configured.
        activation_checkpointing: recompute each decoder layer / ViT block in backward instead of keeping
            its activations (torch ``checkpoint_wrapper``, non-reentrant). Any strategy.
        param_dtype: FSDP2 compute / all-gather dtype of the unsharded parameters; the sharded (optimiser)
            copy keeps the dtype the model was built in (fp32 under ``precision: 32-true``).
        reduce_dtype: FSDP2 gradient reduce-scatter dtype.
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3); ``False``
            keeps them until backward (ZeRO-2: more memory, one all-gather less per unit).
        hsdp: FSDP2 over Lightning's 2-D mesh as (replicate, shard): parameters sharded within each group of
            ``tensor_parallel_size`` ranks and replicated over ``data_parallel_size`` groups (set
            ``tensor_parallel_size`` to the GPUs per node for intra-node sharding). ``False``: shard over all
            ranks.
        compile: ``torch.compile`` the LLM (the whole text model, dynamic shapes) for training forwards
            (``WallarooModel.compile_llm``); evaluation and sampling stay eager. One device or DDP (FSDP is
            refused: not measured). Where TorchInductor has no compiler (no C++ compiler on a CPU, no Triton on
            a GPU) the stage warns and trains eagerly. The first steps pay the compilation (about a minute on 2
            CPU cores, ~10 s with a warm cache); measured in ``benchmarks/compile_step.py``.
    """

    strategy: Literal["auto", "ddp", "fsdp", "fsdp2"] = "auto"
    activation_checkpointing: bool = False
    param_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    reduce_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    reshard_after_forward: bool = True
    hsdp: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"parallel.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.compile and self.strategy in ("fsdp", "fsdp2"):
            raise ValueError(compile_refused(f"parallel.strategy={self.strategy!r}"))
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"parallel.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")

    @property
    def param_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.param_dtype]

    @property
    def reduce_torch_dtype(self) -> torch.dtype:
        return DTYPES[self.reduce_dtype]


def stage_parallel_config(stage: Any) -> ParallelConfig:
    """The stage's ``parallel`` (a ``ParallelConfig`` or a plain dict), or the defaults."""
    value = getattr(stage, "parallel", None)
    if value is None:
        return ParallelConfig()
    if isinstance(value, dict):
        return ParallelConfig(**value)
    return value


# ----------------------------------------------------------------------------------------------------
# Shard units and activation checkpointing
# ----------------------------------------------------------------------------------------------------


def _find_wallaroo_model(root: nn.Module) -> WallarooModel:
    from wallaroo.model import WallarooModel

    for module in root.modules():
        if isinstance(module, WallarooModel):
            return module
    raise TypeError(f"no WallarooModel inside {type(root).__name__}")


def block_class_names(model: WallarooModel) -> tuple[str, ...]:
    """The class names the backbone declares unsplittable (its ``_no_split_modules``), sorted (transformers
    may keep them in a set)."""
    names: set[str] = set()
    for module in model.backbone.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    if not names:
        raise TypeError(f"{type(model.backbone).__name__} declares no _no_split_modules")
    return tuple(sorted(names))


def block_classes(model: WallarooModel) -> tuple[type[nn.Module], ...]:
    """The module classes named by :func:`block_class_names` that occur in the model."""
    wanted = set(block_class_names(model))
    found: dict[type[nn.Module], None] = {}
    for module in model.modules():
        if type(module).__name__ in wanted:
            found[type(module)] = None
    return tuple(found)


def _is_checkpoint_wrapper(module: nn.Module) -> bool:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return isinstance(module, CheckpointWrapper)


def shard_units(root: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit, bottom-up: each backbone block (its
    ``CheckpointWrapper`` when activation checkpointing wrapped it, so that the recomputation happens inside
    the unit), then each adapter / head present, then the input embedding and ``lm_head`` (unless they are
    tied: shared parameters must stay in one unit, the root). ``root`` may be the ``WallarooModel`` or
    anything holding it (the LightningModule FSDP1 wraps).

    The embedding and ``lm_head`` are units of their own (as in torchtitan) because at 7B they hold 1.09B
    parameters: in the root unit they would stay gathered from the first forward to the end of backward and
    their gradients would wait unsharded for the root's reduce-scatter at the very end (about 9 GB per GPU in
    bf16 + fp32); as units, ``lm_head``'s gradient is reduced as soon as backward leaves it."""
    model = _find_wallaroo_model(root)
    classes = block_classes(model)
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if _is_checkpoint_wrapper(module) and isinstance(module._checkpoint_wrapped_module, classes):
            units.append(module)
            inside.add(id(module._checkpoint_wrapped_module))
        elif isinstance(module, classes):
            units.append(module)
    units += [getattr(model, name) for name in HEAD_MODULES if hasattr(model, name)]
    embed, lm_head = model.language_model.embed_tokens, model.lm_head
    if embed.weight is not lm_head.weight:
        units += [embed, lm_head]
    return units


def apply_activation_checkpointing(model: WallarooModel) -> int:
    """Wrap every block (:func:`block_classes`) in a non-reentrant ``checkpoint_wrapper``; idempotent.
    Returns the number of wrapped blocks. Must run before sharding."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as torch_apply,
    )

    if is_sharded(model):
        raise RuntimeError("activation checkpointing must be applied before sharding")
    classes = block_classes(model)
    wrapped = {id(m._checkpoint_wrapped_module) for m in model.modules() if _is_checkpoint_wrapper(m)}

    def check(module: nn.Module) -> bool:
        return isinstance(module, classes) and id(module) not in wrapped

    torch_apply(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=check,
    )
    return sum(1 for m in model.modules() if _is_checkpoint_wrapper(m))


# ----------------------------------------------------------------------------------------------------
# FSDP2
# ----------------------------------------------------------------------------------------------------


def is_sharded(module: nn.Module) -> bool:
    """True when ``fully_shard`` (FSDP2) was applied to ``module`` or inside it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _fsdp_mesh(device_mesh: DeviceMesh, hsdp: bool) -> DeviceMesh:
    """The mesh to hand ``fully_shard``: Lightning's (data_parallel, tensor_parallel) mesh is used as
    (replicate, shard) for HSDP, else reduced to one dimension over all ranks (we use no tensor parallelism,
    so the names of Lightning's dimensions carry no meaning here)."""
    if device_mesh.ndim == 1:
        return device_mesh
    if device_mesh.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D device mesh, got {device_mesh.ndim} dimensions")
    if hsdp:
        return device_mesh
    world = device_mesh.size()
    names = device_mesh.mesh_dim_names or ()
    for dim, name in enumerate(names):
        if device_mesh.size(dim) == world:
            return device_mesh[name]
    # Both dimensions > 1: one flat dimension over every rank of the mesh.
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_mesh.device_type, (world,), mesh_dim_names=("shard",))


def apply_fsdp2(
    model: WallarooModel,
    device_mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    hsdp: bool = False,
) -> WallarooModel:
    """``fully_shard`` each unit of :func:`shard_units` (decoder layers, ViT blocks, adapters and heads, input
    embedding and ``lm_head``), then the root, all with ``MixedPrecisionPolicy(param_dtype, reduce_dtype)``;
    in place, returns ``model``.

    ``requires_grad`` is kept per parameter, so frozen parts stay frozen (set it before or after, either
    works). Activation checkpointing (optional) is applied first. The root keeps its parameters gathered
    between forward and backward (FSDP2's default for the root): they are needed again at once, and a stage
    step runs one forward per task before its backward. Works on meta-device modules (materialise with
    ``to_empty`` afterwards, as :func:`parallelize_stage` does).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if is_sharded(model):
        raise RuntimeError("the model is already sharded")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    mesh = _fsdp_mesh(device_mesh, hsdp)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # Remembered for `gathered`, which switches resharding off and back on.
    model._wallaroo_reshard_after_forward = reshard_after_forward
    return model


def _mesh_device(device_mesh: DeviceMesh) -> torch.device:
    """This rank's device of the mesh (the current CUDA device for a CUDA mesh)."""
    kind = device_mesh.device_type
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _meta_model(cfg: Any) -> WallarooModel:
    """A ``WallarooModel`` of ``cfg``'s shape on the meta device (no weights read, no initialisation)."""
    from wallaroo.model import WallarooModel, pick_attn_implementation

    cfg = copy.deepcopy(cfg)
    with torch.device("meta"):
        if cfg.pretrained:
            # The shape comes from the pretrained directory's config.json; the weights stay on rank 0.
            from transformers import Qwen2_5_VLForConditionalGeneration

            from wallaroo.weights import load_hf_config

            hf = load_hf_config(cfg.pretrained)
            hf._attn_implementation = pick_attn_implementation(cfg.attn_implementation)
            return WallarooModel(cfg, backbone=Qwen2_5_VLForConditionalGeneration(hf))
        return WallarooModel(cfg)


def _broadcast_tensors(tensors: Iterable[Tensor], src: int = 0) -> None:
    import torch.distributed as dist

    for t in tensors:
        dist.broadcast(t.data, src=src)


def parallelize_stage(stage: WallarooStage) -> None:
    """Build, load, freeze and shard a stage's model under a device mesh (``ModelParallelStrategy``).

    Call from ``WallarooStage.configure_model`` when ``stage.device_mesh`` is set (every rank calls it). Only
    global rank 0 builds the model with real tensors, loads ``init_from`` / ``pretrained`` / ``vq_path``
    (``stage.load_initial_weights``) and so holds the full weights in host memory; the other ranks build on
    the meta device. After ``set_trainable`` and :func:`apply_fsdp2` (which moves rank 0's shards to the
    mesh device) the other ranks materialise their shards with ``to_empty`` and receive the weights from
    rank 0 with ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``; buffers (rotary
    tables) and the replicated frozen VQ are broadcast as they are. Sets ``stage.model``, ``stage.vq`` and
    ``stage.counts``. Lightning's own materialisation finds nothing left on the meta device.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from wallaroo.freezing import set_trainable
    from wallaroo.model import WallarooModel
    from wallaroo.vq import build_vq

    mesh = stage.device_mesh
    if mesh is None:
        raise RuntimeError("parallelize_stage needs a device mesh (trainer.strategy: ModelParallelStrategy)")
    cfg = stage_parallel_config(stage)
    if cfg.strategy not in ("fsdp2", "auto"):
        raise ValueError(
            f"model.parallel.strategy={cfg.strategy!r} but the trainer runs ModelParallelStrategy (FSDP2); set "
            "parallel.strategy: fsdp2 or choose the matching trainer.strategy"
        )
    if cfg.compile:
        raise ValueError(compile_refused("FSDP2 (ModelParallelStrategy)"))
    if stage.model is not None:
        raise RuntimeError("parallelize_stage builds the model itself; it is already built")
    device = _mesh_device(mesh)
    rank0 = dist.get_rank() == 0
    model_config = stage.model_config
    if rank0:
        model = WallarooModel(model_config)
        vq = build_vq(model_config.vq)
    else:
        model = _meta_model(model_config)
        with torch.device("meta"):
            vq = build_vq(model_config.vq)
    vq.requires_grad_(False)
    vq.eval()
    stage.model, stage.vq = model, vq
    if rank0:
        stage.load_initial_weights()
        # The meta ranks build in the default dtype (bf16 under precision bf16-true); a pretrained backbone is
        # read in fp32. Every rank must hold the same dtypes before sharding.
        dtype = torch.get_default_dtype()
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    stage.counts = set_trainable(model, stage.TRAINABLE)
    # Rank 0's full weights, taken before wrapping and sharding: plain keys, and the tensors stay alive
    # (on the host) until they are broadcast.
    full = model.state_dict() if rank0 else {}
    apply_fsdp2(
        model,
        mesh,
        param_dtype=cfg.param_torch_dtype,
        reduce_dtype=cfg.reduce_torch_dtype,
        activation_checkpointing=cfg.activation_checkpointing,
        reshard_after_forward=cfg.reshard_after_forward,
        hsdp=cfg.hsdp,
    )
    if rank0:
        model.to(device)  # what fully_shard did not move: buffers of modules outside any unit
        vq.to(device)
    else:
        model.to_empty(device=device)
        vq.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    # Non-persistent buffers (rotary inverse frequencies) are in no state dict; FSDP does not shard buffers.
    _broadcast_tensors(model.buffers())
    _broadcast_tensors(list(vq.parameters()) + list(vq.buffers()))
    model.train(stage.training)


def configure_unsharded(stage: WallarooStage) -> None:
    """The non-FSDP2 path, at the end of ``configure_model``: check that ``parallel.strategy`` agrees with the
    trainer's strategy, then apply activation checkpointing when asked (DDP, FSDP1, one device)."""
    cfg = stage_parallel_config(stage)
    trainer = getattr(stage, "_trainer", None)
    if trainer is not None and cfg.strategy != "auto":
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

        expected = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "fsdp2": ModelParallelStrategy}[cfg.strategy]
        if not isinstance(trainer.strategy, expected):
            raise ValueError(
                f"model.parallel.strategy={cfg.strategy!r} needs trainer.strategy to be a {expected.__name__}, "
                f"got {type(trainer.strategy).__name__}"
            )
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(stage.model)
    if cfg.compile:
        if trainer is not None:
            from lightning.pytorch.strategies import FSDPStrategy

            if isinstance(trainer.strategy, FSDPStrategy):
                raise ValueError(compile_refused("FSDP (FSDPStrategy)"))
            device = trainer.strategy.root_device
        else:
            device = torch.device("cpu")
        why_not = compile_unavailable(device)
        if why_not:
            warnings.warn(f"parallel.compile: {why_not}; training without torch.compile", stacklevel=2)
        else:
            stage.model.compile_llm()


def compile_refused(where: str) -> str:
    """The one-line error for ``parallel.compile`` under a sharding strategy (not measured there)."""
    return f"parallel.compile is for one device or ddp, not {where}; set parallel.compile: false"


def compile_unavailable(device: torch.device) -> str | None:
    """Why TorchInductor cannot compile for ``device`` on this machine, or ``None`` when it can."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # any failure to find or run one means no compiler
        return f"TorchInductor finds no C++ compiler ({type(e).__name__})"
    return None


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------


def _plain(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_norm(parameters: Iterable[nn.Parameter], norm_type: float = 2.0) -> Tensor:
    """Total gradient norm as a plain tensor (the same on every rank), over parameters that may mix sharded
    (``DTensor``) and ordinary gradients; parameters without a gradient are skipped. 0 when none has one."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups = [[g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]]
    # torch's get_total_norm stacks per-tensor norms, which cannot mix DTensors and tensors: one norm per kind.
    norms = [_plain(torch.nn.utils.get_total_norm(g, norm_type)) for g in groups if g]
    if len(norms) == 1:
        return norms[0]
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Scale the gradients in place so that their total norm is at most ``max_norm``; returns the norm before
    clipping as a plain tensor. Works on FSDP2's ``DTensor`` gradients (the norm is reduced over the shards,
    so every rank clips by the same factor) and on mixed lists."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type)
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ----------------------------------------------------------------------------------------------------
# Inference on a sharded model
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gathered(model: nn.Module, *, rank0_only: bool = True) -> Iterator[None]:
    """Make a sharded model usable outside the training forward (sample previews, generation).

    Every rank must enter (gathering the parameters is a collective); no-op for an unsharded model. Inside,
    every FSDP2 unit holds its full parameters and resharding after forward is off, so forwards (root or
    any submodule, e.g. the sampling engine's direct calls) run no collective: with ``rank0_only`` the other
    ranks leave at once (their memory is freed) and only rank 0 may run the model. Memory: the full
    parameters in ``param_dtype`` on each rank inside the block.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    import torch.distributed as dist

    for unit in units:
        unit.unshard()
    keep = not rank0_only or dist.get_rank() == 0
    root = _find_wallaroo_model(model) if not isinstance(model, FSDPModule) else model
    reshard = bool(getattr(root, "_wallaroo_reshard_after_forward", True))
    if keep:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
    try:
        if not keep:
            for unit in units:
                unit.reshard()
        yield
    finally:
        if keep:
            for unit in units:
                # The root never reshards after forward (it is needed again at once for backward).
                unit.set_reshard_after_forward(reshard and unit is not root, recurse=False)
                unit.reshard()


# ----------------------------------------------------------------------------------------------------
# FSDP1 (Lightning's FSDPStrategy, GPU only)
# ----------------------------------------------------------------------------------------------------


def wallaroo_wrap_policy() -> Any:
    """An FSDP1 auto-wrap policy that wraps exactly :func:`shard_units` (blocks or their checkpoint wrappers,
    adapters, heads) of the ``WallarooModel`` inside the wrapped root (the LightningModule)."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    class _UnitPolicy(CustomPolicy):
        def __init__(self) -> None:
            super().__init__(self._is_unit)
            self._units: set[int] = set()

        def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict) -> dict:
            # The units are found once per wrap, from the root: class sets alone cannot tell our adapters
            # (nn.Sequential) from other Sequentials in the backbone.
            self._units = {id(m) for m in shard_units(root_module)}
            return super()._run_policy(root_module, ignored_modules, root_kwargs)

        def _is_unit(self, module: nn.Module) -> bool:
            return id(module) in self._units

    return _UnitPolicy()


_FSDP1_DOC = """Lightning's ``FSDPStrategy`` (FSDP1) with Wallaroo's shard units and mixed precision, YAML-friendly:

        trainer:
          strategy:
            class_path: wallaroo.parallel.WallarooFSDPStrategy
            init_args: {param_dtype: bf16, reduce_dtype: fp32}

    Activation checkpointing is the stage's (``parallel.activation_checkpointing``, applied before wrapping),
    never the strategy's, so that there is one mechanism. ``use_orig_params=True`` because frozen and trainable
    parameters share units (the root). Buffers keep their dtype (the rotary tables must stay fp32). Extra
    keyword arguments go to ``FSDPStrategy``. Needs CUDA.
    """
_fsdp1_class: type | None = None


def _make_fsdp1_class() -> type:
    """Build ``WallarooFSDPStrategy`` on first use: importing Lightning costs seconds that the checkpoint
    tools of this module do not need."""
    global _fsdp1_class
    if _fsdp1_class is not None:
        return _fsdp1_class
    from lightning.pytorch.strategies import FSDPStrategy

    class WallarooFSDPStrategy(FSDPStrategy):
        __doc__ = _FSDP1_DOC

        def __init__(
            self,
            param_dtype: Literal["bf16", "fp16", "fp32"] = "bf16",
            reduce_dtype: Literal["bf16", "fp16", "fp32"] = "fp32",
            sharding_strategy: str = "FULL_SHARD",
            state_dict_type: Literal["full", "sharded"] = "sharded",
            **kwargs: Any,
        ) -> None:
            from torch.distributed.fsdp import MixedPrecision

            if "activation_checkpointing_policy" in kwargs or "activation_checkpointing" in kwargs:
                raise ValueError("set model.parallel.activation_checkpointing instead (one mechanism for all)")
            super().__init__(
                auto_wrap_policy=wallaroo_wrap_policy(),
                mixed_precision=MixedPrecision(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype]),
                sharding_strategy=sharding_strategy,
                state_dict_type=state_dict_type,
                use_orig_params=True,
                **kwargs,
            )

    WallarooFSDPStrategy.__module__ = __name__
    WallarooFSDPStrategy.__qualname__ = "WallarooFSDPStrategy"
    _fsdp1_class = WallarooFSDPStrategy
    return WallarooFSDPStrategy


def __getattr__(name: str) -> Any:
    # PEP 562: `wallaroo.parallel.WallarooFSDPStrategy` (YAML class_path) resolves lazily.
    if name == "WallarooFSDPStrategy":
        return _make_fsdp1_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fsdp1_strategy(parallel: ParallelConfig | None = None, *, require_gpu: bool = True, **kwargs: Any) -> FSDPStrategy:
    """A ``WallarooFSDPStrategy`` with ``parallel``'s dtypes (FSDP1 needs CUDA: fails clearly without it
    unless ``require_gpu=False``, e.g. to inspect the policy). Pass the stage the same ``parallel`` (with
    ``strategy="fsdp"``) so that activation checkpointing is applied."""
    parallel = parallel or ParallelConfig(strategy="fsdp")
    if require_gpu and not torch.cuda.is_available():
        raise RuntimeError(
            "FSDP1 (FSDPStrategy) needs CUDA GPUs; on CPU use FSDP2: trainer.strategy ModelParallelStrategy with "
            "model.parallel.strategy fsdp2"
        )
    return _make_fsdp1_class()(param_dtype=parallel.param_dtype, reduce_dtype=parallel.reduce_dtype, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Sharded checkpoints
# ----------------------------------------------------------------------------------------------------


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A directory written by ``torch.distributed.checkpoint`` (Lightning's sharded ``*.ckpt/``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_sharded_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The module state (Lightning keys: ``model.*``, ``vq.*``) and the checkpoint's other entries
    (``meta.pt``: ``hyper_parameters``, ``global_step``, ...) of a sharded checkpoint directory; full tensors
    on the CPU, read without a process group. Optimiser states are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    root = Path(path)
    if not is_sharded_checkpoint(root):
        raise ValueError(f"{root} is not a sharded checkpoint directory (no .metadata)")
    reader = dcp.FileSystemReader(str(root))
    entries = reader.read_metadata().state_dict_metadata
    for prefix in _DCP_STATE_PREFIXES:
        keys = [k for k, v in entries.items() if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)]
        if keys:
            break
    else:
        raise ValueError(f"{root}: no module state under {list(_DCP_STATE_PREFIXES)}; keys: {list(entries)[:8]}")
    state = {
        k[len(prefix) :]: torch.empty(entries[k].size, dtype=entries[k].properties.dtype)  # type: ignore[union-attr]
        for k in keys
    }
    # Loading into preallocated full tensors: DCP reassembles each from the saved shards.
    dcp.load({prefix[:-1]: state}, storage_reader=reader, no_dist=True)
    meta: dict[str, Any] = {}
    if (root / _META_FILE).is_file():
        from wallaroo.weights import torch_load_safe

        loaded = torch_load_safe(str(root / _META_FILE))
        meta = dict(loaded) if isinstance(loaded, dict) else {}
    return state, meta


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def consolidate_checkpoint(
    ckpt: str | os.PathLike[str], out: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> Path:
    """Write a sharded checkpoint directory as one ``.safetensors`` file of ``model.*`` / ``vq.*`` keys.

    Floating tensors are cast to ``dtype`` when given. The stage's ``hyper_parameters`` (preset, overrides,
    ...) go into the file's metadata as JSON under ``"wallaroo_hyper_parameters"``, so the model config can be
    recovered from the file alone. Returns the path written.
    """
    from safetensors.torch import save_file

    state, meta = read_sharded_checkpoint(ckpt)
    bad = [k for k in state if not k.startswith(("model.", "vq."))]
    if bad:
        raise ValueError(f"{ckpt}: keys outside model.* / vq.*: {bad[:8]} ({len(bad)} in all)")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if isinstance(meta.get("hyper_parameters"), dict):
        metadata[_HPARAMS_METADATA_KEY] = json.dumps(_json_safe(meta["hyper_parameters"]))
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=metadata)
    return out


def consolidated_hyper_parameters(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``hyper_parameters`` a consolidated file carries (see :func:`consolidate_checkpoint`), or None."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(_HPARAMS_METADATA_KEY)
    return json.loads(raw) if raw else None
