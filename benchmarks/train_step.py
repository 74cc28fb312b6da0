"""Training-step cost of the loss at the real vocabulary: heads at labelled positions vs full logits.

A stage-2 step (``t2i`` + ``und`` sub-batches; LLM, ``gen_adapter`` and ``gen_head`` trainable, AdamW) at
the 7B vocabulary (152,064 text ids) and codebook (16,384 codes) on a small backbone (hidden 256, 2 layers),
where the output layers dominate as they do at 7B (there the ``lm_head`` alone is 545M parameters):

- ``ours``: ``WallarooModel.forward``: ``lm_head`` only at text-labelled positions, the image head only at
  image-code positions;
- ``baseline``: the released code's loss: full-vocabulary text logits at every position and image logits at
  every position, then cross-entropy with ignored positions (written here, on the same hidden states).

Both variants use the same weights and batches (their losses agree, which is checked). Each runs in a fresh
subprocess (one warm-up step, then timed steps) so that its peak memory is its own:

- speed: tokens (non-pad) per second of process CPU time with one thread (robust on a shared machine), and
  per second of wall-clock time;
- memory (``getrusage`` deltas): the step's peak memory is the process's peak resident set size
  (``ru_maxrss``) minus its resident size after the warm-up step, when weights, gradients and AdamW states
  (the same in both variants: 1.3 GB here, sharded over the GPUs at 7B) are already allocated; what is
  left is the step's activations and transient tensors — ``peak_memory_ratio``. The whole process's peak
  (``process_peak_memory_ratio``) and the analytic number of logit elements each variant materialises
  (``logit_elements_ratio``) are reported too.

    python benchmarks/train_step.py [--json] [--steps 2] [--threads 1]

``--json`` prints one JSON object: ``tokens_per_s_ratio`` and ``peak_memory_ratio`` (ours / baseline) and the
details. About a minute and a half with the defaults (the baseline step takes ~20 s on one core).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 152_064
CODEBOOK = 16_384
# The 7B preset's vocabulary layout and tokenizer (the real Qwen one: the tiny tokenizer cannot span 152,064
# ids) with a small LLM and ViT.
PRESET = "qwen2.5-vl-7b"
OVERRIDES: dict[str, Any] = {
    "backbone.hidden_size": 256,
    "backbone.intermediate_size": 768,
    "backbone.num_hidden_layers": 2,
    "backbone.num_attention_heads": 4,
    "backbone.num_key_value_heads": 2,
    "backbone.mrope_section": [8, 12, 12],
    "backbone.vision_depth": 2,
    "backbone.vision_hidden_size": 64,
    "backbone.vision_intermediate_size": 128,
    "backbone.vision_num_heads": 2,
    "backbone.vision_fullatt_block_indexes": [0, 1],
    "attn_implementation": "sdpa",
}
T2I_BATCH = 4
UND_BATCH = 4
GRID = 16  # 16x16 codes: a 256x256 image at the 16x VQ
TRAINABLE = ("llm", "gen_adapter", "gen_head")

PROMPTS = [
    "a red bicycle leaning against a blue wall in the afternoon sun, with long shadows on the pavement",
    "two cats asleep on a wooden windowsill, rain on the glass behind them",
    "a bowl of ramen with a soft-boiled egg, spring onions and chili oil, seen from above",
    "一座被雪覆盖的小木屋，屋顶冒着炊烟，周围是高大的松树",
]
ANSWER = (
    "The photograph shows an astronaut in a white spacesuit standing in front of an American flag. "
    "The suit has a mission patch on the shoulder and a helmet is held under the left arm. The background "
    "is dark and the lighting comes from the front left, which suggests an official portrait."
)


def rss_now_mb() -> float:
    """Current resident set size (``/proc/self/statm``), MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def build(seed: int = 0) -> tuple[Any, torch.Tensor, dict[str, dict[str, torch.Tensor]]]:
    """The model (stage-2 trainable parts), a random L2-normalised codebook and one t2i + und batch."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from wallaroo.config import get_preset
    from wallaroo.freezing import set_trainable
    from wallaroo.images import VitImageProcessor
    from wallaroo.model import WallarooModel
    from wallaroo.sequences import Bucket, build_t2i, build_und, collate
    from wallaroo.tokens import tokenizer_for

    torch.manual_seed(seed)
    cfg = get_preset(PRESET, **OVERRIDES)
    assert cfg.backbone.vocab_size == VOCAB and cfg.codebook_size == CODEBOOK
    model = WallarooModel(cfg)
    set_trainable(model, TRAINABLE)
    model.train()
    codebook = F.normalize(torch.randn(CODEBOOK, cfg.codebook_dim), dim=-1)
    tok, ids = tokenizer_for(cfg)
    g = torch.Generator().manual_seed(seed)
    bucket = Bucket(GRID * 16, GRID * 16)
    t2i = [
        build_t2i(
            tok,
            ids,
            PROMPTS[i % len(PROMPTS)],
            bucket,
            torch.randint(0, CODEBOOK, (GRID, GRID), generator=g),
            lang="zh" if i % len(PROMPTS) == 3 else "en",
            template_index=0,
            layout="square",
            ds=16,
        )  # fmt: skip
        for i in range(T2I_BATCH)
    ]
    proc = VitImageProcessor.for_config(cfg)
    image = Image.fromarray(np.asarray(data.astronaut())).resize((224, 224))
    pixel_values, grid = proc([image])
    n_vit = int(grid.prod()) // proc.merge_size**2
    und = []
    for i in range(UND_BATCH):
        conversation = [
            {"role": "user", "content": "<image>\nDescribe the image in detail."},
            {"role": "assistant", "content": ANSWER[: len(ANSWER) - 40 * i]},
        ]
        sample = build_und(tok, ids, conversation, [n_vit])
        sample.pixel_values, sample.image_grid_thw = pixel_values, grid
        und.append(sample)
    return model, codebook, {"t2i": collate(t2i, ids.pad), "und": collate(und, ids.pad)}


def baseline_loss(model: Any, batch: dict[str, torch.Tensor], task: str, codebook: torch.Tensor) -> torch.Tensor:
    """The released code's loss: logits over the whole vocabulary at every position (and image logits at
    every position for generation tasks), cross-entropy over the labelled ones."""
    prepared = model.prepare_inputs(batch, codebook, task)
    hidden = model.decode(prepared)[:, :-1]
    logits = model.lm_head(hidden).float()
    text = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    if task == "und":
        return text
    image_logits = model.head(task)(hidden).float()
    image = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), batch["image_labels"][:, 1:].reshape(-1))
    return text + image


def logit_elements(batches: dict[str, dict[str, torch.Tensor]], variant: str) -> int:
    """Logit tensor elements one step materialises (forward; backward holds a gradient of the same size)."""
    n = 0
    for task, b in batches.items():
        positions = b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1)
        if variant == "baseline":
            n += positions * (VOCAB + (CODEBOOK if task != "und" else 0))
        else:
            n += int((b["labels"][:, 1:] != -100).sum()) * VOCAB
            if task != "und":
                n += int((b["image_labels"][:, 1:] != -100).sum()) * CODEBOOK
    return n


def run_variant(variant: str, steps: int, threads: int) -> dict[str, Any]:
    """One process's measurement (see the module docstring)."""
    torch.set_num_threads(threads)
    model, codebook, batches = build()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches.values())

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for task, b in batches.items():
            if variant == "ours":
                loss = model(b, task, codebook).loss
            else:
                loss = baseline_loss(model, b, task, codebook)
            total = total + loss
        total.backward()
        opt.step()
        return float(total.detach())

    first_loss = step()  # warm-up: allocates gradients and AdamW states
    rest = rss_now_mb()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    cpu, wall = (time.process_time() - cpu0) / steps, (time.perf_counter() - wall0) / steps
    return {
        "variant": variant,
        "tokens_per_step": tokens,
        "step_cpu_s": cpu,
        "step_wall_s": wall,
        "tokens_per_s_cpu": tokens / cpu,
        "tokens_per_s_wall": tokens / wall,
        "peak_rss_mb": peak_rss_mb(),
        "rest_rss_mb": rest,
        "step_memory_mb": peak_rss_mb() - rest,
        "first_loss": first_loss,
        "logit_elements": logit_elements(batches, variant),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
    }


