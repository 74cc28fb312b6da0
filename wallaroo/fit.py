"""``python -m wallaroo.fit --stage stage1.yaml``: train one stage with Lightning's CLI.

    python -m wallaroo.fit --stage shapes/stage1.yaml --trainer.max_steps 10 --data.t2i.batch_size 4
    python -m wallaroo.fit --stage stage2.yaml --print_config
    python -m wallaroo.fit --stage stage2.yaml --ckpt_path runs/stage2/last.ckpt      # resume this run

``--stage`` (alias ``--config``, ``-c``) takes a YAML file; a bare name resolves against the package's
``stages/`` folder. Dotted overrides follow the YAML structure. ``model.init_args.init_from`` starts a new
run from the previous stage's weights; ``--ckpt_path`` resumes the same run (optimiser, schedule, step and
data position). The YAML is read in jsonargparse's ``omegaconf+`` mode, so ``${oc.env:VAR}`` and other
interpolations work; a recipe that reads an environment variable which is not set is refused in one line
naming the variable and what it must point to (:data:`ENV_VARS`). TensorBoard logs, ``last.ckpt`` and the
resolved ``config.yaml`` go to the run directory. Checkpoint files are written atomically
(:class:`AtomicCheckpointIO`), so a run killed while saving keeps its previous ``last.ckpt``.

Mistakes (a missing recipe, environment variable or file) end in one line and exit status 2;
``--debug`` or ``WALLAROO_DEBUG=1`` shows the traceback (``wallaroo.cli_errors``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from wallaroo.checkpoints import atomic_torch_save
from wallaroo.cli_errors import UsageError, run_cli

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"
CONFIG_FLAGS = ("--stage", "--config", "-c")

# What each environment variable the recipes read must point to (the 7B recipes need the first three).
ENV_VARS: dict[str, str] = {
    "WALLAROO_QWEN_DIR": "a local Qwen2.5-VL-7B-Instruct directory (config.json, weights, tokenizer)",
    "WALLAROO_VQ": "LlamaGen's VQ tokenizer weights, vq_ds16_t2i.pt",
    "WALLAROO_DATA": "the shard root, one folder per task (README, 'Shard schema')",
    "WALLAROO_RUNS": "the output root (default: runs)",
    "WALLAROO_SHAPES": "the ShapesWorld run directory (default: runs/shapes)",
}
# ${oc.env:NAME} without a default (``${oc.env:NAME,default}`` never fails).
_REQUIRED_ENV = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_stage_path(value: str) -> str:
    """A path as given if it exists, else the same name under ``stages/``; a clear error otherwise."""
    if Path(value).exists():
        return value
    candidate = STAGES_DIR / value
    if candidate.exists():
        return str(candidate)
    available = sorted(str(p.relative_to(STAGES_DIR)) for p in STAGES_DIR.rglob("*.yaml"))
    raise UsageError(f"stage config {value!r} not found (nor {candidate}); available: {', '.join(available)}")


def required_env(recipe: str) -> list[str]:
    """The environment variables a recipe reads without a default, in order of first use."""
    try:
        text = Path(recipe).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"stage config {recipe} is not a text (YAML) file: {e}") from e
    return list(dict.fromkeys(_REQUIRED_ENV.findall(text)))


def check_recipe_env(recipe: str) -> None:
    """Refuse a recipe whose ``${oc.env:VAR}`` variables are not all set, before omegaconf fails on the first
    one deep inside the parser: one message naming every missing variable and what it must point to."""
    missing = [name for name in required_env(recipe) if name not in os.environ]
    if not missing:
        return
    what = ", ".join(f"{name} ({ENV_VARS.get(name, 'see the comments at the top of the recipe')})" for name in missing)
    s = "s" if len(missing) > 1 else ""
    raise UsageError(
        f"the recipe {recipe} reads the environment variable{s} {what}, not set: "
        f"export {' '.join(f'{n}=...' for n in missing)}"
    )


def resolve_recipe(value: str) -> str:
    """``resolve_stage_path`` plus ``check_recipe_env``."""
    path = resolve_stage_path(value)
    check_recipe_env(path)
    return path


def resolve_stage_args(argv: list[str]) -> list[str]:
    """Rewrite the value of every ``--stage/--config/-c`` flag with ``resolve_stage_path`` (and check the
    recipe's environment variables)."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            out += [arg, resolve_recipe(argv[i + 1])]
            next(it, None)
        elif any(arg.startswith(f + "=") for f in CONFIG_FLAGS if f.startswith("--")):
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={resolve_recipe(value)}")
        else:
            out.append(arg)
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written to a temporary file in the target's directory and moved
    over it with ``os.replace`` (:func:`wallaroo.checkpoints.atomic_torch_save`): a kill during a save leaves
    the previous ``last.ckpt`` whole. (Lightning's own writer stages the file in the system temp directory
    and moves it from there, a copy when that is another filesystem, after holding the whole checkpoint in
    memory.) Remote URLs keep Lightning's fsspec writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


class WallarooCLI(LightningCLI):
    """LightningCLI with ``--stage`` as the config option and ``--ckpt_path`` for resuming."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", ["wallaroo stage config (python -m wallaroo.fit --stage THIS_FILE)"])
        parser = self.parser_class(**kwargs)
        parser.add_argument(
            *CONFIG_FLAGS,
            action=ActionConfigFile,
            help="Stage YAML; a bare name resolves against the package's stages/ folder.",
        )
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="Resume this run from a Lightning checkpoint."
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 500,
                "checkpoint.save_top_k": 0,
            }
        )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """As Lightning's, plus a plain tqdm bar when stderr is not a terminal: Lightning's rich bar draws
        nothing into a pipe or a log file until the run ends, tqdm's redraws show the step count as it
        goes (``wallaroo.demo`` echoes one every 30 s). Left alone when the config sets its own bar or
        disables it."""
        trainer_cfg = self.config_init.get(self.subcommand, self.config_init).get("trainer", {}) or {}
        callbacks = list(trainer_cfg.get("callbacks") or [])
        wants_bar = trainer_cfg.get("enable_progress_bar") is not False
        if wants_bar and not sys.stderr.isatty() and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, TQDMProgressBar(refresh_rate=10)])
        plugins = trainer_cfg.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)


def main(argv: list[str] | None = None) -> WallarooCLI:
    """Parse, build and fit. ``argv`` defaults to the command line."""
    args = resolve_stage_args(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        # LightningCLI reads sys.argv itself when args is None; hand it the resolved paths that way.
        sys.argv[1:] = args
    cli = WallarooCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=None if argv is None else args,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "wallaroo"},
            },
        },
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli


def cli(argv: list[str] | None = None) -> int:
    """The command line: ``main`` with one-line errors (``wallaroo.cli_errors``); returns the exit status."""
    return run_cli(main, argv, prog="python -m wallaroo.fit")


if __name__ == "__main__":
    sys.exit(cli())
