"""MAR's per-token diffusion head: the denoiser MLP (`SimpleMLPAdaLN`) and `DiffLoss`.

State-dict names and registration order match the official checkpoints, so inside MAR (attribute
`diffloss`) the keys read `diffloss.net.time_embed.mlp.0.weight`, ... exactly as released.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .diffusion import GaussianDiffusion

Tensor = torch.Tensor


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal features of integer timesteps (original 1000-step scale): [cos | sin], in ``dtype``.

    Computed in float64 for a float64 ``dtype`` and in float32 (the reference's arithmetic) otherwise,
    then cast: in bf16 / fp16 the angles t * f (up to 999 rad) would keep no usable phase."""
    half = dim // 2
    work = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=work, device=t.device) / half)
    args = t[:, None].to(work) * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats.to(dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_features(t, self.frequency_embedding_size, dtype=self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift), with (shift, scale, gate) predicted from y."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)  # no parameters
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Denoiser: (x_t [N, in], t [N] int64 original scale, c [N, z]) -> [eps | v] of [N, out]."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.grad_checkpointing = grad_checkpointing
        # Registration order fixes the state-dict order of the official checkpoints.
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero adaLN outputs and output layer: an untrained head predicts exactly 0.
        zero = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _check(self, x: Tensor, t: Tensor, c: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}], got {tuple(x.shape)}")
        if c.dim() != 2 or c.shape[1] != self.z_channels:
            raise ValueError(f"c must be [N, {self.z_channels}], got {tuple(c.shape)}")
        if t.dim() != 1 or not (x.shape[0] == t.shape[0] == c.shape[0]):
            raise ValueError(f"row counts differ: x {tuple(x.shape)}, t {tuple(t.shape)}, c {tuple(c.shape)}")

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """Runs in the parameters' dtype (x and c are cast to it); the output has that dtype."""
        self._check(x, t, c)
        dtype = self.input_proj.weight.dtype
        h = self.input_proj(x.to(dtype))
        y = self.time_embed(t) + self.cond_embed(c.to(dtype))
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, y, use_reentrant=False)
            else:
                h = block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale) -> Tensor:
        """Classifier-free guidance; c = [cond rows; uncond rows].

        Only the first half of x is read (duplicated for both halves). eps is guided and written to
        both halves; the variance values v are not guided (each half keeps its own).
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even number of rows, got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, eps.shape[0] // 2, dim=0)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """MAR's diffusion head: per-token diffusion loss for training and the token sampler."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps: str | int = "100", grad_checkpointing: bool = False,
                 clip_x0: float | None = None):
        super().__init__()
        self.in_channels = target_channels
        self.clip_x0 = clip_x0  # sampler's x0 clamp; None (never) for official models
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth,
                                  grad_checkpointing=grad_checkpointing)
        # Plain objects (not buffers), so the state dict only holds `net.*` as in the checkpoints.
        self.train_diffusion = GaussianDiffusion(None)
        self.gen_diffusion = GaussianDiffusion(num_sampling_steps)

    def loss_terms(self, target: Tensor, z: Tensor, t: Tensor | None = None, noise: Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict:
        """Per-row dict(loss, mse, vb, net_out). Draws t first, then noise (the reference order)."""
        if target.dim() != 2 or target.shape[1] != self.in_channels:
            raise ValueError(f"target must be [N, {self.in_channels}], got {tuple(target.shape)}")
        if z.shape[0] != target.shape[0]:
            raise ValueError(f"target has {target.shape[0]} rows but z has {z.shape[0]}")
        n = target.shape[0]
        # Draw on the generator's device (a CPU generator may drive a GPU model), then move.
        dev = generator.device if generator is not None else target.device
        if t is None:
            t = torch.randint(0, self.train_diffusion.num_timesteps, (n,), generator=generator,
                              device=dev).to(target.device)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, dtype=target.dtype,
                                device=dev).to(target.device)
        return self.train_diffusion.training_losses(self.net, target, t, noise, c=z)

    def forward(self, target: Tensor, z: Tensor, mask: Tensor | None = None, t: Tensor | None = None,
                noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        loss = self.loss_terms(target, z, t=t, noise=noise, generator=generator)["loss"]
        if mask is not None:
            return (loss * mask).sum() / mask.sum()
        return loss.mean()

    def sample(self, z: Tensor, temperature=1.0, cfg=1.0, randn: Callable | None = None,
               diffusion: GaussianDiffusion | None = None, clip_x0: float | None = None) -> Tensor:
        """Sample tokens for conditions z; returns all rows (with cfg != 1 keep the first half).

        Every Gaussian draw goes through `randn(shape)`: first the initial noise, then one draw of
        [rows, C] per sampler step.
        """
        if randn is None:
            randn = lambda shape: torch.randn(shape, device=z.device)  # noqa: E731
        # The chain's state x is in the net's dtype but at least float32 (a bf16 net gets a float32
        # state): at t = 999 the x0 estimate is a difference of two terms ~2e4 times the token scale.
        state = torch.promote_types(self.net.input_proj.weight.dtype, torch.float32)
        diffusion = self.gen_diffusion if diffusion is None else diffusion
        clip_x0 = self.clip_x0 if clip_x0 is None else clip_x0
        if z.dim() != 2 or z.shape[1] != self.net.z_channels:
            raise ValueError(f"z must be [N, {self.net.z_channels}], got {tuple(z.shape)}")
        if not cfg == 1.0:
            if z.shape[0] % 2:
                raise ValueError(f"with cfg != 1, z must hold [cond; uncond] rows (even count), got {z.shape[0]}")
            # cond and uncond halves share the same initial noise.
            noise = randn((z.shape[0] // 2, self.in_channels)).to(state)
            noise = torch.cat([noise, noise], dim=0)
            return diffusion.p_sample_loop(self.net.forward_with_cfg, noise, temperature, randn, clip_x0,
                                           c=z, cfg_scale=cfg)
        noise = randn((z.shape[0], self.in_channels)).to(state)
        return diffusion.p_sample_loop(self.net.forward, noise, temperature, randn, clip_x0, c=z)


class DiffusionSampler:
    """The teacher's token sampler: MAR's ancestral diffusion chain (100 respaced steps by default).

    ``num_steps=1`` is not an ancestral chain (that needs >= 2 steps): it is one denoiser call at
    t = 999 returning the implied x0 = (x_T - sqrt(1 - ab) eps) / sqrt(ab). That is what a 100-step
    head degrades to when asked for one step, the baseline a one-step student must beat.
    """

    def __init__(self, diffloss, num_steps: int | str | None = None):
        if isinstance(num_steps, bool) or (isinstance(num_steps, numbers.Real) and (num_steps != int(num_steps) or num_steps < 1)):
            raise ValueError(f"num_steps (diffusion-head steps) must be an integer >= 1 or None (the model's), "
                             f"got {num_steps!r}")
        self.diffloss = diffloss
        self.one_call = num_steps is not None and int(num_steps) == 1
        self.diffusion = None if num_steps is None or self.one_call else GaussianDiffusion(str(num_steps))

    def _one_call(self, z_cond, z_uncond, cfg, randn):
        n, net = z_cond.shape[0], self.diffloss.net
        x = randn((n, self.diffloss.in_channels))
        t_top = self.diffloss.train_diffusion.num_timesteps - 1
        t = torch.full((n,), t_top, dtype=torch.long, device=x.device)
        if z_uncond is None:
            eps = net(x, t, z_cond)[:, : x.shape[1]]
        else:
            eps = net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z_cond, z_uncond]),
                                       cfg)[:n, : x.shape[1]]
        ab = float(self.diffloss.train_diffusion.alphas_cumprod[t_top])
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        return x0 if self.diffloss.clip_x0 is None else x0.clamp(-self.diffloss.clip_x0, self.diffloss.clip_x0)

    def __call__(self, z_cond, z_uncond, cfg, temperature, randn):
        if self.one_call:
            return self._one_call(z_cond, z_uncond, cfg, randn)
        z = z_cond if z_uncond is None else torch.cat([z_cond, z_uncond])
        x = self.diffloss.sample(z, temperature=temperature, cfg=cfg, randn=randn,
                                 diffusion=self.diffusion)
        return x[: z_cond.shape[0]]
