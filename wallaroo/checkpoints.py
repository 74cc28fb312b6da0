"""Weight files in and out: the official Wallaroo key layout, safe loading, and our own state dicts.

Official checkpoints (``{"epoch", "global_step", "state_dict"}``, fp32) use transformers-4.51 backbone
names and the release's module names (with its ``adpater`` spelling). Every official key maps to exactly
one of ours; anything else is refused by name. :func:`atomic_torch_save` writes a checkpoint so that a kill
during the write never leaves a truncated file behind.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# official prefix -> our prefix; order matters only for readability (prefixes are disjoint).
OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("wallaroo.visual.", "backbone.model.visual."),
    ("wallaroo.model.", "backbone.model.language_model."),
    ("wallaroo.lm_head.", "backbone.lm_head."),
    ("gen_input_adpater.", "gen_adapter."),
    ("gen_image_head.", "gen_head."),
    ("edit_input_adpater.", "edit_adapter."),
    ("edit_image_head.", "edit_head."),
    ("pixel_adapter.", "pixel_adapter."),
)


def official_key_to_ours(key: str) -> str:
    """Map one official state-dict key to our name; unknown keys raise ``KeyError`` naming the key."""
    for src, dst in OFFICIAL_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src) :]
    raise KeyError(f"official checkpoint key {key!r} has no counterpart in WallarooModel")


def our_key_to_official(key: str) -> str:
    for src, dst in OFFICIAL_PREFIXES:
        if key.startswith(dst):
            return src + key[len(dst) :]
    raise KeyError(f"key {key!r} has no counterpart in the official Wallaroo layout")


def convert_official_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename every key of an official state dict; all unknown keys are reported together."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for k, v in state.items():
        try:
            out[official_key_to_ours(k)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise KeyError(f"{len(unknown)} official key(s) cannot be mapped: {unknown[:10]}")
    return out


def has_official_edit_keys(state: Mapping[str, object]) -> bool:
    """True for a stage-4 official state dict (it carries the editing modules)."""
    return any(k.startswith(("edit_image_head.", "edit_input_adpater.", "pixel_adapter.")) for k in state)


def load_weights_file(path: str) -> dict[str, Tensor]:
    """Load a ``.safetensors`` file or a ``torch.save`` checkpoint with ``weights_only=True`` (never an
    unrestricted pickle). A checkpoint dict yields its ``state_dict`` (or ``model``) entry."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"cannot load {path} with weights_only=True: {e}") from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise TypeError(f"{path} holds a {type(obj).__name__}, expected a state dict")


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` that is all or nothing: the bytes go to a hidden temporary file in the same
    directory (``.NAME.XXXX.tmp``), are flushed to disk, and ``os.replace`` then puts the file in place in one
    step. A process killed during the save leaves ``path`` as it was (the previous checkpoint, or nothing);
    the temporary file it leaves is removed by the next save of the same ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a save that was killed
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the user's group
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself reaches the disk with the directory; best effort (not every filesystem allows it).
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
