"""KL-regularised convolutional autoencoder (the "KL-16" VAE used by MAR).

This is the LDM-style ``AutoencoderKL`` that MAR uses as its image tokenizer. The module layout and parameter
names match the official ``kl16.ckpt`` state dict exactly (same keys, same order), so a checkpoint loads with
``load_state_dict(strict=True)``. Checkpoint I/O lives in :mod:`marval_rl.models.checkpoints`.

Architecture in one paragraph: an encoder of ``len(ch_mult)`` resolution levels (ResNet blocks, optional
single-head self-attention, stride-2 downsampling between levels) maps an image in [-1, 1] to the 2*z moments of
a diagonal Gaussian; 1x1 ``quant_conv`` / ``post_quant_conv`` convs sit between the autoencoder and the latent
space; a mirrored decoder (one extra ResNet block per level, nearest-neighbour upsampling) maps a latent back to
an image. MAR's tokens are ``latent * latent_scale`` (0.2325 for KL-16, roughly 1/std of ImageNet latents).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from marval_rl.models.architectures import register_architecture

__all__ = ["VAEConfig", "DiagonalGaussian", "AutoencoderKL", "kl16_config", "build_vae"]


# ---- Configuration --------------------------------------------------------------------------------------------
@dataclass
class VAEConfig:
    """Hyper-parameters of :class:`AutoencoderKL`; the defaults are the official KL-16 model.

    ``resolution`` is the *nominal* training resolution. It only decides where encoder attention sits (levels
    whose nominal resolution ``resolution / 2**level`` is in ``attn_resolutions``); the network itself is fully
    convolutional and accepts any input whose sides are multiples of :attr:`stride`. ``attn_resolutions``
    applies to the encoder only: MAR's decoder has no attention outside its middle block.
    """

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    dropout: float = 0.0
    latent_scale: float = 0.2325
    num_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        for name in ("embed_dim", "ch", "num_res_blocks", "resolution", "z_channels", "in_channels",
                     "out_channels", "num_groups"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VAEConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.ch_mult or min(self.ch_mult) <= 0:
            raise ValueError(f"VAEConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.latent_scale <= 0:
            raise ValueError(f"VAEConfig.latent_scale must be positive, got {self.latent_scale}")
        # Every GroupNorm in the network sees ch * m channels for some m in ch_mult (or ch itself).
        for width in sorted({self.ch} | {self.ch * m for m in self.ch_mult}):
            if width % self.num_groups:
                raise ValueError(f"VAEConfig: channel width {width} (ch={self.ch}, ch_mult={self.ch_mult}) is not "
                                 f"divisible by num_groups={self.num_groups}; GroupNorm needs equal-sized groups")

    @property
    def stride(self) -> int:
        """Spatial down-sampling factor between image and latent (16 for KL-16)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"unknown VAEConfig key {key!r}; valid keys: {sorted(known)}")
        return cls(**dict(data))


def kl16_config() -> VAEConfig:
    """The official MAR KL-16 VAE (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``, 66.5M params)."""
    return VAEConfig()


# ---- Posterior ------------------------------------------------------------------------------------------------
class DiagonalGaussian:
    """Diagonal Gaussian posterior built from the encoder's 2C-channel ``moments`` (mean and log-variance).

    Cached-latent datasets store the raw moments, so ``DiagonalGaussian(moments)`` rebuilds the posterior.
    """

    def __init__(self, moments: torch.Tensor):
        if moments.dim() < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments must have an even channel dim 1 (mean ++ logvar), got {tuple(moments.shape)}")
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        # Same clamp as LDM: keeps exp() finite for untrained or adversarial inputs.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draw on the generator's device (a CPU generator cannot feed a CUDA randn) in float32, so a seed gives
        # the same noise whatever the model's device or dtype; then move it next to the mean.
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example, summed over all non-batch dims (LDM convention)."""
        dims = list(range(1, self.mean.dim()))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


# ---- Building blocks ------------------------------------------------------------------------------------------
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1-projected) skip connection."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 projection on the skip path only when the width changes (Identity has no state-dict entries).
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as the q/k/v/output projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, HW, C]; SDPA scales by C^-0.5 like the original bmm formulation.
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """3x3 stride-2 conv after a zero pad of one pixel on the right and bottom only.

    Symmetric ``padding=1`` would also give H/2 x W/2, but its sampling grid is shifted by one pixel; the
    pretrained weights expect LDM's asymmetric (TF "SAME"-style) padding, so parity needs exactly this pad."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv (avoids transposed-conv checkerboard artefacts)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups, dropout)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups, dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


