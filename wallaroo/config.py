"""Typed model presets.

A preset fixes the shape of everything that has weights: the Qwen2.5-VL backbone, the VQ tokenizer,
the adapters and heads, and the tokenizer vocabulary they share. YAML files pick a preset by name and
override single fields; they never describe a model from scratch.

Presets:
- ``tiny``: unit tests; builds in well under a second; mirrors the official tiny golden case shapes.
- ``shapes``: the ShapesWorld laptop demo (small Qwen2.5-VL, 8x VQ tokenizer, three canvas sizes).
- ``qwen2.5-vl-3b`` / ``qwen2.5-vl-7b``: shapes of the public checkpoints; weights come from a local
  directory (``pretrained``), never from a hub id.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from wallaroo.tokens import INDICATOR_SIZES_512 as _TOKENS_INDICATOR_SIZES_512
from wallaroo.tokens import INDICATOR_SIZES_SHAPES as _TOKENS_INDICATOR_SIZES_SHAPES

# The vocabulary layout every preset shares (token_layout.md §1): ordinary BPE ids first, then the 22
# Qwen2.5 special tokens from ``special_base`` on (151643 in the real vocabulary), then the six Wallaroo
# tokens in the official order, then 12 indicator tokens. Every special id derives from
# ``special_base``; tokenizers are checked against this layout when they are loaded.
SPECIAL_OFFSETS: dict[str, int] = {
    "pad": 0,  # <|endoftext|>
    "im_start": 1,
    "im_end": 2,
    "vision_start": 9,
    "vision_end": 10,
    "image_pad": 12,
    "video_pad": 13,
    "generate_start": 22,
    "generate_end": 23,
    "pixel_start": 24,
    "pixel_end": 25,
    "eol": 26,
    "generate_image_pad": 27,
}
INDICATOR_OFFSET = 28
NUM_SPECIAL_TOKENS = INDICATOR_OFFSET + 12
QWEN_SPECIAL_BASE = 151643


@dataclass
class BackboneConfig:
    """Shape of a Qwen2.5-VL backbone (LLM + ViT with its 2x2 merger)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: list[int]
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 128_000
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    vision_depth: int = 32
    vision_hidden_size: int = 1280
    vision_intermediate_size: int = 3420
    vision_num_heads: int = 16
    vision_window_size: int = 112
    vision_fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    vision_tokens_per_second: int = 2
    # Std of the normal init of every Linear and Embedding weight of a randomly initialised backbone (LLM and
    # ViT); Qwen's 0.02 by default. Pretrained weights ignore it.
    initializer_range: float = 0.02

    def to_hf(self, special_base: int) -> Any:
        """Build the ``transformers`` ``Qwen2_5_VLConfig`` for this shape and vocabulary layout."""
        from transformers import Qwen2_5_VLConfig

        def sid(name: str) -> int:
            return special_base + SPECIAL_OFFSETS[name]

        text = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "mrope_section": list(self.mrope_section),
            },
            "bos_token_id": sid("pad"),
            "eos_token_id": sid("im_end"),
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
        }
        vision = {
            "depth": self.vision_depth,
            "hidden_size": self.vision_hidden_size,
            "intermediate_size": self.vision_intermediate_size,
            "num_heads": self.vision_num_heads,
            "out_hidden_size": self.hidden_size,
            "window_size": self.vision_window_size,
            "fullatt_block_indexes": list(self.vision_fullatt_block_indexes),
            "tokens_per_second": self.vision_tokens_per_second,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            "initializer_range": self.initializer_range,
        }
        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=sid("image_pad"),
            video_token_id=sid("video_pad"),
            vision_start_token_id=sid("vision_start"),
            vision_end_token_id=sid("vision_end"),
            tie_word_embeddings=self.tie_word_embeddings,
            # transformers' _init_weights reads the top-level value (None there falls back to 0.02).
            initializer_range=self.initializer_range,
        )


