"""``WallarooModel``: a Qwen2.5-VL backbone with a second, discrete visual pathway.

Plain single-device PyTorch: no Lightning, no distribution (``parallel.py`` applies those from outside).

Batch contract (what the collator produces, all ``[B, L]`` unless noted; labels are unshifted):
- ``input_ids``, ``attention_mask`` (1 real / 0 pad);
- ``labels``: the token id at positions trained as text, -100 elsewhere (``<|generate_image_pad|>``
  positions are -100 here);
- ``image_labels``: -100 except at ``<|generate_image_pad|>`` positions, which hold the target VQ codes in
  raster order. They are both the inputs of those slots (through the task's adapter) and the targets of the
  task's image head;
- ``mm_token_type_ids``: 1 exactly at ViT ``<|image_pad|>`` tokens (never at the editing pixel block);
- optional ``pixel_values`` ``[N, 1176]`` and ``image_grid_thw`` ``[n_images, 3]`` for the ViT;
- optional ``pixel_latents`` ``[sum R*C, codebook_dim]`` (editing): the L2-normalised continuous VQ latents
  of the source images in raster order, one block per sample, filling the ``<|image_pad|>`` tokens that are
  not ViT tokens.

The VQ codebook is passed in (``codebook``, ``[K, D]``) rather than owned: the frozen VQ tokenizer lives
beside the model, and the official checkpoint layout has no VQ weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wallaroo.config import WallarooConfig

Task = Literal["t2i", "edit", "und"]
IGNORE = -100


def mlp_adapter(in_dim: int, hidden: int) -> nn.Sequential:
    """Linear(in, H) - GELU - Linear(H, H): maps an 8-d code vector or latent into the LLM width."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))


def image_head(hidden: int, codebook_size: int, kind: str = "mlp") -> nn.Sequential:
    """Next-code logits from the last hidden state. ``"mlp"`` (the paper's): Linear(H, H) - GELU - Linear(H, K,
    no bias); ``"linear"`` (a laptop-preset choice, ``WallarooConfig.image_head``): one Linear(H, K, no bias)."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(hidden, codebook_size, bias=False))
    if kind != "mlp":
        raise ValueError(f"unknown image_head {kind!r}; expected 'mlp' or 'linear'")
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, codebook_size, bias=False))


def canvas_position_features(image_grid_thw: Tensor, merge: int, dim: int) -> Tensor:
    """Fixed sin/cos features ``[sum of merged tokens, dim]`` of each merged ViT token's place on its canvas.

    Tokens come in raster order of the merged grid ``(t, h / merge, w / merge)`` per image (the order of
    ``get_image_features``). Row and column become fractions ``(i + 0.5) / n`` of their grid, so a place means
    the same on every canvas size; half of ``dim`` carries the row, half the column, each as sin and cos at
    ``dim / 4`` frequencies from 1/2 to 4 turns across the canvas.
    """
    quarter = dim // 4
    freqs = torch.pi * torch.logspace(0, 3, quarter, base=2.0)  # 1/2 .. 4 turns over the unit interval
    rows = []
    for t, h, w in image_grid_thw.tolist():
        gh, gw = h // merge, w // merge
        y = ((torch.arange(gh) + 0.5) / gh)[:, None].expand(gh, gw).reshape(-1)
        x = ((torch.arange(gw) + 0.5) / gw)[None, :].expand(gh, gw).reshape(-1)
        ay, ax = y[:, None] * freqs, x[:, None] * freqs
        one = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
        rows.append(one.repeat(t, 1))
    out = torch.cat(rows)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


def grid_place_features(places: Tensor, dim: int) -> Tensor:
    """Fixed sin/cos features ``[..., dim]`` of integer code-grid places ``[..., 2]`` (row, column; -1 = no
    place, which gets zeros). Half of ``dim`` carries the row, half the column, each as sin and cos at ``dim / 4``
    frequencies whose periods run from 2 to 32 codes, so every place of a grid up to 32 codes wide differs."""
    quarter = dim // 4
    freqs = torch.pi * torch.logspace(0, -4, quarter, base=2.0, device=places.device)
    ay, ax = places[..., :1].float() * freqs, places[..., 1:2].float() * freqs
    out = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=-1) * (places[..., :1] >= 0)
    return F.pad(out, (0, dim - out.shape[-1]))


def pick_attn_implementation(requested: str | None = None) -> str:
    """``flash_attention_2`` when CUDA and the package are present, else ``sdpa`` (unless requested)."""
    if requested:
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_backbone(cfg: WallarooConfig) -> nn.Module:
    """The ``Qwen2_5_VLForConditionalGeneration`` of a preset: random init from its shape, or the weights
    of a local directory (``cfg.pretrained``; never a hub id)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    attn = pick_attn_implementation(cfg.attn_implementation)
    if cfg.pretrained:
        import os

        if not os.path.isdir(cfg.pretrained):
            raise FileNotFoundError(
                f"model.pretrained={cfg.pretrained!r} is not a local directory; weights are never downloaded"
            )
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            cfg.pretrained, local_files_only=True, attn_implementation=attn, dtype=torch.float32
        )
    hf_cfg = cfg.backbone.to_hf(cfg.special_base)
    hf_cfg._attn_implementation = attn
    return Qwen2_5_VLForConditionalGeneration(hf_cfg)