def measure(variant: str, steps: int, threads: int) -> dict[str, Any]:
    """``run_variant`` in a fresh interpreter, so that peak memory is per variant."""
    cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.threads)))
        return {}
    ours = measure("ours", args.steps, args.threads)
    base = measure("baseline", args.steps, args.threads)
    if abs(ours["first_loss"] - base["first_loss"]) > 1e-4 * abs(base["first_loss"]):
        raise RuntimeError(f"the variants' losses differ: {ours['first_loss']} vs {base['first_loss']}")
    result = {
        "tokens_per_s_ratio": ours["tokens_per_s_cpu"] / base["tokens_per_s_cpu"],
        "tokens_per_s_ratio_wall": ours["tokens_per_s_wall"] / base["tokens_per_s_wall"],
        "peak_memory_ratio": ours["step_memory_mb"] / base["step_memory_mb"],
        "process_peak_memory_ratio": ours["peak_rss_mb"] / base["peak_rss_mb"],
        "logit_elements_ratio": ours["logit_elements"] / base["logit_elements"],
        "loss_abs_diff": abs(ours["first_loss"] - base["first_loss"]),
        "vocab_size": VOCAB,
        "codebook_size": CODEBOOK,
        "threads": args.threads,
        "steps": args.steps,
        "ours": ours,
        "baseline": base,
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(f"stage-2 step (t2i x{T2I_BATCH} + und x{UND_BATCH}, {ours['tokens_per_step']} tokens), vocab {VOCAB:,}, "
          f"codebook {CODEBOOK:,}, {ours['parameters'] / 1e6:.1f}M parameters ({ours['trainable'] / 1e6:.1f}M "
          f"trainable), {args.threads} thread(s)")  # fmt: skip
    print(f"{'':10} {'tok/s cpu':>10} {'tok/s wall':>10} {'peak MB':>9} {'step MB':>8} {'logits':>12} {'loss':>9}")
    for r in (ours, base):
        print(f"{r['variant']:10} {r['tokens_per_s_cpu']:10.0f} {r['tokens_per_s_wall']:10.0f} {r['peak_rss_mb']:9.0f} "
              f"{r['step_memory_mb']:8.0f} {r['logit_elements']:12,} {r['first_loss']:9.4f}")  # fmt: skip
    print(f"tokens/s ratio (ours/baseline): {result['tokens_per_s_ratio']:.2f}x CPU time, "
          f"{result['tokens_per_s_ratio_wall']:.2f}x wall")  # fmt: skip
    print(f"peak memory ratio (ours/baseline): {result['peak_memory_ratio']:.2f} (the step's own), "
          f"{result['process_peak_memory_ratio']:.2f} (whole process)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
