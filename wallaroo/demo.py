"""``python -m wallaroo.demo``: the whole ShapesWorld pipeline on a laptop CPU.

    python -m wallaroo.demo [--out runs/shapes] [--quick]

Writes ShapesWorld shards, trains the small VQ tokenizer, pre-trains the small Qwen2.5-VL on
understanding, runs stages 1-4 through ``wallaroo.fit`` (the same CLI and recipes as at 7B, from
``stages/shapes/``), and evaluates with ShapesEval after each step. It ends with a table of scores per
stage, ``results.png`` (the same as a chart), a sample grid per stage and the TensorBoard command.

Layout under ``--out``: ``data/`` (shards), ``<step>/last.ckpt``, ``<step>/tb/`` (TensorBoard),
``<step>/eval/metrics.json`` (keys ``t2i_accuracy``, ``und_accuracy``, ``edit_accuracy``,
``tokenizer_ceiling`` where the step has the task) and ``<step>/eval/grid.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from datamodules.shapes_world import EDIT_OPS


@dataclass(frozen=True)
class Step:
    name: str
    recipe: str
    steps: int
    quick_steps: int
    tasks: tuple[str, ...]
    teaches: str
    # Steps of one wave share nothing and run at the same time, the cores split between them.
    wave: int


STEPS: tuple[Step, ...] = (
    # Full-run steps sized for ~19 min on an idle 2-core CPU with AMX, where the stages train in bf16 autocast
    # (--precision auto) and stages 2-4 with the LLM torch.compile-d (parallel.compile; stage 4 0.75x the step time,
    # benchmarks/compile_step.py). The tokenizer and the VLM pre-training do not depend on each other, so they run
    # side by side on one core each (~110 s); then stages 1-4 get both cores. Stage 2 teaches text-to-image (LLM
    # trainable) at 48x48, stage 3 the other two sizes, stage 4 editing while it keeps training the other tasks;
    # stage 4 is where steps pay most (from one stage-3 checkpoint, compiled, bf16: 650 -> 880 steps of the earlier
    # stage-4 mix took edit 0.135 -> 0.37 and t2i 0.85 -> 0.945), but stage 2 cannot give them up (fp32, 450 steps:
    # t2i 0.015; 600: 0.355). Without AMX (fp32) these budgets take ~1.15-1.4x longer. Each fit also costs ~10 s
    # of start-up and each ShapesEval 3-15 s. Slower hosts (seen: up to 2x; 1367 s for one run of these budgets)
    # take longer, so --time-limit (default 1200 s) cuts stage 4 short where the 20 minutes would not hold.
    Step("vq", "shapes/vq.yaml", 1200, 120, (), "the image tokenizer", wave=0),
    Step("pretrain", "shapes/pretrain.yaml", 400, 15, ("und",), "understanding (the small VLM)", wave=0),
    Step("stage1", "shapes/stage1.yaml", 20, 5, ("t2i",), "first images (48x48)", wave=1),
    Step("stage2", "shapes/stage2.yaml", 600, 5, ("t2i", "und"), "text-to-image with understanding", wave=2),
    Step("stage3", "shapes/stage3.yaml", 250, 5, ("t2i", "und"), "all three sizes", wave=3),
    Step("stage4", "shapes/stage4.yaml", 800, 5, ("t2i", "und", "edit"), "editing", wave=4),
)
KEYS = ("tokenizer_ceiling", "t2i_accuracy", "und_accuracy", "edit_accuracy")
# The editing shards' op cycle (datamodules.shapes_world.edit_samples): recolor 3/8, remove 2/8, move 2/8, add 1/8.
# ShapesEval stays balanced. With balanced shards add reached 0.92-0.96 while recolor, the op that needs the most
# steps, stayed at 0.35-0.39 after 800 stage-4 steps (README, "Stage 4 trades text-to-image for editing").
EDIT_OPS_MIX = ("recolor", "remove", "move", "recolor", "add", "move", "remove", "recolor")


class ProgressThrottle:
    """Which lines of a fit's output to echo: not library warnings (they stay in the log), and of the
    progress bar's redraws (text mode turns tqdm's carriage returns into lines) one per ``every`` s."""

    BAR = re.compile(r"(\d+|\?)/(\d+|\?) \[[^\]]*(it/s|s/it)")

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self.last = -every
        self.finished_shown = False

    def show(self, line: str) -> bool:
        if line.startswith(("  warnings.warn", "/")) or not line.strip():
            return False
        bar = self.BAR.search(line)
        if bar:
            if "?" in bar.group(1, 2):  # sanity-check and set-up bars with no length: nothing to show
                return False
            now, finished = time.perf_counter(), bar.group(1) == bar.group(2)
            if finished:  # a finished bar shows once (tqdm redraws it a few times as it closes)
                if self.finished_shown:
                    return False
                self.finished_shown = True
            else:
                self.finished_shown = False
                if now - self.last < self.every:
                    return False
            self.last = now
        return True


def run_parallel(jobs: list[tuple[str, list[str], Path]], env: dict[str, str]) -> None:
    """Run independent commands at once, the CPU cores split between them (``OMP_NUM_THREADS``).

    Each job keeps its own log; its lines are echoed (with a ``[name]`` prefix when there are several),
    filtered by :class:`ProgressThrottle`. Any failure stops the demo once all have ended, naming the
    failed commands and their logs.
    """
    many = len(jobs) > 1
    # The cores this demo may use: all of them, or OMP_NUM_THREADS when a caller (a sweep) set it.
    cores = int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    threads = max(1, cores // len(jobs))
    lock = threading.Lock()
    procs: list[tuple[str, list[str], Path, subprocess.Popen[str]]] = []

    def pump(name: str, proc: subprocess.Popen[str], log: Path) -> None:
        assert proc.stdout is not None
        progress = ProgressThrottle()
        prefix = f"[{name}] " if many else ""
        with open(log, "w", encoding="utf-8") as f:
            for line in proc.stdout:
                f.write(line)
                if not progress.show(line):
                    continue
                with lock:
                    sys.stdout.write(prefix + line)
                    sys.stdout.flush()

    pumps = []
    for name, cmd, log in jobs:
        log.parent.mkdir(parents=True, exist_ok=True)
        job_env = dict(env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)) if many else env
        proc = subprocess.Popen(cmd, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append((name, cmd, log, proc))
        t = threading.Thread(target=pump, args=(name, proc, log), daemon=True)
        t.start()
        pumps.append(t)
    failed = []
    for (name, cmd, log, proc), t in zip(procs, pumps, strict=True):
        code = proc.wait()
        t.join()
        if code != 0:
            failed.append(f"{name} ({code}): {' '.join(cmd)}\nlog: {log}")
    if failed:
        raise SystemExit("command(s) failed:\n" + "\n".join(failed))


def evaluate_step(step: Step, out: Path, samples: int, seed: int, device: str = "cpu") -> dict[str, Any]:
    """ShapesEval of one step's checkpoint (in-process: the model is small)."""
    from wallaroo.evaluate import evaluate_shapes
    from wallaroo.generate import load_pipeline

    ckpt = out / step.name / "last.ckpt"
    eval_dir = out / step.name / "eval"
    if step.name == "vq":
        return evaluate_tokenizer(ckpt, eval_dir, samples, seed)
    pipe = load_pipeline(str(ckpt), device=device)
    return evaluate_shapes(pipe, eval_dir, samples, seed, tasks=list(step.tasks), log=print)