def patch_embed_as_linear(backbone: nn.Module) -> None:
    """Run the ViT's patch embedding as one matrix product over each flattened 2x14x14x3 patch instead of
    ``Conv3d``: kernel and stride are equal, so the result is the same (the tests compare both); parameters and
    ``state_dict`` keys (``patch_embed.proj.weight``, a Conv3d weight) do not change. On the 2-core CPU the product
    takes 0.14-0.16x the Conv3d's time in fp32 and 0.02-0.04x in bf16 autocast (``benchmarks/patch_embed.py``)."""
    embed = backbone.model.visual.patch_embed
    if not isinstance(embed.proj, nn.Conv3d):
        raise TypeError(f"patch_embed.proj is {type(embed.proj).__name__}, expected Conv3d")
    embed.forward = _linear_patch_forward.__get__(embed)


def _linear_patch_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    weight = self.proj.weight
    return F.linear(hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype), weight.reshape(weight.shape[0], -1))


@dataclass
class TaskLoss:
    """One task's loss and its parts. ``image`` is ``None`` for understanding."""

    loss: Tensor
    text: Tensor
    image: Tensor | None
    n_text: int
    n_image: int


@dataclass
class PreparedInputs:
    """What the decoder consumes: embeddings after every scatter, 3-D positions, the 2-D padding mask."""

    inputs_embeds: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    rope_deltas: Tensor


