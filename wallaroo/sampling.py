"""The decoding engine: KV-cached, batched classifier-free-guided image decoding and text generation.

Everything that samples from a ``WallarooModel`` (the ``generate`` CLI, training previews, evaluation) goes
through this file. Two decoders share one loop per modality:

- the cached decoder (the default): one prefill over the prompts, then one decode step per token with a
  ``DynamicCache`` or a pre-allocated ``StaticCache`` (``SamplingConfig.static_cache``, optionally with a
  ``torch.compile``-d step);
- the full-recompute decoder (``full_recompute=True``): appends each new token to the prompt batch and
  re-runs the whole sequence, ViT included, at every step (text: the stock Qwen2.5-VL forward, as the
  released code's ``mmu_generate`` does; images: the training forward ``prepare_inputs`` + ``decode``).
  It shares no position or mask logic with the cached decoder, which makes it the reference the cached
  path is tested against and the baseline of ``benchmarks/generate.py``.

Prompt contract (``cond``, ``uncond``, ``batch``): collated prompt batches with the model's batch keys
(``input_ids``, ``attention_mask``, ``mm_token_type_ids``, optional ``pixel_values``/``image_grid_thw``/
``pixel_latents``), LEFT-padded (pads have ``attention_mask`` 0; the last column is real in every row).
An image prompt ends right after ``<|generate_start|>`` and has no ``<|generate_image_pad|>`` tokens.

Positions: prompt tokens get the M-RoPE ids of ``get_rope_index`` (3-D for ViT tokens); every generated
token (codes, forced end-of-line tokens, text) is 1-D and continues per row from that row's largest
prompt position + 1, so rows with ViT tokens (rope deltas) and left pads (which take no positions) are
both handled. The padding mask is applied at EVERY decode step (the released code drops it after the
prefill, so its CFG null branch attends to its own left pads: reference case d2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from wallaroo.model import WallarooModel

ImageTask = Literal["t2i", "edit"]
LogitsHook = Callable[[int, Tensor], None]

# Keys with one row per sample ([B, L]) and the value their left padding takes.
ROW_KEYS_PAD: dict[str, int | None] = {
    "input_ids": None,  # the model's pad id, passed in
    "attention_mask": 0,
    "mm_token_type_ids": 0,
    "labels": -100,
    "image_labels": -100,
}
# Keys concatenated over the whole batch in row order (images / latents of row 0 first).
FLAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_latents")


@dataclass
class SamplingConfig:
    """How to pick each token.

    ``cfg_scale``: classifier-free guidance scale s in ``uncond + s * (cond - uncond)`` (1 = off; images
    only). ``top_k``: keep the k largest logits (0/None = off). ``top_p``: nucleus mass (1.0 = off).
    ``temperature``: logits are divided by it; 0 means greedy (as does ``top_k == 1``); greedy takes the
    lowest index on exact ties. ``seed``: seeds a private ``torch.Generator`` so equal seeds give equal
    samples whatever the global RNG state (``None``: the global RNG). ``static_cache``: pre-allocate a
    ``StaticCache`` for prompt + all new tokens instead of a growing ``DynamicCache``. ``compile``:
    ``torch.compile`` the decode step (meant for GPUs; it implies ``static_cache``, since a growing cache
    would recompile the step at every token).
    """

    cfg_scale: float = 3.0
    top_k: int | None = 1000
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int | None = None
    static_cache: bool = False
    compile: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A fresh generator seeded from ``seed`` (``None`` when unseeded: use the global RNG)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))


# ------------------------------------------------------------------------------------------- sampling
def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """Top-k, then nucleus filtering of ``[N, V]`` logits: removed entries become ``-inf``.

    Top-k keeps every entry >= the k-th largest value (ties at the boundary survive). Top-p keeps the
    smallest set of highest-probability entries whose mass reaches ``top_p`` (always at least one).
    """
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Remove an entry when the mass BEFORE it already reaches top_p, so the first one always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``[N, V]`` logits (LongTensor ``[N]``).

    Greedy (``temperature == 0`` or ``top_k == 1``) is ``argmax``, which returns the first (lowest) index
    on exact ties, so it is deterministic (the released code draws among tied entries at random).
    """
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def guide(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (the released code's order of ops)."""
    return uncond + scale * (cond - uncond)


# ------------------------------------------------------------------------------------------- batches
def _check_left_padded(batch: dict[str, Tensor], what: str) -> None:
    mask = batch["attention_mask"]
    if mask.shape[1] and not bool(mask[:, -1].bool().all()):
        raise ValueError(f"{what} must be LEFT-padded: its last column has padding (attention_mask 0)")
    if "mm_token_type_ids" not in batch:
        raise ValueError(f"{what} lacks mm_token_type_ids: the ViT tokens would get 1-D positions")


def left_pad_batches(batches: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Stack left-padded prompt batches into one batch, rows in the given order, left-padded to the
    longest length.

    Row keys (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels``, ``image_labels``) are
    padded on the left (``pad_id`` / 0 / 0 / -100 / -100) and concatenated; flat keys (``pixel_values``,
    ``image_grid_thw``, ``pixel_latents``) are concatenated in batch order, which keeps them in row order.
    A row key present in one batch but not another is filled with its pad value (and ``mm_token_type_ids``
    defaults to zeros); a flat key is simply concatenated over the batches that have it.
    """
    if not batches:
        raise ValueError("no batches to pad")
    length = max(b["input_ids"].shape[1] for b in batches)
    out: dict[str, Tensor] = {}
    row_keys = [k for k in ROW_KEYS_PAD if any(k in b for b in batches)]
    for key in row_keys:
        fill = pad_id if key == "input_ids" else ROW_KEYS_PAD[key]
        parts = []
        for b in batches:
            ref = b["input_ids"]
            t = b.get(key)
            if t is None:
                if key == "attention_mask":
                    raise ValueError("every batch needs an attention_mask")
                t = torch.full_like(ref, fill)
            extra = length - t.shape[1]
            if extra:
                t = torch.cat([t.new_full((t.shape[0], extra), fill), t], dim=1)
            parts.append(t)
        out[key] = torch.cat(parts, dim=0)
    for key in FLAT_KEYS:
        parts = [b[key] for b in batches if b.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts, dim=0)
    return out


def repeat_batch(batch: dict[str, Tensor], n: int, image_pad_id: int, merge: int = 2) -> dict[str, Tensor]:
    """Each row repeated ``n`` times in place (row i becomes rows i*n .. i*n+n-1), with its images and
    pixel latents: the way to sample several images per prompt.

    ``merge`` is the ViT's spatial merge size (2 for Qwen2.5-VL): an image of grid ``(t, h, w)`` has
    ``t*h*w`` rows in ``pixel_values`` and ``t*h*w / merge**2`` LLM tokens.
    """
    if n == 1:
        return batch
    out = {k: v.repeat_interleave(n, dim=0) for k, v in batch.items() if k in ROW_KEYS_PAD}
    vit = batch["mm_token_type_ids"] == 1
    if batch.get("image_grid_thw") is not None and vit.any():
        grids = batch["image_grid_thw"]
        patches = grids.prod(-1)
        tokens = (patches // merge**2).tolist()
        # Assign images to rows in order: row i owns the next images whose token counts sum to its count.
        per_row, img = [], 0
        for count in vit.sum(1).tolist():
            first = img
            while count > 0:
                count -= tokens[img]
                img += 1
            per_row.append((first, img))
        starts = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()
        pv, thw = [], []
        for first, last in per_row:
            for _ in range(n):
                pv.append(batch["pixel_values"][starts[first] : starts[last]])
                thw.append(grids[first:last])
        out["pixel_values"] = torch.cat(pv)
        out["image_grid_thw"] = torch.cat(thw)
    if batch.get("pixel_latents") is not None:
        counts = ((batch["input_ids"] == image_pad_id) & ~vit).sum(1).tolist()
        blocks = torch.split(batch["pixel_latents"], counts)
        out["pixel_latents"] = torch.cat([blk for blk in blocks for _ in range(n)])
    return out


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration, restoring the training flag after (training previews
    call the engine in the middle of a fit)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------- decoders
class CachedDecoder:
    """One prefill, then one cached decode step per token (queries of length 1).

    Padding: a ``[N, max_len]`` buffer of valid keys is filled once from the prompt mask and gains one True
    column per step, and every step attends through it (pads stay masked for the whole decode). With SDPA
    the 4-D boolean masks are built here and handed to the backbone as-is (``transformers`` passes a 4-D
    mask through), so no per-step mask construction runs inside the library; left-pad query rows of the
    prefill attend to themselves only, so no row is fully masked (a fully masked SDPA row is NaN on some
    backends, and a NaN value leaks through a zero attention weight). Other attention implementations
    (eager, flash-attention 2, ...) get their own mask format from the library's ``create_causal_mask`` on
    the same 2-D buffer. With a ``StaticCache`` the masks span the whole pre-allocated length, with the
    not-yet-written slots masked.
    """

    def __init__(
        self,
        model: WallarooModel,
        batch: dict[str, Tensor],
        codebook: Tensor | None,
        task: Literal["t2i", "edit", "und"],
        max_new_tokens: int,
        static_cache: bool = False,
        compile: bool = False,
    ) -> None:
        from transformers import DynamicCache, StaticCache

        self.model, self.codebook, self.task = model, codebook, task
        self.prepared = model.prepare_inputs(batch, codebook, task, pixel_mask_ratio=0.0)
        mask = self.prepared.attention_mask.bool()
        n, length = mask.shape
        self.prompt_len = length
        self.max_len = length + max_new_tokens
        # A compiled step needs fixed shapes: with a growing cache it would recompile at every step.
        self.static = static_cache or compile
        device = mask.device
        self.valid = torch.zeros(n, self.max_len, dtype=torch.bool, device=device)
        self.valid[:, :length] = mask
        # 1-D positions of the generated tokens: per row, its largest prompt position + 1, + step.
        pos = self.prepared.position_ids.masked_fill(~mask[None], -1)
        start = pos.amax(dim=(0, 2)) + 1
        steps = torch.arange(max_new_tokens, device=device)
        self.positions = (start[:, None] + steps[None, :])[None].expand(3, -1, -1)  # [3, N, S], t = h = w
        lm = model.language_model
        if self.static:
            self.cache = StaticCache(config=lm.config, max_cache_len=self.max_len)
        else:
            self.cache = DynamicCache(config=lm.config)
        self.dtype = self.prepared.inputs_embeds.dtype
        # The rotary tables of every decode step at once: [N, S, head_dim] each, one slice per step.
        self.cos, self.sin = lm.rotary_emb(self.prepared.inputs_embeds, self.positions)
        self.layers = list(lm.layers)
        self.lm_config = lm.config
        self.sdpa_masks = lm.config._attn_implementation == "sdpa"
        self.norm = lm.norm
        self.step_index = 0
        self._step_fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = self._decode_step
        if compile:
            self._step_fn = torch.compile(self._decode_step, dynamic=False)

    def _decode_step(self, embeds: Tensor, mask: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The backbone's own decoder layers and final norm for one query per row. Calling the layers
        directly skips the text model's per-call wrappers, mask preparation and rotary recomputation,
        which dominate the cost of one step at small widths."""
        hidden = embeds
        for layer in self.layers:
            hidden = layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), cache=self.cache, use_cache=True
            )
        return self.norm(hidden)[:, -1]

    def start(self) -> Tensor:
        """Prefill; returns the last prompt position's final hidden state ``[N, H]``."""
        n, length = self.valid.shape[0], self.prompt_len
        device = self.valid.device
        if self.sdpa_masks:
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            keys = self.valid[:, None, None, :length]
            eye = torch.eye(length, dtype=torch.bool, device=device)
            mask = (causal & keys) | eye  # [N, 1, L, L]
            if self.static:
                mask = torch.cat([mask, mask.new_zeros(n, 1, length, self.max_len - length)], dim=-1)
        else:
            mask = self.valid[:, : self.max_len if self.static else length]
        # The prefill is one full forward of the text model (never compiled: one call, variable length).
        out = self.model.language_model(
            inputs_embeds=self.prepared.inputs_embeds,
            attention_mask=mask,
            position_ids=self.prepared.position_ids,
            cache=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state[:, -1]

    def feed(self, embeds: Tensor) -> Tensor:
        """Append one input embedding per row (``[N, H]``); returns the new final hidden state ``[N, H]``."""
        k = self.step_index
        if k >= self.max_len - self.prompt_len:
            raise RuntimeError("decode step beyond the budget this decoder was sized for")
        col = self.prompt_len + k
        self.valid[:, col] = True
        width = self.max_len if self.static else col + 1
        embeds = embeds[:, None].to(self.dtype)
        if self.sdpa_masks:
            mask = self.valid[:, None, None, :width]
        else:
            from transformers.masking_utils import create_causal_mask

            mask = create_causal_mask(
                config=self.lm_config,
                inputs_embeds=embeds,
                attention_mask=self.valid[:, :width],
                cache=self.cache,
            )
        self.step_index += 1
        cos, sin = self.cos[:, k : k + 1], self.sin[:, k : k + 1]
        return self._step_fn(embeds, mask, cos, sin)

    def feed_codes(self, codes: Tensor, place: tuple[int, int] | None = None) -> Tensor:
        """Feed one code per row; ``place``: the grid place of the next code (``code_position_scale``)."""
        return self.feed(self._placed(self.model.code_embeddings(codes, self.codebook, self.task), place))  # type: ignore[arg-type]

    def feed_tokens(self, ids: Tensor, place: tuple[int, int] | None = None) -> Tensor:
        return self.feed(self._placed(self.model.embed_tokens(ids), place))

    def _placed(self, embeds: Tensor, place: tuple[int, int] | None) -> Tensor:
        if place is None or not self.model.cfg.code_position_scale:
            return embeds
        where = torch.tensor(place, device=embeds.device)
        return embeds + self.model.place_features(where).to(embeds.dtype)


class RecomputeDecoder:
    """No cache: every step appends the new token to the batch and re-runs the whole sequence.

    Understanding (``task="und"``) runs the stock ``Qwen2_5_VLForConditionalGeneration`` forward (ViT, its
    own ``get_rope_index``, the decoder, ``lm_head`` logits at every position, and the config's default
    ``use_cache``), which is exactly the call the released ``mmu_generate`` makes per token. Image tasks
    need the adapters, so they run the training forward (``prepare_inputs`` + ``decode``); a generated code
    is appended as ``<|generate_image_pad|>`` with the code in ``image_labels``."""

    def __init__(
        self,
        model: WallarooModel,
        batch: dict[str, Tensor],
        codebook: Tensor | None,
        task: Literal["t2i", "edit", "und"],
        cols: int | None = None,
    ) -> None:
        self.model, self.codebook, self.task, self.cols = model, codebook, task, cols
        self.batch = {k: v for k, v in batch.items() if k not in ("labels",)}
        ids = self.batch["input_ids"]
        if "image_labels" not in self.batch:
            self.batch["image_labels"] = torch.full_like(ids, -100)

    def _run(self) -> Tensor:
        if self.task == "und":
            b = self.batch
            out = self.model.backbone(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                mm_token_type_ids=b["mm_token_type_ids"],
                pixel_values=b.get("pixel_values"),
                image_grid_thw=b.get("image_grid_thw"),
                output_hidden_states=True,
            )
            return out.hidden_states[-1][:, -1]  # the final-norm output (5.x records it last)
        prepared = self.model.prepare_inputs(self.batch, self.codebook, self.task, pixel_mask_ratio=0.0, cols=self.cols)
        return self.model.decode(prepared)[:, -1]

    def start(self) -> Tensor:
        return self._run()

    def _append(self, ids: Tensor, image_label: Tensor) -> Tensor:
        b = self.batch
        ones = torch.ones_like(ids)[:, None]
        b["input_ids"] = torch.cat([b["input_ids"], ids[:, None]], dim=1)
        b["attention_mask"] = torch.cat([b["attention_mask"], ones.to(b["attention_mask"].dtype)], dim=1)
        b["mm_token_type_ids"] = torch.cat([b["mm_token_type_ids"], torch.zeros_like(ones)], dim=1)
        b["image_labels"] = torch.cat([b["image_labels"], image_label[:, None]], dim=1)
        return self._run()

    def feed_codes(self, codes: Tensor, place: tuple[int, int] | None = None) -> Tensor:
        # Places are recomputed from the whole sequence (WallarooModel.code_places), so ``place`` is not needed.
        return self._append(torch.full_like(codes, self.model.gen_pad_id), codes)

    def feed_tokens(self, ids: Tensor, place: tuple[int, int] | None = None) -> Tensor:
        return self._append(ids, torch.full_like(ids, -100))


# ------------------------------------------------------------------------------------------- images
def _resolve_grid(grid: tuple[int, int] | list[tuple[int, int]], batch_size: int) -> tuple[int, int]:
    if isinstance(grid, list):
        if len(grid) != batch_size:
            raise ValueError(f"{len(grid)} grids for {batch_size} prompts")
        if len({tuple(g) for g in grid}) != 1:
            raise ValueError(
                f"one (rows, cols) grid per batch is supported; got {sorted(set(map(tuple, grid)))}"
            )
        grid = grid[0]
    rows, cols = (int(x) for x in grid)
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be positive (rows, cols); got {grid}")
    return rows, cols


def generate_images(
    model: WallarooModel,
    codebook: Tensor,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor] | None,
    grid: tuple[int, int] | list[tuple[int, int]],
    task: ImageTask = "t2i",
    sampling: SamplingConfig | None = None,
    *,
    num_images: int = 1,
    full_recompute: bool = False,
    on_logits: LogitsHook | None = None,
    eol: bool = True,
) -> Tensor:
    """Sample a ``rows x cols`` grid of VQ codes per prompt; returns LongTensor ``[B * num_images, R, C]``
    in raster order (row-major), images of prompt i at ``i*num_images .. i*num_images + num_images - 1``.

    ``cond``: the B conditional prompts; ``uncond``: B unconditional prompts in the same order (``None``
    or ``cfg_scale == 1`` disables guidance, and only the cond rows run). Both follow the module's prompt
    contract; they may have different lengths (they are left-padded to a common one here) and run as one
    batch of 2B rows, cond rows first. For T2I the uncond prompt is the same template with an empty
    prompt; for ``task="edit"`` the caller builds cond with the source image's pixel block
    (``pixel_latents``, unmasked) and ViT block, and uncond with an empty instruction and an all-black
    source image of the same size in both streams (the training-time CFG dropout of editing).

    Every code is fed back to both branches through the task's adapter. After each row but the last an
    ``<|end_of_line>|`` embedding is forced as its own step (never sampled); its output predicts the
    first code of the next row. ``eol=False`` is the square layout of stages 1-2 (token_layout §3), whose
    training sequences have no end-of-line tokens: rows follow each other directly, as they were trained.
    ``on_logits(code_index, logits[B', K])`` sees the guided logits before
    filtering (tests and debugging). ``full_recompute`` uses ``RecomputeDecoder`` (slow reference).
    """
    sampling = sampling or SamplingConfig()
    cfg = model.cfg
    _check_left_padded(cond, "cond")
    rows, cols = _resolve_grid(grid, cond["input_ids"].shape[0])
    if num_images > 1:
        merge = model.backbone.config.vision_config.spatial_merge_size
        cond = repeat_batch(cond, num_images, model.image_pad_id, merge)
        if uncond is not None:
            uncond = repeat_batch(uncond, num_images, model.image_pad_id, merge)
    b = cond["input_ids"].shape[0]
    guided = uncond is not None and sampling.cfg_scale != 1.0
    if guided:
        assert uncond is not None
        _check_left_padded(uncond, "uncond")
        if uncond["input_ids"].shape[0] != b:
            raise ValueError(f"uncond has {uncond['input_ids'].shape[0]} rows, cond {b}")
        batch = left_pad_batches([cond, uncond], cfg.special_id("pad"))
    else:
        batch = cond
    if (batch["input_ids"] == model.gen_pad_id).any():
        raise ValueError("image prompts must end at <|generate_start|> (found <|generate_image_pad|>)")
    n_rows = 2 * b if guided else b
    device = batch["input_ids"].device
    head = model.head(task)
    eol_ids = torch.full((n_rows,), cfg.special_id("eol"), dtype=torch.long, device=device)
    codes = torch.empty(b, rows, cols, dtype=torch.long, device=device)
    generator = sampling.generator(device)

    with _inference(model):
        decoder: CachedDecoder | RecomputeDecoder
        if full_recompute:
            decoder = RecomputeDecoder(model, batch, codebook, task, cols)
        else:
            # Inputs after the prefill: every code but the last, plus R - 1 end-of-line tokens.
            budget = rows * cols - 1 + (rows - 1 if eol else 0)
            decoder = CachedDecoder(
                model, batch, codebook, task, max(budget, 1), sampling.static_cache, sampling.compile
            )
        eol_embed = None
        hidden = decoder.start()
        for r in range(rows):
            for c in range(cols):
                logits = head(hidden).float()
                if guided:
                    logits = guide(logits[:b], logits[b:], sampling.cfg_scale)
                if on_logits is not None:
                    on_logits(r * cols + c, logits)
                code = sample(logits, sampling, generator)
                codes[:, r, c] = code
                if r == rows - 1 and c == cols - 1:
                    break
                # The place of the code this input predicts (None: the next token is an EOL).
                nxt = (r, c + 1) if c + 1 < cols else (None if eol else (r + 1, 0))
                hidden = decoder.feed_codes(torch.cat([code, code]) if guided else code, nxt)
            if eol and r < rows - 1:
                if isinstance(decoder, CachedDecoder) and not cfg.code_position_scale:
                    # The forced end-of-line embedding is the same at every row: compute it once.
                    if eol_embed is None:
                        eol_embed = model.embed_tokens(eol_ids)
                    hidden = decoder.feed(eol_embed)
                else:
                    hidden = decoder.feed_tokens(eol_ids, (r + 1, 0))
    return codes


# ------------------------------------------------------------------------------------------- text
def generate_text(
    model: WallarooModel,
    batch: dict[str, Tensor],
    max_new_tokens: int,
    stop_ids: set[int] | frozenset[int],
    sampling: SamplingConfig | None = None,
    *,
    full_recompute: bool = False,
    on_logits: LogitsHook | None = None,
) -> list[list[int]]:
    """Generate text after each prompt of a left-padded batch (understanding; a multi-turn conversation is
    just a longer prompt ending with ``<|im_start|>assistant\\n``).

    Each row stops at the first token in ``stop_ids`` (excluded from its output) or after
    ``max_new_tokens`` tokens; the loop ends when every row has stopped. ``sampling.cfg_scale`` is not
    used. ``on_logits(step, logits[B, V])`` sees the ``lm_head`` logits of every step.
    """
    sampling = sampling or SamplingConfig()
    _check_left_padded(batch, "batch")
    b = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    out = torch.zeros(b, max(max_new_tokens, 0), dtype=torch.long, device=device)
    lengths = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    if max_new_tokens <= 0:
        return [[] for _ in range(b)]
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    has_stops = bool(stop_ids)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    generator = sampling.generator(device)
    with _inference(model):
        decoder: CachedDecoder | RecomputeDecoder
        if full_recompute:
            decoder = RecomputeDecoder(model, batch, None, "und")
        else:
            decoder = CachedDecoder(
                model, batch, None, "und", max(max_new_tokens - 1, 1), sampling.static_cache, sampling.compile
            )
        hidden = decoder.start()
        for t in range(max_new_tokens):
            logits = model.lm_head(hidden).float()
            if on_logits is not None:
                on_logits(t, logits)
            tok = sample(logits, sampling, generator)
            out[:, t] = tok
            if has_stops:
                stop_now = torch.isin(tok, stops) & ~finished
                lengths = torch.where(stop_now, t, lengths)
                finished |= stop_now
            # One host sync per step (with stop ids): the loop must know when every row has stopped.
            if t == max_new_tokens - 1 or (has_stops and bool(finished.all())):
                break
            hidden = decoder.feed_tokens(tok)
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist(), strict=True)]


def recompute_text(
    model: WallarooModel,
    batch: dict[str, Tensor],
    max_new_tokens: int,
    stop_ids: set[int] | frozenset[int],
    sampling: SamplingConfig | None = None,
    *,
    on_logits: LogitsHook | None = None,
) -> list[list[int]]:
    """``generate_text`` without a cache: the whole sequence (ViT included) re-runs for every token, as
    the released ``mmu_generate`` does. The reference for tests and the benchmark baseline."""
    return generate_text(
        model, batch, max_new_tokens, stop_ids, sampling, full_recompute=True, on_logits=on_logits
    )
