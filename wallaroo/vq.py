"""LlamaGen-compatible VQ image tokenizer with configurable width.

Wallaroo generates images as grids of discrete codes from LlamaGen's VQ-16 tokenizer
(``vq_ds16_t2i.pt``: 16x downsampling, codebook 16384 x 8, L2-normalised codes). This module
re-implements that architecture so that:

* the ``"llamagen-ds16"`` preset has exactly the state-dict layout of the public checkpoint (344 keys,
  71,883,403 parameters plus the ``quantize.codebook_used`` buffer) and loads it with ``strict=True``;
* smaller presets (``"shapes-ds8"``, ``"tiny-ds8"``) share the same code and can be trained from scratch
  on a laptop, e.g. on ShapesWorld.

Conventions used by the rest of the package:

* images are ``[B, 3, H, W]`` tensors in ``[-1, 1]`` (height before width, as every tensor here; sizes
  in user-facing text are written ``WxH``);
* a code grid is ``[B, R, C]`` with ``R = H / downsample`` rows and ``C = W / downsample`` columns;
* latents and codebook vectors are channel-last and L2-normalised.

The module is single-device PyTorch and imports no Lightning.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CODEBOOK_USED_LEN",
    "VQ_PRESETS",
    "VQConfig",
    "VQModel",
    "VQOutput",
    "build_vq",
    "load_llamagen",
]

# LlamaGen registers a usage ring buffer of this fixed length whatever the codebook size; it is part of
# the checkpoint's state dict, so every preset keeps it for a strict load.
CODEBOOK_USED_LEN = 65536


@dataclass(frozen=True)
class VQConfig:
    """Shape and training options of a :class:`VQModel`.

    The defaults are LlamaGen's VQ-16 t2i tokenizer. Encoder and decoder share ``ch``/``ch_mult``/
    ``num_res_blocks``, as in every released LlamaGen VQ checkpoint.

    Attributes:
        ch: base width of the encoder/decoder; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: per-resolution width multipliers; ``len(ch_mult) - 1`` halvings of the resolution.
        z_channels: channels of the encoder output before ``quant_conv``.
        num_res_blocks: residual blocks per encoder level (the decoder uses one more per level).
        codebook_size: number of codebook entries.
        codebook_dim: dimension of a codebook entry (and of the latents).
        dropout: dropout inside the residual blocks.
        commit_beta: weight of the commitment loss in the total loss.
        entropy_weight: weight of LlamaGen's codebook entropy loss (0 disables and skips its compute).
        entropy_temperature: softmax temperature of the entropy loss (LlamaGen: 0.01).
        in_channels: image channels in.
        out_channels: image channels out.
        norm_groups: GroupNorm groups (LlamaGen: 32). Must divide every width in the network.
        norm_eps: GroupNorm epsilon (LlamaGen: 1e-6).
        recon_loss: pixel loss of :meth:`VQModel.forward`: ``"l2"`` (mean squared error, LlamaGen's
            default), ``"l1"`` or ``"l1+l2"`` (sum of both means). LlamaGen's perceptual and GAN losses
            are not part of this model.
        restart_dead_codes: in training, re-initialise codebook entries that were not used in the last
            ``usage_window`` codes with random latents of the current batch. Helps small codebooks on toy
            data; the restart is local to the process (under DDP keep it off or the ranks diverge).
        usage_window: how many recent codes :meth:`VQModel.usage` and the dead-code restart look at;
            at most ``CODEBOOK_USED_LEN``.
        encoder_context: what one code sees. ``"image"`` (LlamaGen): the encoder runs on the whole image,
            so every code depends on its neighbourhood (and, through the middle attention, on the whole
            image). ``"patch"``: the same encoder runs on each ``downsample x downsample`` patch on its
            own, so a code is a function of its patch's pixels alone (identical patches get identical
            codes) while the decoder still sees the whole grid. Same modules and state-dict keys.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    codebook_size: int = 16384
    codebook_dim: int = 8
    dropout: float = 0.0
    commit_beta: float = 0.25
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    recon_loss: Literal["l2", "l1", "l1+l2"] = "l2"
    restart_dead_codes: bool = False
    usage_window: int = CODEBOOK_USED_LEN
    encoder_context: Literal["image", "patch"] = "image"

    def __post_init__(self) -> None:
        # jsonargparse/YAML hand lists over; a tuple keeps the config hashable and comparable.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one level")
        widths = {self.ch * m for m in self.ch_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} does not divide the widths {bad}")
        if not 0 < self.usage_window <= CODEBOOK_USED_LEN:
            raise ValueError(f"usage_window must be in [1, {CODEBOOK_USED_LEN}], got {self.usage_window}")
        if self.recon_loss not in ("l2", "l1", "l1+l2"):
            raise ValueError(f"recon_loss must be 'l2', 'l1' or 'l1+l2', got {self.recon_loss!r}")
        if self.encoder_context not in ("image", "patch"):
            raise ValueError(f"encoder_context must be 'image' or 'patch', got {self.encoder_context!r}")

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (each level but the last halves the resolution)."""
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS: dict[str, VQConfig] = {
    # LlamaGen vq_ds16_t2i.pt, exactly: 16x downsampling, 16384 x 8 codebook.
    "llamagen-ds16": VQConfig(),
    # ShapesWorld (48x48, 72x48, 48x72 canvases -> 6x6, 6x9, 9x6 codes): a shallow network (no
    # residual blocks in the levels, 16 channels throughout; 84k parameters) learns these flat-colour
    # scenes faster per second than the deeper (1, 2, 4, 8) x 8 one (808k): on 2 cores it runs 0.12 s
    # a step at batch 16 instead of 0.25, for the same progress per step. L1 keeps edges sharper than L2
    # (shape is read from edges). Trials with the recipe of stages/shapes/vq.yaml (foreground-weighted,
    # 1200 steps): 1024 codes reach a tokenizer ceiling of 0.35, 256 codes stay near 0 (every object
    # decodes in one grey-brown: too few codes for colour x outline). Dead-code restarts keep the
    # codebook alive while training from scratch (without them usage collapses within 50 steps).
    # Each code sees only its own 8x8 patch (encoder_context="patch"): with the whole image in view (the
    # LlamaGen setting) the trained encoder gave white background patches 851 different codes depending
    # on what was near them, so the LLM had to predict near-random codes for 3/4 of every image (t2i
    # code loss 3.3 after 500 steps of a stage-2 trial). With patches, white is one code, the same trial
    # reached 0.64 in 600 steps, and the tokenizer ceiling went 0.805 -> 0.915 for the same 2800-step
    # recipe (then 0.955 with error-weighted restarts and edge weight 20).
    "shapes-ds8": VQConfig(
        ch=16,
        ch_mult=(1, 1, 1, 1),
        z_channels=64,
        num_res_blocks=0,
        codebook_size=1024,
        codebook_dim=8,
        norm_groups=4,
        recon_loss="l1",
        restart_dead_codes=True,
        usage_window=8192,
        encoder_context="patch",
    ),
    # Unit tests only.
    "tiny-ds8": VQConfig(
        ch=16,
        ch_mult=(1, 1, 2, 2),
        z_channels=32,
        num_res_blocks=1,
        codebook_size=64,
        codebook_dim=8,
        norm_groups=8,
        usage_window=4096,
    ),
}


# --------------------------------------------------------------------------------------------------
# Building blocks (names of submodules are the checkpoint's key names: do not rename)
# --------------------------------------------------------------------------------------------------


def _norm(channels: int, cfg: VQConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GN-SiLU-conv3x3-GN-SiLU-dropout-conv3x3 plus a shortcut (1x1 conv
    ``nin_shortcut`` when the widths differ)."""

    def __init__(self, in_ch: int, out_ch: int, cfg: VQConfig) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, cfg)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions, residual; 1x1 convs for q, k, v, out."""

    def __init__(self, channels: int, cfg: VQConfig) -> None:
        super().__init__()
        self.norm = _norm(channels, cfg)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        # SDPA's default scale 1/sqrt(C) for one head of width C is LlamaGen's scale; it picks a fused
        # kernel where one exists instead of materialising the HW x HW matrix by hand.
        out = F.scaled_dot_product_attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding one pixel right and bottom (LlamaGen/taming)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding makes an even side exactly halve with a 3x3/stride-2 kernel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # Interpolate in fp32 as LlamaGen does: nearest upsampling of bf16 is not supported everywhere.
        x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)
        return self.conv(x)


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, optional ``attn`` blocks (one after each res) and resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run(self, h: Tensor) -> Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    """Image ``[B, in_channels, H, W]`` -> ``[B, z_channels, H/ds, W/ds]``.

    Attention only at the lowest resolution (last level) and in the middle block, as in LlamaGen.
    """

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        for i in range(n):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, cfg))
                block_in = block_out
                if i == n - 1:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != n - 1:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, cfg), AttnBlock(block_in, cfg), ResnetBlock(block_in, block_in, cfg)]
        )
        self.norm_out = _norm(block_in, cfg)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``[B, z_channels, R, C]`` -> image ``[B, out_channels, R*ds, C*ds]`` (the encoder's mirror).

    ``conv_blocks[0]`` is the lowest resolution (the only one with attention); each level has
    ``num_res_blocks + 1`` residual blocks, and every level but the last ends with an upsampler.
    """

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, cfg), AttnBlock(block_in, cfg), ResnetBlock(block_in, block_in, cfg)]
        )
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            level = _Level()
            block_out = cfg.ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResnetBlock(block_in, block_out, cfg))
                block_in = block_out
                if i == n - 1:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(block_in, cfg)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """L2-normalised nearest-neighbour codebook (LlamaGen ``codebook_l2_norm=True``).

    State: ``embedding`` (``nn.Embedding(codebook_size, codebook_dim)``, the raw, unnormalised weights as
    stored in the checkpoint) and the persistent buffer ``codebook_used`` (float32 ring buffer of the most
    recent ``CODEBOOK_USED_LEN`` code indices seen in training; zeros at init, as in LlamaGen).
    """

    # Rows of latents scored against the codebook at once: bounds the [rows, codebook_size] score matrix
    # (2048 x 16384 fp32 = 128 MiB) whatever the batch and image size.
    _chunk = 2048

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_LEN))
        # Codes recorded since construction. Not saved: after loading a checkpoint the whole buffer is
        # taken at face value (LlamaGen semantics); after fresh init it keeps the zeros from counting.
        self._recorded = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen init: uniform(-1/n, 1/n), then L2-normalised rows."""
        n = self.cfg.codebook_size
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n, 1.0 / n)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self) -> Tensor:
        """The L2-normalised codebook ``[codebook_size, codebook_dim]`` (differentiable)."""
        return F.normalize(self.embedding.weight, dim=-1)

    def lookup(self, codes: Tensor) -> Tensor:
        """``codes [...]`` (long) -> L2-normalised codebook vectors ``[..., codebook_dim]``."""
        return F.normalize(self.embedding(codes), dim=-1)

    @torch.no_grad()
    def _best_match(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``(score, index)`` of the best codebook entry for each unit row of ``flat [N, D]``: the largest
        dot product with the normalised codebook (first index on ties), in chunks of ``_chunk`` rows."""
        book = self.codebook().to(flat.dtype)
        score = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
        index = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], self._chunk):
            stop = start + self._chunk
            torch.max(flat[start:stop] @ book.T, dim=-1, out=(score[start:stop], index[start:stop]))
        return score, index

    @torch.no_grad()
    def nearest(self, latents: Tensor) -> Tensor:
        """Index of the nearest normalised codebook entry for each L2-normalised latent ``[..., D]``.

        For unit vectors the smallest L2 distance is the largest dot product, so this is
        ``argmax(latents @ codebook().T)`` (first index on ties), computed in chunks.
        """
        return self._best_match(latents.reshape(-1, latents.shape[-1]))[1].reshape(latents.shape[:-1])

    @torch.no_grad()
    def record(self, codes: Tensor) -> None:
        """Push ``codes`` into the ring buffer (oldest entries drop out)."""
        flat = codes.reshape(-1)[-CODEBOOK_USED_LEN:].to(self.codebook_used.dtype)
        n = flat.numel()
        buf = self.codebook_used
        buf.copy_(torch.cat([buf[n:], flat]))
        self._recorded = min(self._recorded + n, CODEBOOK_USED_LEN)

    def _window(self) -> Tensor:
        """The recent codes that count as 'used': the last ``usage_window`` entries, or fewer if fewer
        were recorded since construction (never the initial zeros), or the whole window of a loaded
        buffer when nothing was recorded here."""
        n = self.cfg.usage_window
        if 0 < self._recorded < n:
            n = self._recorded
        return self.codebook_used[-n:]

    @torch.no_grad()
    def used_mask(self) -> Tensor:
        """Bool ``[codebook_size]``: entry appears in the recent window."""
        mask = torch.zeros(self.cfg.codebook_size, dtype=torch.bool, device=self.codebook_used.device)
        mask[self._window().long().clamp_(0, self.cfg.codebook_size - 1)] = True
        return mask

    @torch.no_grad()
    def restart_dead(self, latents: Tensor) -> int:
        """Replace entries unused in a full recent window by rows of ``latents [..., D]``, drawn with
        probability proportional to each row's distance from its nearest entry (rows the codebook fits
        worst; uniformly when every row sits on an entry).

        Uniform draws would mostly land on the commonest latent, which already has its entry: on
        ShapesWorld 3/4 of all patches are plain white, and with a patch-local encoder they share one
        latent exactly. Waits until a whole ``usage_window`` has been recorded, so every entry had its
        chance. Returns the number of restarted entries.
        """
        if self._recorded < self.cfg.usage_window:
            return 0
        dead = (~self.used_mask()).nonzero().squeeze(-1)
        if dead.numel() == 0:
            return 0
        flat = latents.detach().reshape(-1, latents.shape[-1])
        error = (2 - 2 * self._best_match(flat)[0]).clamp_min(0)  # squared distance of unit vectors
        if float(error.sum()) > 0:
            pick = torch.multinomial(error.float(), dead.numel(), replacement=True)
        else:
            pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        self.embedding.weight[dead] = flat[pick].to(self.embedding.weight.dtype)
        # Count the new entries as used, so they get a whole window before being judged again.
        self.record(dead)
        return int(dead.numel())

    def entropy_loss(self, latents: Tensor) -> Tensor:
        """LlamaGen's codebook entropy loss: mean per-sample entropy minus entropy of the mean
        assignment, with logits ``-distance / temperature``. Lower = confident and diverse codes."""
        flat = latents.reshape(-1, latents.shape[-1])
        book = self.codebook()
        dist = (flat**2).sum(-1, keepdim=True) + (book**2).sum(-1) - 2 * flat @ book.T
        logits = -dist / self.cfg.entropy_temperature
        probs = logits.softmax(dim=-1)
        log_probs = F.log_softmax(logits + 1e-5, dim=-1)
        avg_probs = probs.mean(dim=0)
        avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
        sample_entropy = -(probs * log_probs).sum(dim=-1).mean()
        return sample_entropy - avg_entropy


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclass
class VQOutput:
    """Result of :meth:`VQModel.forward`.

    Attributes:
        recon: reconstruction ``[B, 3, H, W]``, not clamped (roughly [-1, 1] once trained).
        codes: code grid ``[B, H/ds, W/ds]`` (long).
        latents: L2-normalised encoder latents ``[B, H/ds, W/ds, codebook_dim]`` (with grad).
        recon_loss: pixel loss chosen by ``VQConfig.recon_loss`` (mean over all elements).
        codebook_loss: ``mean((q - sg[z])^2)``, moves the codebook towards the latents.
        commit_loss: ``mean((sg[q] - z)^2)``, unweighted; moves the latents towards their codes.
        entropy_loss: LlamaGen's entropy loss, unweighted (zero when ``entropy_weight == 0``).
        loss: ``recon_loss + codebook_loss + commit_beta * commit_loss + entropy_weight * entropy_loss``.
        restarted: codebook entries re-initialised in this call (dead-code restarts).
    """

    recon: Tensor
    codes: Tensor
    latents: Tensor
    recon_loss: Tensor
    codebook_loss: Tensor
    commit_loss: Tensor
    entropy_loss: Tensor
    loss: Tensor
    restarted: int = 0