def evaluate_tokenizer(ckpt: Path, eval_dir: Path, samples: int, seed: int) -> dict[str, Any]:
    import torch

    from metrics.shapes_eval import tokenizer_ceiling
    from wallaroo.vq import VQ_PRESETS, build_vq
    from wallaroo.weights import load_vq_file

    vq = build_vq("shapes-ds8")
    vq.load_state_dict(load_vq_file(ckpt, VQ_PRESETS["shapes-ds8"]))
    vq.eval()

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        codes, _ = vq.encode(x)
        return vq.decode_codes(codes)

    with torch.no_grad():
        ceiling = tokenizer_ceiling(roundtrip, samples, seed)
    eval_dir.mkdir(parents=True, exist_ok=True)
    report = {"tokenizer_ceiling": ceiling, "seed": seed, "samples_per_task": samples}
    (eval_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"  tokenizer ceiling {ceiling:.3f}")
    return report


def results_table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'step':<10}{'teaches':<34}" + "".join(f"{k.replace('_accuracy', ''):>18}" for k in KEYS)
    rows = [head, "-" * len(head)]
    teaches = {s.name: s.teaches for s in STEPS}
    for name, report in results.items():
        cells = "".join(f"{report[k]:>18.3f}" if k in report else f"{'-':>18}" for k in KEYS)
        rows.append(f"{name:<10}{teaches.get(name, ''):<34}{cells}")
    return "\n".join(rows)


