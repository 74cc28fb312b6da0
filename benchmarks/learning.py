"""Learning speed on ShapesWorld v2 text-to-image (48x48): our ``shapes`` model against a plain transformer.

    python benchmarks/learning.py [--json] [--max-steps 400] [--target 0.8]
    python benchmarks/learning.py --only ours --embed learned --langs en --templates 1 ...   # one trial

Both models see fresh 48x48 scenes with oracle codes: each 8x8 patch is mapped to its id among the 97 distinct
v2 patches (white, or one quadrant of one colour and shape), so the tokenizer is out of the question and only
the generator is measured. Every ``--eval-every`` steps both decode held-out prompts greedily and count exact
whole-scene matches; the benchmark prints the steps and seconds each needed to reach ``--target`` and their
ratio, measured in the same run.

- ours: ``WallarooModel`` of the ``shapes`` preset with the real sequence builder (ChatML, templates, both
  languages, CFG drop-out), collator, loss (structure-token text CE + image CE), AdamW (0.9, 0.95) at the
  ShapesWorld stage-2 LR, and the project's sampling engine for evaluation. The trial flags change one thing
  at a time (the bisection table in the README was measured with them).
- baseline: a plain pre-norm causal transformer of the same width and depth (4 x 256, 4 heads, GELU MLP,
  learned positions, PyTorch's default init), reading the caption's tokens and predicting the 36 codes.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import shapes_world as sw  # noqa: E402
from wallaroo.config import get_preset  # noqa: E402
from wallaroo.model import WallarooModel, image_head  # noqa: E402
from wallaroo.sampling import SamplingConfig, generate_images  # noqa: E402
from wallaroo.sequences import Bucket, BuiltSample, build_t2i, collate, t2i_prompt  # noqa: E402
from wallaroo.tokens import tokenizer_for  # noqa: E402

W = H = 48
BUCKET = Bucket(w=W, h=H)
N_CODES = 1 + len(sw.COLOUR_KEYS) * len(sw.SHAPE_KEYS) * 4
PATCH_IDS = {
    (c, s, q): 1 + (ci * len(sw.SHAPE_KEYS) + si) * 4 + q
    for ci, c in enumerate(sw.COLOUR_KEYS)
    for si, s in enumerate(sw.SHAPE_KEYS)
    for q in range(4)
}


def oracle_codes(scene: sw.Scene, w: int = W, h: int = H) -> Tensor:
    """Code grid ``[h/8, w/8]``: 0 for white, else the (colour, shape, quadrant) id of the patch."""
    g = torch.zeros(h // 8, w // 8, dtype=torch.long)
    for o in scene:
        top, left = sw.box_origin(o, w, h)
        for q, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            g[top // 8 + dy, left // 8 + dx] = PATCH_IDS[(o.colour, o.shape, q)]
    return g


# ---------------------------------------------------------------------------------------------- ours
class Ours:
    """The ``shapes`` WallarooModel on the project's t2i sequences; trial flags change one part at a time."""

    def __init__(self, a: argparse.Namespace) -> None:
        over = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in a.override)}
        self.cfg = get_preset("shapes", buckets="square48", t2i_layout="square", **over)
        self.tok, self.ids = tokenizer_for(self.cfg)
        self.model = model = WallarooModel(self.cfg)
        if a.init_from:  # a stage checkpoint (e.g. the understanding pre-training) instead of a random start
            from wallaroo.weights import load_any

            state = load_any(a.init_from, config=self.cfg).model_state
            state = {k: v for k, v in state.items() if not k.startswith(("pixel_", "edit_"))}
            fresh = {k for k in state if any(p in k for p in a.init_skip)}
            unmatched = [p for p in a.init_skip if not any(p in k for k in fresh)]
            if unmatched:
                raise SystemExit(f"--init-skip {unmatched}: no weight of {a.init_from} has that in its name")
            missing, unexpected = model.load_state_dict({k: state[k] for k in state.keys() - fresh}, strict=False)
            if set(missing) != fresh or unexpected:  # only the skipped weights may keep their fresh init
                raise SystemExit(f"{a.init_from}: missing {sorted(set(missing) - fresh)}, unexpected {unexpected}")
        self.a = a
        gen = torch.Generator().manual_seed(1)
        self.codebook = torch.randn(self.cfg.codebook_size, self.cfg.codebook_dim, generator=gen)
        # Oracle id -> the code the model sees; identity unless --vq gives a trained tokenizer's codes.
        self.to_code = torch.arange(self.cfg.codebook_size)
        if a.vq:
            self.codebook, self.to_code = trained_codes(a.vq, self.cfg.codebook_size)
        self.from_code = torch.full((self.cfg.codebook_size,), -1, dtype=torch.long)
        self.from_code[self.to_code[:N_CODES]] = torch.arange(N_CODES)
        if a.embed == "learned":  # a lookup table instead of gen_adapter over the 8-d codebook
            emb = nn.Embedding(self.cfg.codebook_size, model.hidden_size)
            nn.init.normal_(emb.weight, std=a.embed_std or 0.02)
            model.code_embedding_table = emb
            model.code_embeddings = lambda codes, codebook, task: emb(codes)  # type: ignore[method-assign]
        if a.head == "mlp":  # the paper's head, whatever the preset has
            model.gen_head = image_head(model.hidden_size, self.cfg.codebook_size, "mlp")
        elif a.head in ("linear", "linear-nobias"):
            linear = nn.Linear(model.hidden_size, self.cfg.codebook_size, bias=a.head == "linear")
            model.gen_head = nn.Sequential(nn.Identity(), nn.Identity(), linear)
        elif a.head == "mlp-bias":  # the paper's MLP head with a bias on its output layer
            model.gen_head[2] = nn.Linear(model.hidden_size, self.cfg.codebook_size)
        if a.init.startswith("torch"):  # PyTorch's default Linear init (and N(0, 1) embeddings for "torch")
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
                elif isinstance(m, nn.Embedding) and a.init == "torch":
                    nn.init.normal_(m.weight, std=1.0)
        if a.embed_std > 0:
            nn.init.normal_(model.language_model.embed_tokens.weight, std=a.embed_std)
        if a.no_system:  # trial: the ChatML turns without the system turn
            import wallaroo.sequences as seqs

            seqs._system = lambda w, ids: None
        self.langs = a.langs.split(",")
        self.prng = random.Random(a.seed)
        self.params = list(model.parameters())

    def _bare(self, text: str, codes: Tensor | None) -> BuiltSample:
        """Caption tokens + generate_start (+ codes + generate_end): no system turn, template or ChatML."""
        ids = self.ids
        pre = self.tok.encode(text, add_special_tokens=False) + [ids.generate_start]
        n = (H // 8) * (W // 8)
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        if codes is None:
            neg = [-100] * len(pre)
            return BuiltSample(t(pre), t(neg), t(neg), t([0] * len(pre)), task="t2i", grid=(H // 8, W // 8))
        seq = pre + [ids.generate_image_pad] * n + [ids.generate_end]
        labels = [-100] * (len(pre) + n) + [ids.generate_end]
        img = [-100] * len(pre) + codes.flatten().tolist() + [-100]
        return BuiltSample(t(seq), t(labels), t(img), t([0] * len(seq)), task="t2i", grid=(H // 8, W // 8))

    def loss(self, scenes: list[sw.Scene]) -> Tensor:
        samples = []
        for i, sc in enumerate(scenes):
            lang, drop = self.langs[i % len(self.langs)], self.prng.random() < self.a.cfg_drop
            text = "" if drop else sw.caption(sc, lang)
            if self.a.prompt == "bare":
                samples.append(self._bare(text, self.to_code[oracle_codes(sc)]))
            else:
                codes = self.to_code[oracle_codes(sc)]
                samples.append(build_t2i(self.tok, self.ids, sw.caption(sc, lang), BUCKET, codes, lang=lang,
                                         template_index=self.prng.randrange(self.a.templates), layout="square", ds=8,
                                         drop_prompt=drop))
        out = self.model(collate(samples, self.ids.pad), "t2i", self.codebook)
        return self.a.text_loss * out.text + out.image

    @torch.no_grad()
    def generate(self, prompts: list[tuple[sw.Scene, str]]) -> Tensor:
        self.model.eval()
        kw = dict(template_index=0, layout="square", ds=8)
        if self.a.prompt == "bare":
            cond = collate([self._bare(sw.caption(sc, lg), None) for sc, lg in prompts], self.ids.pad, "left")
        else:
            cond = collate([t2i_prompt(self.tok, self.ids, sw.caption(sc, lg), BUCKET, lang=lg, **kw)
                            for sc, lg in prompts], self.ids.pad, "left")
        greedy = SamplingConfig(cfg_scale=1.0, top_k=1)
        codes = generate_images(self.model, self.codebook, cond, None, (H // 8, W // 8), "t2i", greedy, eol=False)
        self.model.train()
        return self.from_code[codes]


def trained_codes(path: str, codebook_size: int) -> tuple[Tensor, Tensor]:
    """A trained ``shapes-ds8`` tokenizer's codebook and the code it gives each of the 97 oracle patches
    (read by encoding one object of every colour and shape); fails unless the 97 patches get 97 codes."""
    from wallaroo.vq import VQ_PRESETS, build_vq
    from wallaroo.weights import load_vq_file

    vq = build_vq("shapes-ds8")
    vq.load_state_dict(load_vq_file(path, VQ_PRESETS["shapes-ds8"]))
    vq.eval()
    to_code = torch.arange(codebook_size)
    with torch.no_grad():
        for c in sw.COLOUR_KEYS:
            for s in sw.SHAPE_KEYS:
                scene = [sw.ShapeObject(c, s, (0, 0), 0, 0)]
                img = torch.from_numpy(sw.render(scene, W, H).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
                codes, _ = vq.encode(img[None])
                to_code[0] = int(codes[0, -1, -1])  # a white patch
                for q, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                    to_code[PATCH_IDS[(c, s, q)]] = int(codes[0, dy, dx])
        codebook = vq.quantize.embedding.weight.detach().clone()
    if len(set(to_code[:N_CODES].tolist())) != N_CODES:
        raise SystemExit(f"{path}: the tokenizer gives the 97 ShapesWorld patches fewer than 97 codes")
    return codebook, to_code


# ------------------------------------------------------------------------------------------ baseline
class PlainCausalLM(nn.Module):
    """Pre-norm causal transformer: caption tokens, then code tokens; predicts the next code."""

    def __init__(self, vocab: int, width: int = 256, depth: int = 4, heads: int = 4, max_len: int = 128) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, width)
        self.codes = nn.Embedding(N_CODES, width)
        self.pos = nn.Embedding(max_len, width)
        layer = nn.TransformerEncoderLayer(width, heads, 3 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, N_CODES)
        self.heads = heads

    def forward(self, words: Tensor, real: Tensor, codes: Tensor) -> Tensor:
        """``words`` left-padded ``[B, L]`` ending in the image-start token, ``real`` its mask, ``codes``
        ``[B, n]`` inputs; returns logits ``[B, n + 1, N]`` for the codes after each of the last n+1 places."""
        x = torch.cat([self.words(words), self.codes(codes)], 1)
        keep = torch.cat([real, torch.ones_like(codes, dtype=torch.bool)], 1)
        pos = (keep.long().cumsum(1) - 1).clamp(min=0)
        t = x.shape[1]
        # One boolean mask (True = blocked): the future, and pad keys, except that every place sees itself, so
        # the rows of left pads are not fully masked (those give NaN in PyTorch's inference fast path, and
        # the NaN spread into the real rows: every greedy decode was wrong while the training loss fell).
        blocked = torch.ones(t, t, dtype=torch.bool).triu(1)[None] | ~keep[:, None, :]
        blocked &= ~torch.eye(t, dtype=torch.bool)[None]
        mask = blocked.repeat_interleave(self.heads, 0)
        h = self.blocks(x + self.pos(pos), mask=mask)
        return self.out(self.norm(h[:, words.shape[1] - 1:]))


class Baseline:
    def __init__(self, a: argparse.Namespace, tok, start_id: int) -> None:
        torch.manual_seed(a.seed)
        self.tok, self.start = tok, start_id
        self.model = PlainCausalLM(len(tok))
        self.langs = a.langs.split(",")
        self.params = list(self.model.parameters())

    def _words(self, prompts: list[tuple[sw.Scene, str]]) -> tuple[Tensor, Tensor]:
        rows = [self.tok.encode(sw.caption(sc, lg), add_special_tokens=False) + [self.start] for sc, lg in prompts]
        n = max(map(len, rows))
        words = torch.zeros(len(rows), n, dtype=torch.long)
        real = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            words[i, n - len(r):], real[i, n - len(r):] = torch.tensor(r), True
        return words, real

    def loss(self, scenes: list[sw.Scene]) -> Tensor:
        prompts = [(sc, self.langs[i % len(self.langs)]) for i, sc in enumerate(scenes)]
        target = torch.stack([oracle_codes(sc).flatten() for sc in scenes])
        words, real = self._words(prompts)
        logits = self.model(words, real, target[:, :-1])
        return F.cross_entropy(logits.reshape(-1, N_CODES), target.reshape(-1))

    @torch.no_grad()
    def generate(self, prompts: list[tuple[sw.Scene, str]]) -> Tensor:
        self.model.eval()
        words, real = self._words(prompts)
        codes = torch.zeros(len(prompts), 0, dtype=torch.long)
        for _ in range((H // 8) * (W // 8)):
            nxt = self.model(words, real, codes)[:, -1].argmax(-1)
            codes = torch.cat([codes, nxt[:, None]], 1)
        self.model.train()
        return codes.view(-1, H // 8, W // 8)


# ------------------------------------------------------------------------------------------- driver
def train(learner, a: argparse.Namespace, tag: str, log: Callable[[dict], None]) -> Iterator[dict]:
    """AdamW steps on fresh scenes; every ``eval_every`` steps one record with the exact-scene accuracy."""
    rng = np.random.default_rng(a.seed)
    erng = np.random.default_rng(12345)
    langs = a.langs.split(",")
    held_out = [(sw.random_scene(erng), langs[i % len(langs)]) for i in range(a.eval_n)]
    want = torch.stack([oracle_codes(sc) for sc, _ in held_out])
    opt = torch.optim.AdamW(learner.params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a.warmup)))
    t0, train_s, recent = time.perf_counter(), 0.0, []
    for step in range(1, a.max_steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = learner.loss([sw.random_scene(rng) for _ in range(a.bs)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(learner.params, 1.0)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t
        recent.append(float(loss.detach()))
        if step % a.eval_every == 0:
            got = torch.cat([learner.generate(held_out[i:i + 50]) for i in range(0, len(held_out), 50)])
            acc = float((got == want).flatten(1).all(1).float().mean())
            rec = {"model": tag, "step": step, "loss": round(float(np.mean(recent[-10:])), 4), "exact": acc,
                   "train_seconds": round(train_s, 1), "wall_seconds": round(time.perf_counter() - t0, 1)}
            log(rec)
            yield rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--only", choices=["ours", "baseline"], default=None, help="run one model (a trial)")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="train under bf16 autocast (the demo's precision on AMX CPUs)")
    ap.add_argument("--langs", default="en,zh")
    # trial flags (ours only); the defaults are the ShapesWorld recipe
    ap.add_argument("--embed", default="adapter", choices=["adapter", "learned"])
    ap.add_argument("--templates", type=int, default=1, help="templates drawn from (the ShapesWorld recipes: 1)")
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--text-loss", type=float, default=1.0)
    ap.add_argument("--prompt", default="chatml", choices=["chatml", "bare"])
    ap.add_argument("--no-system", action="store_true", help="trial: drop the ChatML system turn")
    ap.add_argument("--embed-std", type=float, default=0.0, help="re-init the token embedding with this std")
    ap.add_argument("--init", default="preset", choices=["preset", "torch", "torch-linear"])
    ap.add_argument("--head", default="preset", choices=["preset", "mlp", "mlp-bias", "linear", "linear-nobias"])
    ap.add_argument("--vq", default=None, help="ours sees this trained tokenizer's codes and codebook")
    ap.add_argument("--init-from", default=None, help="start ours from this checkpoint's weights")
    ap.add_argument("--init-skip", action="append", default=[],
                    help="with --init-from: keep the fresh init of weights whose name contains this")
    ap.add_argument("--override", action="append", default=[], help="model config override KEY=VALUE")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    def log(rec: dict) -> None:
        if not a.json:
            print(json.dumps(rec), flush=True)

    ours = Ours(a)
    learners = {"ours": ours, "baseline": Baseline(a, ours.tok, ours.ids.generate_start)}
    result: dict[str, dict] = {}
    for tag in [a.only] if a.only else ["ours", "baseline"]:
        curve = []
        for rec in train(learners[tag], a, tag, log):
            curve.append(rec)
            if rec["exact"] >= a.target:
                break
        hit = next((r for r in curve if r["exact"] >= a.target), None)
        result[tag] = {"steps_to_target": hit["step"] if hit else None,
                       "seconds_to_target": hit["train_seconds"] if hit else None,
                       "best_exact": max((r["exact"] for r in curve), default=0.0), "curve": curve}
    if not a.only:
        s_ours, s_base = result["ours"]["steps_to_target"], result["baseline"]["steps_to_target"]
        # Ours not reaching the target within max_steps counts as max_steps: the ratio is then a lower bound
        # (">="). Without a baseline step count there is no ratio.
        result["steps_ratio"] = (s_ours or a.max_steps) / s_base if s_base else None
        result["ratio_is_lower_bound"] = s_ours is None
    result["settings"] = {k: v for k, v in vars(a).items() if k != "json"}
    if a.json:
        print(json.dumps(result))
    else:
        for tag in ("ours", "baseline"):
            if tag in result:
                r = result[tag]
                print(f"{tag}: steps to {a.target}: {r['steps_to_target']} ({r['seconds_to_target']} s), "
                      f"best {r['best_exact']}")
        if result.get("steps_ratio") is not None:
            bound = ">= " if result["ratio_is_lower_bound"] else ""
            print(f"steps ratio ours / baseline: {bound}{result['steps_ratio']:.2f}")


if __name__ == "__main__":
    main()