@dataclass
class WallarooConfig:
    """Everything that fixes the weights' shapes and the token vocabulary of one Wallaroo model.

    ``tokenizer`` is ``"tiny"`` (the package's bilingual byte-level BPE, built in milliseconds), a
    local directory holding Qwen tokenizer files, or ``None`` (the tokenizer files of ``pretrained``).
    ``pretrained`` is a local Qwen2.5-VL directory whose weights initialise the backbone (``None``:
    random init from ``backbone``). ``vq`` names a VQ preset (``wallaroo.vq.VQ_PRESETS``) and
    ``vq_path`` optionally a LlamaGen ``vq_ds16_t2i.pt`` to load. ``special_base`` is the id of
    ``<|endoftext|>``; all special ids follow from it (``SPECIAL_OFFSETS``). ``buckets`` names the
    model's output sizes (``wallaroo.sequences.BUCKET_SETS``) and ``t2i_layout`` the text-to-image layout it
    was trained on: ``"square"`` (stages 1-2, no EOL or size indicators) or ``"aspect"``.
    ``vit_image_mean``/``vit_image_std`` normalise the ViT's input pixels (``None``: Qwen's CLIP values, as
    its pretrained ViT expects).
    """

    name: str
    backbone: BackboneConfig
    vq: str
    codebook_size: int
    codebook_dim: int = 8
    special_base: int = QWEN_SPECIAL_BASE
    edit: bool = False
    tokenizer: str | None = "tiny"
    indicator_sizes: list[int] = field(default_factory=list)
    buckets: str = "aspect512"
    t2i_layout: str = "aspect"
    pretrained: str | None = None
    vq_path: str | None = None
    vit_min_pixels: int = 3136
    vit_max_pixels: int = 254_016
    vit_image_mean: list[float] | None = None
    vit_image_std: list[float] | None = None
    # Laptop presets: one fixed ViT resize factor instead of smart_resize's pixel bounds (images.VitImageProcessor).
    vit_scale: float | None = None
    # Laptop presets: add fixed 2-D sin/cos features of each merged ViT token's place on its canvas (row and
    # column as fractions of the grid) times this to the token's feature (0: off, the paper's design).
    vit_position_scale: float = 0.0
    # Laptop presets: add fixed sin/cos features of the code-grid place (integer row, column) to the image-code
    # slots times this (0: off, the paper's 1-D positions only). Each source pixel-block slot carries its own
    # place; in a generated block every token whose next token is a code (generate_start, the codes, the EOLs)
    # carries the place of that next code (``WallarooModel.code_places``).
    code_position_scale: float = 0.0
    pixel_mask_ratio: float = 0.6
    # The image heads (gen_head, edit_head): "mlp" (the paper's Linear-GELU-Linear) or "linear" (laptop presets).
    image_head: str = "mlp"
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        # Checked here so a bad YAML value fails when the config is built, not in a data worker later.
        from wallaroo.images import normalisation

        normalisation(self.vit_image_mean, self.vit_image_std, ("vit_image_mean", "vit_image_std"))
        if self.image_head not in ("mlp", "linear"):
            raise ValueError(f"image_head must be 'mlp' or 'linear', got {self.image_head!r}")

    def with_overrides(self, **overrides: Any) -> WallarooConfig:
        """Return a copy with top-level fields (or ``backbone.<field>`` keys) replaced; unknown keys fail."""
        cfg = copy.deepcopy(self)
        overrides = dict(overrides)
        if isinstance(overrides.get("backbone"), dict):  # the CLI's ``overrides.backbone.<field>`` arrives nested
            overrides.update({f"backbone.{k}": v for k, v in overrides.pop("backbone").items()})
        backbone_over = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("backbone.")}
        top = {k: v for k, v in overrides.items() if not k.startswith("backbone.")}
        known = {f.name for f in fields(WallarooConfig)}
        bad = sorted(set(top) - known)
        bknown = {f.name for f in fields(BackboneConfig)}
        bad += sorted(f"backbone.{k}" for k in set(backbone_over) - bknown)
        if bad:
            raise ValueError(f"unknown model config field(s) {bad}; known: {sorted(known)}")
        if backbone_over:
            cfg.backbone = replace(cfg.backbone, **backbone_over)
        return replace(cfg, **top)

    def special_id(self, name: str) -> int:
        """Id of a special token by its short name (``SPECIAL_OFFSETS``)."""
        return self.special_base + SPECIAL_OFFSETS[name]

    def indicator_id(self, size: int) -> int:
        """Id of ``<indicator:{size}>``; sizes outside ``indicator_sizes`` fail with the valid list."""
        if size not in self.indicator_sizes:
            raise ValueError(f"no indicator token for size {size}; this model has {self.indicator_sizes}")
        return self.special_base + INDICATOR_OFFSET + self.indicator_sizes.index(size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WallarooConfig:
        d = dict(d)
        d["backbone"] = BackboneConfig(**d["backbone"])
        return cls(**d)


# One definition of each indicator list (wallaroo.tokens); configs hold them as lists (YAML-friendly).
INDICATOR_SIZES_512 = list(_TOKENS_INDICATOR_SIZES_512)
INDICATOR_SIZES_SHAPES = list(_TOKENS_INDICATOR_SIZES_SHAPES)

_QWEN7B_BACKBONE = BackboneConfig(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    mrope_section=[16, 24, 24],
)

_QWEN3B_BACKBONE = BackboneConfig(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    mrope_section=[16, 24, 24],
    tie_word_embeddings=True,
)


def _small_backbone(**kw: Any) -> BackboneConfig:
    """Small backbones use the package tokenizer, whose specials sit at 960.. as in the official tiny case."""
    base = dict(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        max_position_embeddings=4096,
        vision_depth=4,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_heads=2,
        vision_fullatt_block_indexes=[1, 3],
    )
    base.update(kw)
    return BackboneConfig(**base)


PRESETS: dict[str, WallarooConfig] = {
    "tiny": WallarooConfig(
        name="tiny",
        backbone=_small_backbone(),
        vq="tiny-ds8",
        codebook_size=64,
        tokenizer="tiny",
        special_base=960,
        indicator_sizes=INDICATOR_SIZES_SHAPES,
        buckets="shapes",
        vit_min_pixels=56 * 56,
        vit_max_pixels=112 * 112,
    ),
    "shapes": WallarooConfig(
        name="shapes",
        backbone=_small_backbone(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=[8, 12, 12],
            vision_depth=2,
            vision_hidden_size=64,
            vision_intermediate_size=128,
            vision_num_heads=2,
            vision_fullatt_block_indexes=[0, 1],
            # 0.04 instead of Qwen's 0.02. Measured with the plain 4-layer text-to-image yardstick
            # (shared/research/minimal_t2i.py) on 48x48 ShapesWorld v2, exact scenes after 100 steps: PyTorch's
            # default init 0.43, every Linear at N(0, 0.02) 0.00 (loss 0.32-0.53 against 0.06), embeddings at
            # 0.02 alone 0.34; the same with this Qwen decoder inside: 0.02 -> 0.00 (loss 0.185), 0.04 -> 0.33.
            # At width 256 the 0.02 init makes attention logits ~3x smaller than PyTorch's, and attention
            # takes hundreds of steps longer to find the caption words. README "Why text-to-image learned slowly".
            initializer_range=0.04,
        ),
        vq="shapes-ds8",
        codebook_size=1024,
        # One Linear instead of the paper's Linear-GELU-Linear. Measured with benchmarks/learning.py (48x48 t2i,
        # EN+ZH, 200 steps; README "Why text-to-image learned slowly"): with everything else set to learn fast,
        # exact scenes 0.47 with a linear head, 0.00 with the MLP head (0.02 with a bias on its output); in
        # the ShapesWorld recipe the MLP head kept the loss at 0.44-0.52 after 100 steps, a linear one 0.32.
        image_head="linear",
        tokenizer="tiny",
        special_base=960,
        indicator_sizes=INDICATOR_SIZES_SHAPES,
        buckets="shapes",
        vit_min_pixels=112 * 112,
        vit_max_pixels=168 * 168,
        # A ViT trained from scratch on white canvases: white maps to 0, so background patches give the
        # same small feature and the objects stand out. With CLIP's values every patch carries a large
        # constant and, in 600-step trials, count questions stayed at chance (0.22); with these, 0.89
        # after 200 steps.
        vit_image_mean=[1.0, 1.0, 1.0],
        vit_image_std=[0.5, 0.5, 0.5],
        # Where a ViT token sits on its canvas. M-RoPE's h/w angles at theta 1e6 turn < 0.16 rad across a 4-6
        # token grid and carry no absolute place, so "Where is the ...?" stayed near chance (0.21). Fixed
        # sin/cos place features on each merged token, 400 pre-training steps, 200 questions: overall
        # 0.385 -> 0.46 (position 0.21 -> 0.47) at 0.35; 0.395 at 1.0.
        vit_position_scale=0.35,
    ),
    "qwen2.5-vl-3b": WallarooConfig(
        name="qwen2.5-vl-3b",
        backbone=_QWEN3B_BACKBONE,
        vq="llamagen-ds16",
        codebook_size=16384,
        tokenizer=None,
        indicator_sizes=INDICATOR_SIZES_512,
    ),
    "qwen2.5-vl-7b": WallarooConfig(
        name="qwen2.5-vl-7b",
        backbone=_QWEN7B_BACKBONE,
        vq="llamagen-ds16",
        codebook_size=16384,
        tokenizer=None,
        indicator_sizes=INDICATOR_SIZES_512,
    ),
}


def get_preset(name: str, **overrides: Any) -> WallarooConfig:
    """A fresh copy of a named preset with overrides applied (see ``WallarooConfig.with_overrides``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides)