class VQModel(nn.Module):
    """LlamaGen VQ tokenizer: encoder -> quant_conv -> vector quantizer -> post_quant_conv -> decoder.

    With the ``"llamagen-ds16"`` preset its state dict has exactly the keys and shapes of
    ``vq_ds16_t2i.pt["model"]``. Images are ``[B, 3, H, W]`` in ``[-1, 1]`` with H and W multiples of
    :attr:`downsample`; any aspect ratio works (the network is fully convolutional apart from global
    attention at the lowest resolution).
    """

    def __init__(self, config: VQConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VQConfig()
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return self.config.downsample

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of the code grid of an ``H x W`` image; raises if not divisible."""
        ds = self.downsample
        if height % ds or width % ds:
            raise ValueError(
                f"image size {width}x{height} (WxH) is not a multiple of the tokenizer's downsampling {ds}"
            )
        return height // ds, width // ds

    def _latents(self, images: Tensor) -> Tensor:
        """Normalised channel-last latents ``[B, R, C, D]`` of images ``[B, 3, H, W]``."""
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        rows, cols = self.grid_shape(images.shape[-2], images.shape[-1])
        if self.config.encoder_context == "patch":
            # [B, 3, R*ds, C*ds] -> [B*R*C, 3, ds, ds]: each patch is encoded as an image of its own.
            b, ch, ds = images.shape[0], images.shape[1], self.downsample
            patches = images.reshape(b, ch, rows, ds, cols, ds).permute(0, 2, 4, 1, 3, 5)
            z = self.quant_conv(self.encoder(patches.reshape(b * rows * cols, ch, ds, ds)))
            return F.normalize(z.reshape(b, rows, cols, -1), dim=-1)
        z = self.quant_conv(self.encoder(images))
        return F.normalize(z.permute(0, 2, 3, 1), dim=-1)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Tokenise images.

        Args:
            images: ``[B, 3, H, W]`` in ``[-1, 1]``; H and W multiples of :attr:`downsample`.

        Returns:
            ``(codes, latents)``: codes ``[B, H/ds, W/ds]`` (long), the nearest normalised codebook entry
            of each latent; latents ``[B, H/ds, W/ds, codebook_dim]``, the L2-normalised encoder output
            after ``quant_conv`` and before quantisation (Wallaroo's ``pixel_adapter`` input).

        Never touches the usage buffer; gradients flow into ``latents`` unless the caller disables them.
        """
        latents = self._latents(images)
        return self.quantize.nearest(latents), latents

    def codebook_vectors(self, codes: Tensor) -> Tensor:
        """``codes [...]`` (long) -> ``F.normalize(embedding.weight[codes], dim=-1)`` ``[..., codebook_dim]``.

        Wallaroo's ``gen_adapter`` input for image tokens."""
        return self.quantize.lookup(codes)

    def decode_latents(self, quantized: Tensor) -> Tensor:
        """Channel-last (quantised) latents ``[B, R, C, D]`` -> images ``[B, 3, R*ds, C*ds]`` (unclamped)."""
        return self.decoder(self.post_quant_conv(quantized.permute(0, 3, 1, 2)))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Code grid ``[B, R, C]`` (any R, C) -> images ``[B, 3, R*ds, C*ds]``.

        The output is not clamped: a trained decoder stays close to ``[-1, 1]``; clamp before
        converting to pixels.
        """
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, rows, cols], got shape {tuple(codes.shape)}")
        return self.decode_latents(self.codebook_vectors(codes))

    def forward(self, images: Tensor, pixel_weight: Tensor | None = None) -> VQOutput:
        """Reconstruct ``images`` through the quantiser with the straight-through estimator.

        For training the tokenizer from scratch; ``pixel_weight`` (optional, ``[B, 1, H, W]``) weights the
        reconstruction loss per pixel. In training mode it also records the codes in the
        ``codebook_used`` ring buffer and, if ``config.restart_dead_codes``, first re-initialises dead
        entries from this batch's latents (before the codebook enters the graph, so the in-place write
        is safe for autograd).
        """
        cfg = self.config
        latents = self._latents(images)
        restarted = 0
        if self.training and cfg.restart_dead_codes:
            restarted = self.quantize.restart_dead(latents)
        codes = self.quantize.nearest(latents)
        if self.training:
            self.quantize.record(codes)
        quantized = self.quantize.lookup(codes)
        codebook_loss = F.mse_loss(quantized, latents.detach())
        commit_loss = F.mse_loss(latents, quantized.detach())
        # Straight-through: the forward value is the code, the gradient goes to the encoder latents.
        recon = self.decode_latents(latents + (quantized - latents).detach())
        recon_loss = self._recon_loss(recon, images, pixel_weight)
        if cfg.entropy_weight > 0:
            entropy_loss = self.quantize.entropy_loss(latents)
        else:
            entropy_loss = recon_loss.new_zeros(())
        loss = recon_loss + codebook_loss + cfg.commit_beta * commit_loss + cfg.entropy_weight * entropy_loss
        return VQOutput(
            recon=recon,
            codes=codes,
            latents=latents,
            recon_loss=recon_loss,
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            entropy_loss=entropy_loss,
            loss=loss,
            restarted=restarted,
        )

    def _recon_loss(self, recon: Tensor, images: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
        """The pixel loss of ``VQConfig.recon_loss``: a mean over all elements, or with ``pixel_weight``
        (``[B, 1, H, W]``, broadcast over channels) the weighted mean ``sum(w * e) / sum(w)``."""
        kind = self.config.recon_loss
        diff = recon - images.to(recon.dtype)
        per_element = {"l2": diff.square(), "l1": diff.abs(), "l1+l2": diff.abs() + diff.square()}[kind]
        if pixel_weight is None:
            return per_element.mean()
        weight = pixel_weight.to(per_element.dtype)
        return (weight * per_element).mean() / weight.mean()

    @torch.no_grad()
    def usage(self) -> float:
        """Fraction of the codebook that appears among the recent codes recorded in training.

        Counts the last ``usage_window`` codes (fewer if fewer were recorded since construction). A model
        that recorded nothing reads its buffer as stored, like LlamaGen (a fresh one reports 1 entry).
        """
        return int(self.quantize.used_mask().sum()) / self.config.codebook_size


# --------------------------------------------------------------------------------------------------
# Construction and loading
# --------------------------------------------------------------------------------------------------


# Checkpoints that hold VQ weights also record the config those weights were trained with (this key at
# the checkpoint's top level). A preset can change under its name (``shapes-ds8`` moved to a per-patch
# encoder): the old weights still load strictly, same keys and shapes, but compute another tokenizer, so
# loaders compare the record with the config they build and refuse a mismatch.
VQ_STAMP_KEY = "wallaroo_vq_config"
# Fields that only steer training; every other field changes what given weights compute.
_TRAINING_ONLY_FIELDS = frozenset(
    {"dropout", "commit_beta", "entropy_weight", "entropy_temperature", "recon_loss", "restart_dead_codes",
     "usage_window"}
)  # fmt: skip


def vq_stamp(config: VQConfig) -> dict[str, Any]:
    """The fields of ``config`` that decide what its weights compute, as plain JSON values."""
    return {
        f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
        for f in fields(config)
        if f.name not in _TRAINING_ONLY_FIELDS
    }


def check_vq_stamp(stamp: Mapping[str, Any] | None, config: VQConfig, source: str) -> None:
    """Raise when weights stamped ``stamp`` (see :data:`VQ_STAMP_KEY`; ``None``: unstamped, nothing to
    check) were trained with another tokenizer than ``config`` describes. ``source`` names the file."""
    if stamp is None:
        return
    want = vq_stamp(config)
    diff = [f"{k}: trained {stamp[k]!r}, expected {want[k]!r}" for k in want if k in stamp and stamp[k] != want[k]]
    if diff:
        raise ValueError(
            f"{source}: its VQ weights were trained with another tokenizer config ({'; '.join(diff)}); loaded "
            "into this one they would tokenise wrongly. Retrain the tokenizer with the current preset, or "
            "build the VQ with the config it was trained with."
        )


def build_vq(preset_or_config: str | VQConfig = "llamagen-ds16", **overrides: object) -> VQModel:
    """Build a :class:`VQModel` from a preset name in :data:`VQ_PRESETS` or a :class:`VQConfig`.

    ``overrides`` replace config fields (e.g. ``build_vq("shapes-ds8", codebook_size=512)``).
    """
    if isinstance(preset_or_config, str):
        if preset_or_config not in VQ_PRESETS:
            raise KeyError(f"unknown VQ preset {preset_or_config!r}; known: {sorted(VQ_PRESETS)}")
        config = VQ_PRESETS[preset_or_config]
    else:
        config = preset_or_config
    if overrides:
        config = replace(config, **overrides)
    return VQModel(config)


def load_llamagen(path: str | os.PathLike[str], config: VQConfig | None = None) -> VQModel:
    """Load LlamaGen's ``vq_ds16_t2i.pt`` (or any checkpoint of the same layout) strictly.

    Accepts ``{"model": state_dict, ...}`` (the released container) or a bare state dict. Builds
    ``config`` (default: the ``"llamagen-ds16"`` preset) and returns it on CPU in eval mode, its tensors
    being the checkpoint's own (same dtype: fp32 for the released file). ``requires_grad`` is left on;
    freezing is the caller's business.

    Raises:
        ValueError: naming the file and every missing / unexpected / mis-shaped key.
    """
    config = config if config is not None else VQ_PRESETS["llamagen-ds16"]
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj["model"] if isinstance(obj, Mapping) and "model" in obj else obj
    if not isinstance(state, Mapping):
        raise ValueError(f"{os.fspath(path)}: expected a state dict or {{'model': state_dict}}, got {type(obj)}")
    # Built on the meta device and filled with assign=True: random init of 72M parameters would cost
    # seconds only to be overwritten.
    with torch.device("meta"):
        model = VQModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{os.fspath(path)} does not match the VQ layout of {config}: "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {mis_shaped}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
