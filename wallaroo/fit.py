"""``python -m wallaroo.fit --stage stage1.yaml``: train one stage with Lightning's CLI.

    python -m wallaroo.fit --stage shapes/stage1.yaml --trainer.max_steps 10 --data.t2i.batch_size 4
    python -m wallaroo.fit --stage stage2.yaml --print_config
    python -m wallaroo.fit --stage stage2.yaml --ckpt_path runs/stage2/last.ckpt      # resume this run

``--stage`` (alias ``--config``, ``-c``) takes a YAML file; a bare name resolves against the package's
``stages/`` folder. Dotted overrides follow the YAML structure. ``model.init_args.init_from`` starts a new
run from the previous stage's weights; ``--ckpt_path`` resumes the same run (optimiser, schedule, step and
data position). The YAML is read in jsonargparse's ``omegaconf+`` mode, so ``${oc.env:VAR}`` and other
interpolations work. TensorBoard logs, ``checkpoints/last.ckpt`` and the resolved ``config.yaml`` go to
the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"
CONFIG_FLAGS = ("--stage", "--config", "-c")


def resolve_stage_path(value: str) -> str:
    """A path as given if it exists, else the same name under ``stages/``; a clear error otherwise."""
    if Path(value).exists():
        return value
    candidate = STAGES_DIR / value
    if candidate.exists():
        return str(candidate)
    available = sorted(str(p.relative_to(STAGES_DIR)) for p in STAGES_DIR.rglob("*.yaml"))
    raise SystemExit(f"stage config {value!r} not found (nor {candidate}); available: {available}")


def resolve_stage_args(argv: list[str]) -> list[str]:
    """Rewrite the value of every ``--stage/--config/-c`` flag with ``resolve_stage_path``."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            out += [arg, resolve_stage_path(argv[i + 1])]
            next(it, None)
        elif any(arg.startswith(f + "=") for f in CONFIG_FLAGS if f.startswith("--")):
            flag, value = arg.split("=", 1)
            out.append(f"{flag}={resolve_stage_path(value)}")
        else:
            out.append(arg)
    return out


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


if __name__ == "__main__":
    main()
