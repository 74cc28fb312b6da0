"""Run several variants of the ShapesWorld demo side by side and tabulate their per-stage scores.

    python benchmarks/demo_sweep.py --variants benchmarks/sweeps/recipes.json --out runs/sweep [--parallel 4]

``--variants`` is a JSON object ``{name: [extra wallaroo.demo arguments]}``; each variant runs
``python -m wallaroo.demo --out OUT/name ARGS`` (``--budget`` and ``--override`` change one thing at a time).
Meant for a machine with many cores or a GPU: on the 2-core laptop one demo already uses both cores. The
table reads each step's ``eval/metrics.json`` as soon as it exists, so a sweep cut short still reports the steps
that finished; ``--json`` writes the same as one object to ``OUT/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("tokenizer_ceiling", "t2i_accuracy", "und_accuracy", "edit_accuracy")


def collect(out: Path, names: list[str]) -> dict[str, dict[str, dict]]:
    """``{variant: {step: metrics}}`` from whatever evaluations have been written so far."""
    from wallaroo.demo import STEPS

    found: dict[str, dict[str, dict]] = {}
    for name in names:
        steps = {}
        for step in STEPS:
            path = out / name / step.name / "eval" / "metrics.json"
            if path.exists():
                steps[step.name] = json.loads(path.read_text())
        found[name] = steps
    return found


def table(found: dict[str, dict[str, dict]], seconds: dict[str, float]) -> str:
    rows = [f"{'variant':<24}{'step':<10}" + "".join(f"{k.replace('_accuracy', ''):>19}" for k in KEYS)]
    for name, steps in found.items():
        for step, m in steps.items():
            cells = "".join(f"{m[k]:>19.3f}" if k in m else f"{'-':>19}" for k in KEYS)
            rows.append(f"{name:<24}{step:<10}{cells}")
        if name in seconds:
            rows.append(f"{name:<24}{'(time)':<10}{seconds[name]:>19.0f} s")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", required=True, help="JSON file {name: [demo args]}")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--parallel", type=int, default=4, help="variants running at once")
    ap.add_argument("--only", default="", help="comma-separated subset of variant names")
    a = ap.parse_args()
    variants: dict[str, list[str]] = json.loads(Path(a.variants).read_text())
    if a.only:
        variants = {k: v for k, v in variants.items() if k in a.only.split(",")}
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(1, min(a.parallel, len(variants))))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = list(variants.items())
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    seconds: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < a.parallel:
            name, args = pending.pop(0)
            (out / name).mkdir(parents=True, exist_ok=True)
            log = open(out / name / "demo.log", "w")
            cmd = [sys.executable, "-m", "wallaroo.demo", "--out", str(out / name), *args]
            print(f"start {name}: {' '.join(cmd[2:])}", flush=True)
            running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), time.time())
        time.sleep(2)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                seconds[name] = time.time() - t0
                print(f"done {name} (exit {proc.returncode}, {seconds[name]:.0f} s)", flush=True)
                del running[name]
                (out / "sweep.json").write_text(json.dumps(
                    {"seconds": seconds, "scores": collect(out, list(variants))}, indent=1))
    found = collect(out, list(variants))
    (out / "sweep.json").write_text(json.dumps({"seconds": seconds, "scores": found}, indent=1))
    print(table(found, seconds))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
