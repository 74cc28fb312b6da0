"""Training-step speed with ``parallel.compile`` (the LLM ``torch.compile``-d) against the eager stage.

    python benchmarks/compile_step.py [--json] [--stage stage4] [--steps 40] [--warmup 10]

A ShapesWorld stage of the ``shapes`` preset with the batch sizes of its recipe (``stages/shapes/<stage>.yaml``)
on freshly written ShapesWorld shards, trained through Lightning exactly as
``wallaroo.fit`` trains it, at the demo's precision (bf16 autocast on a CPU with AMX, else fp32). Each variant
runs in a fresh process: ``--warmup`` steps (the compiled variant compiles in them), then ``--steps`` timed
steps. Printed: seconds per timed step of each, ``step_time_ratio`` (compiled / eager, below 1 is faster) and
the extra seconds the compiled variant's warm-up steps cost (``compile_overhead_s``; lower when TorchInductor's
on-disk cache is warm from an earlier run). Weights are random: the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = Path(__file__).resolve().parents[1] / "stages" / "shapes"
STAGES = ("stage2", "stage4")


def recipe_batches(stage_name: str) -> dict[str, int]:
    """``{task: batch_size}`` of the ShapesWorld recipe's data section."""
    import yaml

    data = yaml.safe_load((RECIPES / f"{stage_name}.yaml").read_text())["data"]["init_args"]
    return {t: int(data[t]["batch_size"]) for t in ("t2i", "und", "edit") if data.get(t)}


def run_variant(stage_name: str, compile_llm: bool, data: str, warmup: int, steps: int) -> dict[str, Any]:
    import lightning as L

    from datamodules import WallarooDataModule
    from stages import Stage2, Stage4
    from wallaroo.demo import auto_precision
    from wallaroo.parallel import ParallelConfig

    cls = {"stage2": Stage2, "stage4": Stage4}[stage_name]
    overrides = {"buckets": "shapes", "t2i_layout": "aspect", "code_position_scale": 0.35}
    stage = cls(preset="shapes", overrides=overrides, parallel=ParallelConfig(compile=compile_llm))
    tasks = recipe_batches(stage_name)
    dm = WallarooDataModule(
        **{t: {"shards": f"{data}/{t}", "batch_size": bs, "templates": 1} for t, bs in tasks.items()},
        num_workers=1,
    )
    marks: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            marks.append(time.perf_counter())

    start = time.perf_counter()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        precision=auto_precision("cpu"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
    )
    trainer.fit(stage, datamodule=dm)
    compiled = stage.model.compiled_llm is not None
    return {
        "compiled": compiled,
        "warmup_s": marks[warmup - 1] - start,
        "step_s": (marks[-1] - marks[warmup - 1]) / steps,
        "precision": auto_precision("cpu"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=STAGES, default="stage4")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=10, help="untimed first steps (compilation happens here)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--variant", choices=("eager", "compiled"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.warmup < 1 or a.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    if a.variant:  # a child process: one variant, one JSON line
        out = run_variant(a.stage, a.variant == "compiled", a.data, a.warmup, a.steps)
        print("RESULT " + json.dumps(out))
        return out

    from datamodules.shapes import write_shapes_shards

    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_shards(tmp, 2000, seed=0, tasks=tuple(recipe_batches(a.stage)))
        runs: dict[str, dict[str, Any]] = {}
        for variant in ("eager", "compiled"):
            cmd = [sys.executable, __file__, "--variant", variant, "--data", tmp, "--stage", a.stage,
                   "--steps", str(a.steps), "--warmup", str(a.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"the {variant} run failed:\n{proc.stderr[-3000:]}")
            runs[variant] = json.loads(lines[-1][len("RESULT "):])
    eager, comp = runs["eager"], runs["compiled"]
    result = {
        "stage": a.stage,
        "batches": recipe_batches(a.stage),
        "steps": a.steps,
        "precision": eager["precision"],
        "compiled": comp["compiled"],  # False where TorchInductor had no compiler (the stage warned)
        "eager_step_s": round(eager["step_s"], 4),
        "compiled_step_s": round(comp["step_s"], 4),
        "step_time_ratio": round(comp["step_s"] / eager["step_s"], 3),
        "compile_overhead_s": round(comp["warmup_s"] - eager["warmup_s"], 1),
    }
    if a.json:
        print(json.dumps(result))
    else:
        print(f"{a.stage} ({result['precision']}): eager {result['eager_step_s']:.3f} s/step, compiled "
              f"{result['compiled_step_s']:.3f} s/step, ratio {result['step_time_ratio']:.2f}; the compiled "
              f"run's first {a.warmup} steps took {result['compile_overhead_s']:.0f} s longer")
    return result


if __name__ == "__main__":
    main()
