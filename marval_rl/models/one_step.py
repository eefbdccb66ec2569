"""MARVAL's student: the MAR backbone with a one-step token generator in place of the diffusion chain.

``OneStepHead`` is g_theta(noise, z): the teacher's denoiser architecture (SimpleMLPAdaLN), called
once at a fixed timestep t* on pure noise, read as an x0 prediction:

    x = (noise - sqrt(1 - ab_t*) * eps_theta(noise, t*, z)) / sqrt(ab_t*)

Initialised from the teacher's head, the student therefore starts as the teacher's one-step
denoised guess E[x0 | x_t* = noise, z] and distillation only has to sharpen it. t* defaults to 950
(ab ~ 6e-3) rather than 999: the cosine schedule's last step has ab ~ 2.4e-9, which would multiply
every eps error by ~2e4 and make the initial generator (and its gradients) explode.

The student is conditioned on the *conditional* backbone output only: classifier-free guidance is
distilled into it (the GSIM teacher score is the guided one), so sampling runs with cfg = 1 and
one backbone pass per AR step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from marval_rl.models.architectures import register_architecture
from marval_rl.models.diffusion import cosine_betas
from marval_rl.models.head import SimpleMLPAdaLN
from marval_rl.models.mar import MAR, MARConfig


class OneStepHead(nn.Module):
    """g_theta(noise [N, C], z [N, D]) -> tokens [N, C]."""

    def __init__(self, token_channels: int, z_channels: int, width: int, depth: int, init_timestep: int = 950):
        super().__init__()
        if not 0 < init_timestep < 1000:
            raise ValueError(f"init_timestep must be in (0, 1000), got {init_timestep}")
        self.token_channels, self.init_timestep = token_channels, init_timestep
        self.net = SimpleMLPAdaLN(token_channels, width, 2 * token_channels, z_channels, depth)
        with torch.device("cpu"):  # a constant, also when the model is built on the meta device
            ab = float(torch.cumprod(1 - cosine_betas(1000), 0)[init_timestep])
        self.sqrt_ab, self.sqrt_1m_ab = ab ** 0.5, (1 - ab) ** 0.5

    @classmethod
    def from_teacher(cls, teacher_net: SimpleMLPAdaLN, init_timestep: int = 950) -> "OneStepHead":
        ref = next(teacher_net.parameters())
        head = cls(teacher_net.in_channels, teacher_net.z_channels, teacher_net.model_channels,
                   len(teacher_net.res_blocks), init_timestep).to(ref.dtype)  # the teacher's dtype, exactly
        head.net.load_state_dict(teacher_net.state_dict())
        return head.to(ref.device)

    def forward(self, noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if noise.shape[0] != z.shape[0] or noise.shape[1] != self.token_channels:
            raise ValueError(f"noise must be [N, {self.token_channels}] with N = z rows; got "
                             f"{tuple(noise.shape)} and z {tuple(z.shape)}")
        t = torch.full((noise.shape[0],), self.init_timestep, dtype=torch.long, device=noise.device)
        # outside autocast, always: x0 = (noise - sqrt(1-ab) eps) / sqrt(ab) amplifies eps's error
        # 1/sqrt(ab) ~ 13x at t = 950 (bf16 eps moved the embedded student's tokens by 4% of their std
        # in one step); the head is < 1% of a MAR-B step's FLOPs, so this costs nothing measurable
        with torch.autocast(noise.device.type, enabled=False):
            eps = self.net(noise, t, z)[:, : self.token_channels]
        return (noise - self.sqrt_1m_ab * eps) / self.sqrt_ab


class OneStepSampler:
    """Token sampler for the AR loop: one draw of noise, one head call, per AR step.

    ``temperature`` scales the input noise (1 = the distribution the student was distilled to)."""

    def __init__(self, head: OneStepHead):
        self.head = head

    def __call__(self, z_cond, z_uncond, cfg, temperature, randn):
        if z_uncond is not None:
            raise ValueError("a MARVAL student has guidance distilled in: sample it with cfg=1")
        noise = randn((z_cond.shape[0], self.head.token_channels))
        return self.head(noise * temperature, z_cond)


@dataclass
class MARVALConfig:
    mar: dict = field(default_factory=dict)    # MARConfig fields of the backbone (and the teacher's head size)
    init_timestep: int = 950

    def __post_init__(self):
        if isinstance(self.mar, MARConfig):
            self.mar = self.mar.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MARVALConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MARVAL config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)


@register_architecture("marval")
class MARVAL(MAR):
    """A MAR backbone (official key names) + ``one_step`` head; no 100-step diffusion head."""

    config_class = MARVALConfig

    def __init__(self, config: MARVALConfig | dict):
        if isinstance(config, dict):
            config = MARVALConfig.from_dict(config)
        super().__init__(MARConfig.from_dict(config.mar), build_head=False)
        self.student_config = config
        c = self.config
        self.one_step = OneStepHead(self.token_embed_dim, c.decoder_embed_dim, c.diffloss_w, c.diffloss_d,
                                    config.init_timestep)

    @classmethod
    def from_teacher(cls, teacher: MAR, init_timestep: int = 950) -> "MARVAL":
        student = cls(MARVALConfig(mar=teacher.config.to_dict(), init_timestep=init_timestep)).to(teacher.dtype)
        own = student.state_dict()
        own.update({k: v for k, v in teacher.state_dict().items() if not k.startswith("diffloss.")})
        own.update({f"one_step.net.{k}": v for k, v in teacher.diffloss.net.state_dict().items()})
        student.load_state_dict(own)
        return student.to(teacher.device).train(teacher.training)

    def default_token_sampler(self):
        return OneStepSampler(self.one_step)

    def forward(self, *args, **kwargs):
        raise TypeError("a MARVAL student has no diffusion training loss; train it with `marval-rl distill`")

    def checkpoint_config(self) -> dict:
        return self.student_config.to_dict()
