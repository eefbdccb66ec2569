"""MAR: masked autoregressive image generation without vector quantisation (Li et al. 2024).

A bidirectional MAE-style encoder-decoder maps (class, visible tokens, mask) to a condition vector z_i
for every position; a small diffusion head (``DiffLoss``) models p(x_i | z_i) for each continuous
VAE token. Parameter names, shapes and the order of operations follow the official implementation
(LTH14/mar), so its checkpoints load with ``strict=True`` and produce the same numbers.

Reading order: config -> tokens (patchify) -> masking -> encoder -> decoder -> training loss.
The generation loop lives in ``marval_rl.sampling`` (one loop for every token sampler).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from marval_rl.models.architectures import register_architecture
from marval_rl.models.head import DiffLoss, DiffusionSampler
from marval_rl.models.transformer import Block


@dataclass
class MARConfig:
    """Constructor arguments of the official ``MAR`` class (same names), plus ``norm_layer_eps``.

    The official class defaults to LayerNorm eps 1e-5, but every released model is built by a factory
    that passes eps 1e-6; 1e-6 is therefore our default. ``num_sampling_steps`` is a string, as in
    the official code ("100" = 100 respaced steps of the 1000-step cosine schedule).
    """

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_layer_eps: float = 1e-6
    vae_embed_dim: int = 16
    mask_ratio_min: float = 0.7
    label_drop_prob: float = 0.1
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 64
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    grad_checkpointing: bool = False
    # Not an official argument: clamp the head sampler's x0 prediction to +-head_clip_x0 (None = never,
    # as MAR). A small head trained for minutes predicts eps at t = 999 less exactly than a released
    # one, and the cosine schedule amplifies that error ~2e4x there (1 / sqrt(alphabar_999), alphabar_999
    # ~ 2.4e-9; docs/distill.md, "student parameterisation").
    head_clip_x0: Optional[float] = None

    def __post_init__(self):
        self.num_sampling_steps = str(self.num_sampling_steps)
        if not isinstance(self.class_num, int) or self.class_num < 1:
            raise ValueError(f"class_num must be an integer >= 1, got {self.class_num!r}")
        if self.img_size % (self.vae_stride * self.patch_size) != 0:
            raise ValueError(f"img_size {self.img_size} is not divisible by vae_stride*patch_size "
                             f"= {self.vae_stride * self.patch_size}")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MARConfig":
        """Build from an official constructor-argument dict (a ``factory`` entry selects the base)."""
        d = dict(d)
        factory = d.pop("factory", None)
        if factory is not None and factory not in FACTORIES:
            raise ValueError(f"unknown MAR factory {factory!r}; known: {sorted(FACTORIES)}")
        base = FACTORIES[factory]() if factory else {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MAR config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**{**base, **d})


# Released model sizes. The head size is not part of the official factories (it is a CLI flag);
# these are the values the released checkpoints were trained with.
FACTORIES: dict[str, Any] = {
    "mar_base": lambda: dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                             decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                             diffloss_d=6, diffloss_w=1024),
    "mar_large": lambda: dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16,
                              decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                              diffloss_d=8, diffloss_w=1280),
    "mar_huge": lambda: dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                             decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                             diffloss_d=12, diffloss_w=1536),
}


def resolve_mar_config(config: "MARConfig | dict | str | None" = None, **overrides) -> MARConfig:
    """Accept a MARConfig, an official constructor dict, or a factory name ("mar_base", ...)."""
    if isinstance(config, MARConfig):
        return dataclasses.replace(config, **overrides) if overrides else config
    if isinstance(config, str):
        if config not in FACTORIES:
            raise ValueError(f"unknown MAR factory {config!r}; known: {sorted(FACTORIES)}")
        config = {"factory": config}
    return MARConfig.from_dict({**(config or {}), **overrides})


@register_architecture("mar")
class MAR(nn.Module):
    config_class = MARConfig

    def __init__(self, config: MARConfig | dict | str | None = None, build_head: bool = True, **overrides):
        super().__init__()
        cfg = self.config = resolve_mar_config(config, **overrides)
        self.seq_h = self.seq_w = cfg.img_size // cfg.vae_stride // cfg.patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = cfg.vae_embed_dim * cfg.patch_size ** 2
        self.buffer_size = cfg.buffer_size
        enc, dec = cfg.encoder_embed_dim, cfg.decoder_embed_dim
        total = cfg.buffer_size + self.seq_len

        # The five bare parameters come first in the official state dict, in this order.
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))            # the "null class" for CFG
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, enc))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, dec))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dec))

        self.class_emb = nn.Embedding(cfg.class_num, enc)
        self.z_proj = nn.Linear(self.token_embed_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)  # always 1e-6, whatever norm_layer_eps says
        block = dict(mlp_ratio=cfg.mlp_ratio, norm_eps=cfg.norm_layer_eps,
                     attn_drop=cfg.attn_dropout, proj_drop=cfg.proj_dropout)
        self.encoder_blocks = nn.ModuleList(
            [Block(enc, cfg.encoder_num_heads, **block) for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(enc, eps=cfg.norm_layer_eps)
        self.decoder_embed = nn.Linear(enc, dec)
        self.decoder_blocks = nn.ModuleList(
            [Block(dec, cfg.decoder_num_heads, **block) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dec, eps=cfg.norm_layer_eps)

        if build_head:  # a one-step student (MARVAL) replaces the diffusion head with its own
            self.diffloss = DiffLoss(target_channels=self.token_embed_dim, z_channels=dec,
                                     depth=cfg.diffloss_d, width=cfg.diffloss_w,
                                     num_sampling_steps=cfg.num_sampling_steps,
                                     grad_checkpointing=cfg.grad_checkpointing, clip_x0=cfg.head_clip_x0)
        self.diffusion_batch_mul = cfg.diffusion_batch_mul
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: N(0, .02) embeddings, xavier Linears with zero bias, LayerNorm 1/0.

        The head initialises itself (zero adaLN / output layers) in its own constructor."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token,
                  self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("diffloss"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ tokens
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] latents -> [B, h*w, C*p*p] tokens in raster order (channel slowest in a token)."""
        p, c = self.config.patch_size, self.config.vae_embed_dim
        if latents.dim() != 4 or latents.shape[1] != c or latents.shape[2] != self.seq_h * p \
                or latents.shape[3] != self.seq_w * p:
            raise ValueError(f"expected latents [B, {c}, {self.seq_h * p}, {self.seq_w * p}], "
                             f"got {tuple(latents.shape)}")
        b = latents.shape[0]
        x = latents.reshape(b, c, self.seq_h, p, self.seq_w, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(b, self.seq_len, c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.config.vae_embed_dim
        b = tokens.shape[0]
        x = tokens.reshape(b, self.seq_h, self.seq_w, c, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    # ----------------------------------------------------------------- masking
    def sample_orders(self, bsz: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random permutation of the token positions per sample ([B, L], int64)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        keys = torch.rand(bsz, self.seq_len, generator=generator, device=dev)
        return keys.argsort(dim=1).to(self.device)

    def sample_mask_rate(self, generator: torch.Generator | None = None,
                         mask_ratio_min: float | None = None) -> float:
        """One mask ratio for the whole batch: N(1, 0.25) truncated to [mask_ratio_min, 1].

        Same law as the official scipy truncnorm draw, sampled by inverse CDF from a torch generator."""
        lo = ((self.config.mask_ratio_min if mask_ratio_min is None else mask_ratio_min) - 1.0) / 0.25
        phi = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand((), generator=generator, device=dev, dtype=torch.float64).item()
        p = phi(lo) + u * (phi(0.0) - phi(lo))
        return 1.0 + 0.25 * math.sqrt(2.0) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()

    def mask_from_orders(self, orders: torch.Tensor, num_masked: int) -> torch.Tensor:
        """mask[b, orders[b, :num_masked]] = 1 (float; 1 = masked / to predict)."""
        mask = torch.zeros(orders.shape, device=orders.device)
        return mask.scatter(1, orders[:, :num_masked], 1.0)

    # ----------------------------------------------------------------- encoder
    def class_embedding(self, labels: torch.Tensor | None, bsz: int,
                        label_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Class embedding per sample; ``labels=None`` gives the learned null class (fake_latent)."""
        if labels is None:
            return self.fake_latent.expand(bsz, -1)
        labels = torch.as_tensor(labels, device=self.device)
        if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.class_num):
            raise ValueError(f"labels must lie in [0, {self.config.class_num}), got "
                             f"min {labels.min().item()} max {labels.max().item()}")
        emb = self.class_emb(labels)
        if label_drop is not None:
            drop = label_drop.to(emb.dtype).unsqueeze(-1)
            emb = drop * self.fake_latent + (1 - drop) * emb
        return emb

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            if self.config.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_mae_encoder(self, tokens: torch.Tensor, mask: torch.Tensor,
                            class_embedding: torch.Tensor) -> torch.Tensor:
        """Encode buffer + visible tokens. Every sample must have the same number of masked tokens."""
        x = self.z_proj(tokens)
        b, _, d = x.shape
        x = torch.cat([class_embedding.unsqueeze(1).expand(b, self.buffer_size, d).to(x.dtype), x], dim=1)
        x = x + self.encoder_pos_embed_learned  # added before the LayerNorm, as in the official code
        x = self.z_proj_ln(x)
        visible = torch.cat([torch.ones(b, self.buffer_size, device=mask.device, dtype=torch.bool),
                             mask == 0], dim=1)
        x = x[visible].reshape(b, -1, d)
        return self.encoder_norm(self._blocks(self.encoder_blocks, x))

    # ----------------------------------------------------------------- decoder
    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scatter encoder outputs back, fill masked slots with mask_token, return z [B, L, D_dec]."""
        x = self.decoder_embed(x)
        b = x.shape[0]
        visible = torch.cat([torch.ones(b, self.buffer_size, device=mask.device, dtype=torch.bool),
                             mask == 0], dim=1)
        full = self.mask_token.to(x.dtype).expand(b, visible.shape[1], -1).clone()
        full[visible] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned
        x = self.decoder_norm(self._blocks(self.decoder_blocks, x))
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def condition(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None,
                  label_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token head condition z [B, L, D_dec] (no random label drop; pass ``label_drop`` to drop)."""
        b = tokens.shape[0]
        if tokens.dim() != 3 or tokens.shape[1:] != (self.seq_len, self.token_embed_dim):
            raise ValueError(f"expected tokens [B, {self.seq_len}, {self.token_embed_dim}], "
                             f"got {tuple(tokens.shape)}")
        if mask.shape != (b, self.seq_len):
            raise ValueError(f"expected mask [B, {self.seq_len}], got {tuple(mask.shape)}")
        counts = mask.sum(dim=1)
        if b and not bool((counts == counts[0]).all()):
            raise ValueError("every sample must have the same number of masked tokens "
                             f"(got {counts.tolist()})")
        emb = self.class_embedding(labels, b, label_drop)
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, emb), mask)

    def guided_condition(self, tokens: torch.Tensor, mask: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG pair (z_cond, z_uncond), each [B, L, D_dec]: one backbone pass on the batch
        twice, with the class and with the null class (fake_latent), as the official sampler does."""
        b = tokens.shape[0]
        two = torch.cat([mask, mask])
        emb = torch.cat([self.class_embedding(labels, b), self.fake_latent.expand(b, -1)])
        z = self.forward_mae_decoder(self.forward_mae_encoder(torch.cat([tokens, tokens]), two, emb), two)
        return z[:b], z[b:]

    # -------------------------------------------------------------------- loss
    def forward(self, latents: torch.Tensor, labels: torch.Tensor, *,
                orders: torch.Tensor | None = None, mask_rate: float | None = None,
                label_drop: torch.Tensor | None = None, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                return_terms: bool = False):
        """MAR training loss on latents [B, C, H, W] (already scaled by the VAE latent scale).

        Random draws, in the official order (each may be supplied instead): orders, mask ratio,
        label drop (train mode only), head timesteps, head noise."""
        tokens = self.patchify(latents)
        b = tokens.shape[0]
        if orders is None:
            orders = self.sample_orders(b, generator)
        if mask_rate is None:
            mask_rate = self.sample_mask_rate(generator)
        mask = self.mask_from_orders(orders, int(math.ceil(self.seq_len * mask_rate)))
        if label_drop is None and self.training and self.config.label_drop_prob > 0:
            dev = generator.device if generator is not None else torch.device("cpu")
            label_drop = torch.rand(b, generator=generator, device=dev).to(self.device) \
                < self.config.label_drop_prob
        if not self.training:
            label_drop = None
        z = self.condition(tokens, mask, labels, label_drop)

        mul = self.diffusion_batch_mul  # tiled, not interleaved: [all rows; all rows; ...]
        target = tokens.reshape(b * self.seq_len, -1).detach().repeat(mul, 1)
        z_rows = z.reshape(b * self.seq_len, -1).repeat(mul, 1)
        mask_rows = mask.reshape(-1).repeat(mul)
        terms = self.diffloss.loss_terms(target, z_rows, t=t, noise=noise, generator=generator)
        loss = (terms["loss"] * mask_rows).sum() / mask_rows.sum()
        if return_terms:
            return loss, dict(terms, z=z, mask=mask, orders=orders, mask_rate=mask_rate)
        return loss

    def default_token_sampler(self):
        """The token sampler generation uses unless told otherwise: the 100-step diffusion chain."""
        return DiffusionSampler(self.diffloss)

    @property
    def device(self) -> torch.device:
        return self.fake_latent.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype; generation follows it (``sample_tokens`` tokens, head features)."""
        return self.fake_latent.dtype


def mar_base(**kw) -> MAR:
    return MAR("mar_base", **kw)


def mar_large(**kw) -> MAR:
    return MAR("mar_large", **kw)


def mar_huge(**kw) -> MAR:
    return MAR("mar_huge", **kw)