def results_chart(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars: one group per step, one bar per score (PIL only, no plotting library needed)."""
    colours = {"tokenizer_ceiling": (120, 120, 120), "t2i_accuracy": (40, 80, 220),
               "und_accuracy": (40, 160, 60), "edit_accuracy": (240, 130, 30)}  # fmt: skip
    names = list(results)
    w, h, margin, bar = 120 * max(1, len(names)) + 80, 360, 50, 22
    img = Image.new("RGB", (w, h + 110), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(13)
    draw.line([(margin, 20), (margin, h)], fill="black")
    draw.line([(margin, h), (w - 10, h)], fill="black")
    for tick in range(0, 11, 2):
        y = h - (h - 20) * tick / 10
        draw.line([(margin - 4, y), (margin, y)], fill="black")
        draw.text((6, y - 7), f"{tick / 10:.1f}", fill="black", font=font)
    for i, name in enumerate(names):
        x0 = margin + 15 + i * 120
        for j, key in enumerate(KEYS):
            if key in results[name]:
                v = max(0.0, min(1.0, float(results[name][key])))
                x = x0 + j * bar
                draw.rectangle([x, h - (h - 20) * v, x + bar - 4, h], fill=colours[key])
        draw.text((x0, h + 6), name, fill="black", font=font)
    for j, key in enumerate(KEYS):
        y = h + 40 + 16 * j
        draw.rectangle([margin, y, margin + 12, y + 12], fill=colours[key])
        draw.text((margin + 18, y - 1), key, fill="black", font=font)
    img.save(path)


def auto_precision(accelerator: str) -> str:
    """``bf16-mixed`` where bf16 matrix products are fast (a CUDA GPU with bf16; a CPU with AMX tiles, where a
    ShapesWorld t2i step ran 1.6x faster than in fp32), else ``32-true``."""
    import torch

    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return "bf16-mixed" if amx() else "32-true"


# Seconds kept back from the time limit for the last step's start-up, its last checkpoint, its ShapesEval and the
# interpreter's start before the demo's clock (on the 2-core CPU: ~12 s, ~2 s, ~15 s and ~5 s).
TIME_RESERVE_S = 50


def time_cap_args(limit_s: float, elapsed_s: float, reserve_s: float = TIME_RESERVE_S) -> list[str]:
    """``wallaroo.fit`` arguments that stop the last step's training in time for the demo to end within ``limit_s``
    seconds (0: no limit): Lightning's ``max_time`` (its clock starts with training), ``optim.time_horizon`` (the
    recipe's decaying schedule runs by the time spent when that runs ahead of its steps, so a stopped step has
    annealed), and no step checkpoints, so that ``last.ckpt`` is written where training stops
    (``ModelCheckpoint`` saves the last one at the end of training when it has saved none)."""
    if limit_s <= 0:
        return []
    left = max(1, int(limit_s - elapsed_s - reserve_s))
    days, rest = divmod(left, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    max_time = f"{days:02d}:{hours:02d}:{minutes:02d}:{seconds:02d}"
    return ["--trainer.max_time", max_time, "--model.init_args.optim.time_horizon", "true",
            "--checkpoint.every_n_train_steps", "0"]


def trained_steps(ckpt: Path) -> int | None:
    """The optimiser steps a Lightning checkpoint was saved at (``None`` when it does not say)."""
    import torch

    step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    return None if step is None else int(step)


def shards_current(manifest: Path, samples: int, seed: int, edit_ops: list[str]) -> bool:
    """Whether the shards of an earlier run (its ``manifest.json``) are the ones asked for: same samples per task,
    seed and editing op cycle. Otherwise the demo writes them again."""
    if not manifest.exists():
        return False
    have = json.loads(manifest.read_text())
    return (have.get("counts", {}).get("t2i"), have.get("seed"), have.get("edit_ops")) == (samples, seed, edit_ops)


def parse_budget(text: str) -> dict[str, int]:
    """``"stage2=800,stage4=300"`` -> ``{"stage2": 800, "stage4": 300}``; unknown steps fail by name."""
    out: dict[str, int] = {}
    names = [s.name for s in STEPS]
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, n = part.partition("=")
        if name not in names or not n.isdigit():
            raise ValueError(f"--budget {part!r}: expected STEP=N with STEP one of {names}")
        out[name] = int(n)
    return out


def parse_overrides(items: list[str]) -> list[tuple[str, str, str]]:
    """``["stage4:model.init_args.lr=1e-4"]`` -> ``[("stage4", "model.init_args.lr", "1e-4")]``; the step must be
    a demo step or ``stages`` (stages 1-4)."""
    names = [s.name for s in STEPS] + ["stages"]
    out = []
    for item in items:
        where, _, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if where not in names or not key or not eq:
            raise ValueError(f"--override {item!r}: expected STEP:KEY=VALUE with STEP one of {names}")
        out.append((where, key.lstrip("-"), value))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wallaroo.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/shapes", help="run directory (default runs/shapes)")
    parser.add_argument("--quick", action="store_true", help="a short first look (about two minutes)")
    parser.add_argument("--samples", type=int, default=None, help="training samples per task in the shards")
    parser.add_argument("--eval-samples", type=int, default=None, help="ShapesEval prompts per task")
    parser.add_argument("--seed", type=int, default=0, help="training data seed")
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--steps", default=",".join(s.name for s in STEPS), help="subset of steps to run")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"],
                        help="where the fits and evaluations run (auto: a GPU when CUDA is available)")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"],
                        help="training precision of the stages (auto, the default: bf16-mixed on a GPU with bf16 or "
                             "a CPU with AMX tiles, else 32-true); tokenizer and evaluations stay in fp32")
    parser.add_argument("--budget", default="", metavar="STEP=N,...",
                        help="training steps of named steps instead of the recipe budget (e.g. stage2=800,stage4=300)")
    parser.add_argument("--override", action="append", default=[], metavar="STEP:KEY=VALUE",
                        help="a wallaroo.fit override for one step, or for every stage with 'stages' "
                             "(e.g. stage4:model.init_args.overrides.pixel_mask_ratio=0.2); repeatable")
    parser.add_argument("--edit-ops", nargs="+", default=list(EDIT_OPS_MIX), choices=EDIT_OPS, metavar="OP",
                        help="the editing shards' op cycle; repeat an op for a larger share (default: "
                             f"{' '.join(EDIT_OPS_MIX)}; ShapesEval is balanced whatever this is)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="end the whole run within this many seconds: the last stage trains until its share "
                             "runs out (default 1200 for a full run, none with --quick; 0: no limit)")
    args = parser.parse_args(argv)
    budget, fit_overrides = parse_budget(args.budget), parse_overrides(args.override)
    accelerator = args.accelerator
    if accelerator == "auto":
        import torch

        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = args.precision if args.precision != "auto" else auto_precision(accelerator)

    out = Path(args.out).resolve()
    # 12000: a third of them (the 48x48 ones) feed stages 1-2, ~3 epochs of stage 2 (fewer overfit).
    samples = args.samples or (500 if args.quick else 12000)
    eval_samples = args.eval_samples or (24 if args.quick else 200)
    wanted = args.steps.split(",")
    env = dict(os.environ, WALLAROO_SHAPES=str(out), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()

    if not shards_current(out / "data" / "manifest.json", samples, args.seed, args.edit_ops):
        print(f"== writing ShapesWorld shards ({samples} per task) to {out / 'data'}")
        from datamodules.shapes import write_shapes_shards

        write_shapes_shards(str(out / "data"), samples, args.seed, edit_ops=args.edit_ops)

    time_limit = args.time_limit if args.time_limit is not None else (0 if args.quick else 1200)
    results: dict[str, dict[str, Any]] = {}
    last_wave = max(s.wave for s in STEPS if s.name in wanted)
    planned = {s.name: budget.get(s.name, s.quick_steps if args.quick else s.steps) for s in STEPS}
    device = "cuda" if accelerator == "gpu" else "cpu"
    for wave in sorted({s.wave for s in STEPS}):
        steps = [s for s in STEPS if s.wave == wave and s.name in wanted]
        jobs = []
        for step in steps:
            n = planned[step.name]
            print(f"\n== {step.name}: {step.teaches} ({n} steps, {time.perf_counter() - t0:.0f}s so far)")
            cmd = [sys.executable, "-m", "wallaroo.fit", "--stage", step.recipe, "--trainer.max_steps", str(n),
                   "--trainer.accelerator", accelerator]
            if step.name != "vq":
                cmd += ["--trainer.precision", precision]
            if args.quick and step.name != "vq":
                # A few steps: no previews, and no torch.compile (its first steps cost more than 5 steps save).
                cmd += ["--model.init_args.preview.every_n_steps", "0", "--model.init_args.parallel.compile", "false"]
            for where, key, value in fit_overrides:
                if where == step.name or (where == "stages" and step.name not in ("vq", "pretrain")):
                    cmd += [f"--{key}", value]
            if wave == last_wave:
                cmd += time_cap_args(time_limit, time.perf_counter() - t0)
            jobs.append((step.name, cmd, out / step.name / "fit.log"))
        if jobs:
            run_parallel(jobs, env)
        for step in steps:
            done = trained_steps(out / step.name / "last.ckpt")
            if wave == last_wave and time_limit > 0 and done is not None and done < planned[step.name]:
                print(f"== {step.name} trained {done} of its {planned[step.name]} steps: the time limit "
                      f"({time_limit:.0f} s, --time-limit) stopped it")
            print(f"== evaluating {step.name}")
            results[step.name] = evaluate_step(step, out, eval_samples, args.eval_seed, device)
            if done is not None:
                results[step.name]["trained_steps"] = done

    print("\n" + results_table(results))
    results_chart(results, out / "results.png")
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"\nfinished in {time.perf_counter() - t0:.0f}s")
    print(f"scores: {out / 'results.json'}; chart: {out / 'results.png'}; grids: {out}/<step>/eval/grid.png")
    print(f"TensorBoard logs: {out}/<step>/tb — open them with: tensorboard --logdir {out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The command line: ``main`` with one-line errors (``wallaroo.cli_errors``; ``--debug`` shows the
    traceback); returns the exit status."""
    from wallaroo.cli_errors import run_cli

    return run_cli(main, argv, prog="python -m wallaroo.demo")


if __name__ == "__main__":
    sys.exit(cli())