# ---- Encoder / decoder ----------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments-to-be [B, 2*z_channels, H/stride, W/stride]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.num_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, block_out in enumerate(widths):
            # Attention placement uses the *nominal* resolution (256 for KL-16), not the actual input size, so a
            # 32 px test image still gets attention at level 4, exactly like the pretrained model at 256 px.
            nominal_res = cfg.resolution // 2**level
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, g, cfg.dropout))
                block_in = block_out
                if nominal_res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            stage.downsample = Downsample(block_in) if level != len(widths) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = _mid(block_in, g, cfg.dropout)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)  # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_channels, h*stride, w*stride]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, widths = cfg.num_groups, [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, g, cfg.dropout)
        # Built from the lowest resolution up (that is the channel flow), but stored by level index so that
        # ``up.0`` is the full-resolution stage, as in the checkpoint. One more block per level than the encoder.
        stages: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, widths[level], g, cfg.dropout))
                block_in = widths[level]
            stage.upsample = Upsample(block_in) if level != 0 else nn.Identity()
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):  # executed from the lowest resolution (last index) down to up.0
            for block in stage.block:
                h = block(h)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---- Autoencoder ----------------------------------------------------------------------------------------------
@register_architecture("vae")
class AutoencoderKL(nn.Module):
    """Encoder + decoder with the KL latent interface used by MAR (see module docstring)."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig | Mapping[str, Any] | None = None):
        super().__init__()
        if config is None:
            config = kl16_config()
        elif not isinstance(config, VAEConfig):
            config = VAEConfig.from_dict(config)
        self.config = config
        # Registration order fixes the state-dict order: encoder, decoder, quant_conv, post_quant_conv.
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def _check_images(self, images: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != cfg.in_channels:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape [B, {cfg.in_channels}, H, W], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images in [-1, 1], got dtype {images.dtype}; "
                             "convert uint8 images with x.float() / 127.5 - 1")
        h, w = images.shape[-2:]
        if h % cfg.stride or w % cfg.stride:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE stride {cfg.stride}")
        if images.numel():
            lo, hi = (t.item() for t in torch.aminmax(images.detach()))
            if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(f"expected images in [-1, 1], got min {lo:.4g} max {hi:.4g}; "
                                 "did you pass [0, 1] or uint8 images?")

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over latents [B, embed_dim, H/stride, W/stride]."""
        self._check_images(images)
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images [B, 3, h*stride, w*stride] (roughly in [-1, 1])."""
        if latents.dim() != 4 or latents.shape[1] != self.config.embed_dim:
            raise ValueError(f"expected latents of shape [B, {self.config.embed_dim}, h, w], "
                             f"got {tuple(latents.shape)}")
        return self.decoder(self.post_quant_conv(latents))

    def encode_tokens(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """MAR tokens: a posterior *sample* (MAR's training convention) or its mean, times ``latent_scale``."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample else posterior.mode()
        return latents * self.config.latent_scale

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_tokens`: ``decode(tokens / latent_scale)``."""
        return self.decode(tokens / self.config.latent_scale)

    def decode_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens to images in [0, 1] (clamped), the form rewards, grids and metrics take; in the tokens'
        dtype (under bf16 autocast the decoder computes in bf16, the images come back float32)."""
        return ((self.decode_tokens(tokens) + 1) / 2).clamp(0, 1).to(tokens.dtype)


def build_vae(config: VAEConfig | Mapping[str, Any] | None = None) -> AutoencoderKL:
    """Build an (untrained) :class:`AutoencoderKL`; ``None`` gives the official KL-16 architecture."""
    return AutoencoderKL(config)