class WallarooModel(nn.Module):
    """Backbone + ``gen_adapter``/``gen_head`` (+ ``pixel_adapter``/``edit_adapter``/``edit_head`` when
    ``cfg.edit``). Top-level attribute names are the module names used by freezing, optimiser groups and
    checkpoints."""

    def __init__(self, cfg: WallarooConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else build_backbone(cfg)
        patch_embed_as_linear(self.backbone)
        hidden = self.backbone.config.text_config.hidden_size
        self.hidden_size = hidden
        self.gen_adapter = mlp_adapter(cfg.codebook_dim, hidden)
        self.gen_head = image_head(hidden, cfg.codebook_size, cfg.image_head)
        if cfg.edit:
            self.add_edit_modules()
        self.gen_pad_id = cfg.special_id("generate_image_pad")
        self.image_pad_id = cfg.special_id("image_pad")

    # ----------------------------------------------------------------------------------- structure
    frozen_parts: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> WallarooModel:
        """Frozen towers (``frozen_parts``, set by ``wallaroo.freezing.set_trainable``) stay in eval mode."""
        super().train(mode)
        from wallaroo.freezing import apply_eval_to_frozen

        apply_eval_to_frozen(self)
        return self

    def add_edit_modules(self) -> None:
        """Create the stage-4 modules (idempotent): ``pixel_adapter``, ``edit_adapter``, ``edit_head``."""
        if hasattr(self, "edit_head"):
            return
        device = self.gen_head[0].weight.device
        dtype = self.gen_head[0].weight.dtype
        hidden, cfg = self.hidden_size, self.cfg
        self.pixel_adapter = mlp_adapter(cfg.codebook_dim, hidden).to(device=device, dtype=dtype)
        self.edit_adapter = mlp_adapter(cfg.codebook_dim, hidden).to(device=device, dtype=dtype)
        self.edit_head = image_head(hidden, cfg.codebook_size, cfg.image_head).to(device=device, dtype=dtype)
        self.cfg.edit = True

    @property
    def has_edit(self) -> bool:
        return hasattr(self, "edit_head")

    @property
    def visual(self) -> nn.Module:
        return self.backbone.model.visual

    @property
    def language_model(self) -> nn.Module:
        return self.backbone.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.lm_head

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.language_model.embed_tokens(ids)

    def adapter(self, task: Task) -> nn.Module:
        if task == "edit":
            self._require_edit()
            return self.edit_adapter
        return self.gen_adapter

    def head(self, task: Task) -> nn.Module:
        if task == "edit":
            self._require_edit()
            return self.edit_head
        return self.gen_head

    def _require_edit(self) -> None:
        if not self.has_edit:
            raise RuntimeError("this model has no editing modules (stage 4 adds them: model.edit=true)")

    # ----------------------------------------------------------------------------------- inputs
    def code_embeddings(self, codes: Tensor, codebook: Tensor, task: Task) -> Tensor:
        """``adapter(l2norm(codebook[codes]))`` for any shape of ``codes``."""
        vec = F.normalize(codebook[codes].float(), dim=-1)
        adapter = self.adapter(task)
        return adapter(vec.to(adapter[0].weight.dtype))

    def vit_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Merged ViT features, one row per LLM image token, images concatenated in order."""
        out = self.backbone.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        feats = torch.cat(list(out.pooler_output), dim=0)
        if self.cfg.vit_position_scale:
            merge = self.backbone.config.vision_config.spatial_merge_size
            pos = canvas_position_features(image_grid_thw, merge, feats.shape[-1])
            feats = feats + self.cfg.vit_position_scale * pos.to(device=feats.device, dtype=feats.dtype)
        return feats

    def code_places(self, input_ids: Tensor, mm_token_type_ids: Tensor, cols: int | None = None) -> Tensor:
        """Code-grid places ``[B, L, 2]`` (row, column; -1 elsewhere) for ``code_position_scale``.

        A source pixel block's slots (``<|image_pad|>`` between ``<|pixel_start|>`` and ``<|pixel_end|>``) get
        their own place. In a generated block, each token whose next token is a code gets that code's place:
        ``<|generate_start|>`` (0, 0), every code but the last of its row in the EOL layout (the last one is
        followed by EOL or ``<|generate_end|>``) and every EOL ((r + 1, 0)). Codes are numbered in raster order;
        the width is the number of codes before the first EOL, else ``cols``, else the square root of the block's
        codes (the square layout of stages 1-2; a block that is not square then fails).
        """
        cfg = self.cfg
        places = torch.full((*input_ids.shape, 2), -1, dtype=torch.long, device=input_ids.device)
        eol_id = cfg.special_id("eol")
        for start_id, end_id, slot_id, own in (
            (cfg.special_id("pixel_start"), cfg.special_id("pixel_end"), self.image_pad_id, True),
            (cfg.special_id("generate_start"), cfg.special_id("generate_end"), self.gen_pad_id, False),
        ):
            for b in range(input_ids.shape[0]):
                ids = input_ids[b]
                starts = (ids == start_id).nonzero().flatten().tolist()
                ends = (ids == end_id).nonzero().flatten().tolist()
                for s in starts:
                    e = next((x for x in ends if x > s), ids.shape[0])
                    span = ids[s + 1 : e]
                    slot = (span == slot_id) & (mm_token_type_ids[b, s + 1 : e] == 0)
                    eol = span == eol_id
                    n = int(slot.sum())
                    if eol.any():
                        width = int(slot[: int(eol.nonzero()[0])].sum())
                    elif cols:
                        width = cols
                    else:
                        width = max(1, round(n**0.5))
                        if n and width * width != n:
                            raise ValueError(
                                f"code_position_scale: a generated block of {n} codes without EOL tokens is not "
                                "square; pass its width (prepare_inputs(cols=...))"
                            )
                    k = slot.long().cumsum(0) - 1  # raster index of each slot
                    at = torch.arange(s + 1, e, device=ids.device)
                    if own:
                        idx = at[slot]
                        places[b, idx, 0], places[b, idx, 1] = k[slot] // width, k[slot] % width
                        continue
                    places[b, s] = 0  # generate_start: the first code
                    nxt = k + 1
                    has_next = slot & (nxt % width != 0 if eol.any() else nxt < (n if e < ids.shape[0] else 1 << 30))
                    idx = at[has_next]
                    places[b, idx, 0], places[b, idx, 1] = nxt[has_next] // width, nxt[has_next] % width
                    rows_done = eol.long().cumsum(0)
                    idx = at[eol]
                    places[b, idx, 0], places[b, idx, 1] = rows_done[eol], 0
        return places

    def place_features(self, places: Tensor) -> Tensor:
        """``code_position_scale`` times the sin/cos features of ``places`` ``[..., 2]`` (zeros where -1)."""
        return self.cfg.code_position_scale * grid_place_features(places, self.hidden_size)

    def mask_latents(self, latents: Tensor, counts: list[int], ratio: float) -> Tensor:
        """MAE-style random masking per sample: ``int(n * (1 - ratio))`` rows kept, the rest set to -1."""
        if ratio <= 0:
            return latents
        out = []
        for block in torch.split(latents, counts):
            n = block.shape[0]
            keep = int(n * (1 - ratio))
            order = torch.rand(n, device=block.device).argsort()
            masked = torch.full_like(block, -1.0)
            masked[order[:keep]] = block[order[:keep]]
            out.append(masked)
        return torch.cat(out) if out else latents

    def prepare_inputs(
        self,
        batch: dict[str, Tensor],
        codebook: Tensor | None,
        task: Task,
        pixel_mask_ratio: float = 0.0,
        cols: int | None = None,
    ) -> PreparedInputs:
        """Token embeddings with ViT features, source latents and target codes scattered into their slots,
        code-grid place features where ``code_position_scale`` asks for them (``cols``: the generated grid's
        width, needed only for an unfinished square-layout block), and M-RoPE positions from the backbone's
        own ``get_rope_index`` (pads at position 1)."""
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        mm_types = batch.get("mm_token_type_ids")
        if mm_types is None:
            # transformers 5.x silently falls back to 1-D positions for ViT tokens without these.
            raise ValueError("batch lacks mm_token_type_ids: the ViT tokens would get 1-D positions")
        embeds = self.embed_tokens(input_ids)
        dtype = embeds.dtype

        vit_mask = mm_types == 1
        if vit_mask.any():
            if batch.get("pixel_values") is None:
                raise ValueError("batch has ViT image tokens but no pixel_values")
            feats = self.vit_features(batch["pixel_values"], batch["image_grid_thw"])
            if feats.shape[0] != int(vit_mask.sum()):
                raise ValueError(f"{int(vit_mask.sum())} ViT image tokens but {feats.shape[0]} ViT features")
            embeds = embeds.masked_scatter(vit_mask[..., None], feats.to(dtype))

        pix_mask = (input_ids == self.image_pad_id) & ~vit_mask
        if pix_mask.any():
            self._require_edit()
            latents = batch.get("pixel_latents")
            if latents is None or latents.shape[0] != int(pix_mask.sum()):
                got = None if latents is None else latents.shape[0]
                raise ValueError(f"{int(pix_mask.sum())} pixel-block slots but pixel_latents has {got} rows")
            counts = pix_mask.sum(1).tolist()
            latents = self.mask_latents(latents, [c for c in counts if c], pixel_mask_ratio)
            feats = self.pixel_adapter(latents.to(self.pixel_adapter[0].weight.dtype))
            embeds = embeds.masked_scatter(pix_mask[..., None], feats.to(dtype))

        gen_mask = input_ids == self.gen_pad_id
        if gen_mask.any():
            if codebook is None:
                raise ValueError("image-code slots need the VQ codebook")
            codes = batch["image_labels"][gen_mask]
            if (codes < 0).any():
                raise ValueError("a <|generate_image_pad|> slot has no code in image_labels")
            feats = self.code_embeddings(codes, codebook, task)
            embeds = embeds.masked_scatter(gen_mask[..., None], feats.to(dtype))

        if self.cfg.code_position_scale:
            embeds = embeds + self.place_features(self.code_places(input_ids, mm_types, cols)).to(dtype)

        position_ids, rope_deltas = self.backbone.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_types,
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=attention_mask,
        )
        # The reference puts pads at position 1; masked keys make the value irrelevant, but keeping it
        # lets positions be compared exactly.
        position_ids = position_ids.masked_fill(~attention_mask.bool()[None], 1)
        return PreparedInputs(embeds, position_ids, attention_mask, rope_deltas)

    def compile_llm(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` the text model (dynamic shapes) for :meth:`decode` in training mode; evaluation and
        sampling (KV caches) keep the eager module. The compiled wrapper is kept out of the module tree, so
        parameters, ``state_dict`` keys and checkpoints are those of the eager model. ``compile_kwargs`` go to
        ``torch.compile`` (tests pass ``backend="eager"``)."""
        compile_kwargs.setdefault("dynamic", True)
        self.__dict__["_compiled_llm"] = torch.compile(self.language_model, **compile_kwargs)

    @property
    def compiled_llm(self) -> nn.Module | None:
        """The text model compiled by :meth:`compile_llm`, or ``None``."""
        return self.__dict__.get("_compiled_llm")

    def decode(self, prepared: PreparedInputs, **kwargs: object) -> Tensor:
        """Last hidden states (after the final norm) for prepared inputs (through the compiled text model in
        training mode when :meth:`compile_llm` made one)."""
        llm = self.compiled_llm if self.training and self.compiled_llm is not None else self.language_model
        out = llm(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=prepared.attention_mask,
            position_ids=prepared.position_ids,
            use_cache=False,
            **kwargs,
        )
        return out.last_hidden_state

    # ----------------------------------------------------------------------------------- losses
    @staticmethod
    def _shifted_ce(hidden: Tensor, labels: Tensor, head: nn.Module) -> tuple[Tensor, int]:
        """Mean CE of ``head(hidden[p])`` against ``labels[p+1]``, evaluating the head ONLY at labelled
        positions (the released code evaluates full-vocabulary logits at every position)."""
        targets = labels[:, 1:]
        sel = targets != IGNORE
        n = int(sel.sum())
        if n == 0:
            return hidden.sum() * 0.0, 0
        logits = head(hidden[:, :-1][sel]).float()
        return F.cross_entropy(logits, targets[sel]), n

    def forward(
        self,
        batch: dict[str, Tensor],
        task: Task,
        codebook: Tensor | None = None,
        pixel_mask_ratio: float | None = None,
    ) -> TaskLoss:
        """The paper's loss for one task's sub-batch.

        ``t2i``/``edit``: mean CE over text-labelled positions (lm_head) + mean CE over image-code positions
        (the task's image head). ``und``: mean CE over assistant tokens. ``pixel_mask_ratio`` defaults to
        the config's ratio in training mode and 0 in eval mode.
        """
        if task not in ("t2i", "edit", "und"):
            raise ValueError(f"unknown task {task!r}")
        if pixel_mask_ratio is None:
            pixel_mask_ratio = self.cfg.pixel_mask_ratio if self.training else 0.0
        prepared = self.prepare_inputs(batch, codebook, task, pixel_mask_ratio)
        hidden = self.decode(prepared)
        text, n_text = self._shifted_ce(hidden, batch["labels"], self.lm_head)
        if task == "und":
            return TaskLoss(text, text, None, n_text, 0)
        image, n_image = self._shifted_ce(hidden, batch["image_labels"], self.head(task))
        return TaskLoss(text + image, text, image, n_text, n_image)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_summary(model: WallarooModel) -> dict[str, dict[str, int]]:
    """Total and trainable parameters per top-level module (the backbone split into ViT and LLM)."""
    rows: dict[str, nn.Module] = {
        "backbone": model.backbone,
        "backbone.visual": model.visual,
        "backbone.llm": nn.ModuleList([model.language_model, model.lm_head]),
    }
    for name in ("gen_adapter", "gen_head", "pixel_adapter", "edit_adapter", "edit_head"):
        if hasattr(model, name):
            rows[name] = getattr(model, name)
    rows["model"] = model
    return {
        k: {"total": count_parameters(m), "trainable": count_parameters(m, trainable_only=True)}
        for k, m in rows.items()
    }
