"""Gaussian diffusion used by MAR's per-token diffusion head.

Reproduces the behaviour of the official MAR head diffusion (IDDPM-style, as configured by MAR):
cosine noise schedule over 1000 steps, optional respacing to fewer steps, epsilon prediction,
learned-range variance, plain MSE + variational-bound training loss and the ancestral sampler
with MAR's temperature.

Numerics follow the reference on purpose: every per-timestep table is computed once in float64
on the CPU and only cast to float32 at the moment it is gathered for a batch. The sampler output
is very sensitive at t=999 (alphas_cumprod ~ 2.4e-9), so computing the tables in float32 would
visibly change samples.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Tensor = torch.Tensor


def cosine_betas(num_diffusion_steps: int = 1000, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta), in float64."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # Python floats (IEEE double) keep this bit-identical to a scalar reference loop.
    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_steps) / alpha_bar(i / num_diffusion_steps), max_beta)
        for i in range(num_diffusion_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def space_timesteps(num_timesteps: int, spec: str | int | list[int]) -> list[int]:
    """Which original steps a respaced diffusion keeps (sorted).

    `spec` is "N" / N (N evenly spread steps), a comma list "a,b,..." (one count per equal
    section) or "ddimN" (a constant integer stride giving exactly N steps).
    """
    if isinstance(spec, str) and spec.startswith("ddim"):
        desired = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}")
    if isinstance(spec, int):
        counts = [spec]
    elif isinstance(spec, str):
        counts = [int(x) for x in spec.split(",")]
    else:
        counts = [int(x) for x in spec]

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate a float and round each value (Python round) -- this gives {0, 10, ..., 989, 999}
        # for 100 of 1000; other roundings would shift some kept steps by one.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def _gather(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """table[t] shaped [N, 1, ...] to broadcast against x, cast to x's dtype but at least float32
    (float32 for float32 / bf16 / fp16 x as the reference, float64 for a float64 x)."""
    out = table.to(t.device)[t].to(torch.promote_types(x.dtype, torch.float32))
    return out.view(-1, *([1] * (x.dim() - 1)))


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation of the standard normal CDF (what the reference loss uses).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log-probability of x under a Gaussian discretised into bins of width 2/255 on [-1, 1]."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The outermost bins extend to -inf / +inf.
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """Cosine-schedule diffusion, optionally respaced (MAR's `train_diffusion` / `gen_diffusion`).

    All `t` arguments are *respaced* indices in [0, num_timesteps); the denoiser is always called
    with the corresponding original-scale step `timestep_map[t]`.
    """

    def __init__(self, num_sampling_steps: str | int | None = None, num_diffusion_steps: int = 1000,
                 noise_schedule: str = "cosine"):
        # The tables live on the CPU in float64 even when a model is being built on the meta device
        # (checkpoint loading does that to avoid a random init): a meta table would hold no numbers.
        with torch.device("cpu"):
            self._build_tables(num_sampling_steps, num_diffusion_steps, noise_schedule)

    def _build_tables(self, num_sampling_steps, num_diffusion_steps, noise_schedule):
        if noise_schedule != "cosine":
            raise ValueError(f"only the 'cosine' noise schedule is supported, got {noise_schedule!r}")
        if num_sampling_steps is None or num_sampling_steps == "":
            num_sampling_steps = num_diffusion_steps  # the training diffusion: every step kept
        kept = space_timesteps(num_diffusion_steps, num_sampling_steps)
        if len(kept) < 2:
            # The reference builds posterior_log_variance_clipped from the posterior variance at
            # index 1 and crashes (IndexError); one ancestral step is not a usable sampler anyway.
            raise ValueError(f"num_sampling_steps={num_sampling_steps!r} keeps {len(kept)} step(s); "
                             "the ancestral sampler needs at least 2 steps")

        # Respacing: keep the original alphas_cumprod at the kept steps and derive new betas from
        # consecutive ratios, so q(x_t | x_0) is unchanged at every kept step.
        base_abar = torch.cumprod(1.0 - cosine_betas(num_diffusion_steps), dim=0)
        kept_t = torch.tensor(kept, dtype=torch.long)
        abar_kept = base_abar[kept_t]
        prev_kept = torch.cat([torch.ones(1, dtype=torch.float64), abar_kept[:-1]])
        betas = 1.0 - abar_kept / prev_kept

        self.timestep_map = kept_t
        self.num_timesteps = len(kept)
        self.betas = betas
        self.log_betas = torch.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = ac = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.sqrt_alphas_cumprod = torch.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / ac - 1.0)
        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t=0; its log is clipped by reusing the value at t=1.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * torch.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac)

    # ----------------------------------------------------------------------------------- forward
    def _check_t(self, x: Tensor, t: Tensor) -> None:
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [{x.shape[0]}], got {tuple(t.shape)}")

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        self._check_t(x0, t)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        return (_gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _gather(self.posterior_variance, t, x_t), _gather(self.posterior_log_variance_clipped, t, x_t)

    # ----------------------------------------------------------------------------------- reverse
    def p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_x0: float | None = None) -> dict:
        """p(x_{t-1} | x_t) from the net output [eps_hat | v] (learned-range variance).

        ``clip_x0``: clamp the x0 prediction to [-clip_x0, clip_x0] (MAR never clips: None). At the
        cosine schedule's last step x0 = x_t / sqrt(2.4e-9) - ..., so eps errors are amplified ~2e4x;
        a head trained for hours instead of days needs the clamp to sample (see docs)."""
        self._check_t(x_t, t)
        c = x_t.shape[1]
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != 2 * c:
            raise ValueError(f"model output must have shape [{x_t.shape[0]}, {2 * c}, ...], "
                             f"got {tuple(model_output.shape)}")
        eps, var_values = torch.split(model_output, c, dim=1)
        # v in [-1, 1] interpolates the log-variance between the posterior's (min) and beta_t (max);
        # it is deliberately not clamped.
        min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
        max_log = _gather(self.log_betas, t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                       - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)
        if clip_x0 is not None:
            pred_xstart = pred_xstart.clamp(-clip_x0, clip_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def training_losses(self, net_fn: Callable, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                        **net_kwargs) -> dict:
        """Per-row loss terms: mse (eps regression) + vb (variational bound in bits, trains v only)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        net_out = net_fn(x_t, self.timestep_map.to(t.device)[t], **net_kwargs)
        c = x0.shape[1]
        eps_hat, var_values = torch.split(net_out, c, dim=1)
        # The vb term must only train the variance: it sees a detached eps prediction.
        frozen = torch.cat([eps_hat.detach(), var_values], dim=1)
        reduce_dims = list(range(1, x0.dim()))

        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(frozen, x_t, t)
        kl = _normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = kl.mean(dim=reduce_dims) / math.log(2.0)
        # At t == 0 the bound's term is the decoder NLL of x0 itself.
        nll = -_discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = nll.mean(dim=reduce_dims) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)

        mse = ((noise - eps_hat) ** 2).mean(dim=reduce_dims)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "net_out": net_out}

    def p_sample_loop(self, denoise_fn: Callable, noise: Tensor, temperature=1.0,
                      randn: Callable | None = None, clip_x0: float | None = None, **net_kwargs) -> Tensor:
        """Ancestral sampling from `noise` through respaced steps S-1 .. 0 (differentiable: callers
        pick no_grad / inference_mode). ``clip_x0``: see :meth:`p_mean_variance` (default off, as MAR).

        One draw `randn(x.shape)` is made per step, the last one included (where it is multiplied by
        0), so the random stream is consumed exactly like the reference sampler's.
        """
        if randn is None:
            randn = lambda shape: torch.randn(shape, dtype=noise.dtype, device=noise.device)  # noqa: E731
        x = noise
        n = x.shape[0]
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, dtype=torch.long, device=x.device)
            t_orig = torch.full((n,), int(self.timestep_map[i]), dtype=torch.long, device=x.device)
            out = self.p_mean_variance(denoise_fn(x, t_orig, **net_kwargs), x, t, clip_x0)
            step_noise = randn(tuple(x.shape))
            nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
            x = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * step_noise * temperature
        return x
