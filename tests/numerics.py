"""Float32 error bounds for the parity tests, derived from the computation itself (never from what one
CPU happened to produce), and float64 runs to compare against.

A float32 result r of a computation with exact value y obeys |r - y| <= B. Two float32 runs (ours,
and the golden file's, made by another torch on another CPU with other SIMD kernels) therefore agree
within 2 B; a float64 run of the same weights (exact to ~1e-13 here) agrees with a float32 golden
within B.

The model (probabilistic rounding-error analysis, Higham & Mary, SIAM J. Sci. Comput. 41, 2019):
every rounding stage k leaves an error delta_k with |delta_k| <= sigma_k; different stages round
independently, so the error of an output y is sum_k (dy/dv_k) delta_k to first order, with standard
deviation <= sqrt(sum_k (dy/dv_k sigma_k)^2), and B = LAMBDA = 3 of those standard deviations.

* ``timestep_feature_sigma``: exact elementwise bound for sin / cos(t f_k) in float arithmetic; it
  grows with t (the angle t f_k carries the relative error of f_k).
* ``network_sigma``: a network's own arithmetic, S sequential stages (Linear, conv, normalisation,
  attention), each off by at most eps * M, M = the largest intermediate magnitude of the float64 run:
  sqrt(S) eps M.
* ``Ledger``: records intermediates v_k of a float64 run with their sigma_k and propagates them to an
  output with float64 autograd (dy/dv_k), so gains are the computation's real ones: e.g. the
  timestep-feature error through the head, or every head call's error through 100 sampler steps.
"""
from __future__ import annotations

import math

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps  # 2**-23, relative spacing of float32 (2 x unit roundoff)
EPS64 = torch.finfo(torch.float64).eps  # 2**-52
LAMBDA = 3.0


def timestep_feature_sigma(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                           eps: float = EPS32) -> torch.Tensor:
    """|computed - exact| for the [cos | sin] timestep features, per element [N, dim].

    x_k = ln(P) k / half carries two roundings (ln P, the product), so f_k = exp(-x_k) has relative
    error <= eps (x_k + 1) (eps x_k propagated, plus exp's own ulp); t f_k adds one rounding, so the
    angle is off by <= eps t f_k (x_k + 1.5), and cos / sin add their own ulp: eps (t f_k (x_k + 1.5) + 1),
    at most eps (1.5 t + 1) = 1.8e-4 at t = 999 in float32."""
    half = dim // 2
    x = math.log(max_period) * torch.arange(half, dtype=torch.float64) / half
    f = torch.exp(-x)
    b = eps * (t.double()[:, None] * f * (x + 1.5) + 1)
    return torch.cat([b, b], dim=1)


STAGES = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Conv2d)


def count_stages(module: nn.Module) -> int:
    """Rounding stages of a network: Linear / conv / normalisation layers, plus one per attention."""
    n = sum(isinstance(m, STAGES) for m in module.modules())
    return n + sum(type(m).__name__ in ("Attention", "AttnBlock") for m in module.modules())


def network_sigma(scale: float, stages: int, eps: float = EPS32) -> float:
    return math.sqrt(stages) * eps * scale


def network_bound(scale: float, stages: int, eps: float = EPS32) -> float:
    """B = LAMBDA sqrt(S) eps M for a network output (no ledger needed: one block of stages)."""
    return LAMBDA * network_sigma(scale, stages, eps)


class MaxActivation:
    """Context manager: the largest |output| of any submodule of ``model`` while inside (M above)."""

    def __init__(self, model: nn.Module):
        self.model, self.value = model, 0.0

    def _hook(self, mod, inp, out):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self.value = max(self.value, float(out.detach().abs().max()))

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook) for m in self.model.modules()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


class _Unpatch:
    """A hook-like handle: ``remove()`` drops instance attributes that shadow the class's methods."""

    def __init__(self, obj, names):
        self.obj, self.names = obj, names

    def remove(self):
        for n in self.names:
            self.obj.__dict__.pop(n, None)


class Ledger:
    """Intermediates of a float64 run (in the autograd graph), each with its float32 sigma.

    With ``perturb`` (a torch.Generator) nothing is recorded: every intermediate is instead replaced
    by value + sigma * N(0, 1), a Monte Carlo emulation of the same rounding model (for computations
    too large for per-element derivatives; see ``monte_carlo_bound``)."""

    def __init__(self, eps: float = EPS32, perturb: torch.Generator | None = None):
        self.eps, self.perturb = eps, perturb
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, value: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(value.shape).detach()
        if self.perturb is not None:
            return value + sigma * torch.randn(value.shape, generator=self.perturb, dtype=torch.float64)
        if not value.requires_grad:
            value.requires_grad_(True)  # a leaf (an input): the derivative is still taken w.r.t. it
        self.items.append((value, sigma))
        return value

    def bound(self, y: torch.Tensor, rows_independent: bool) -> torch.Tensor:
        """B per element of y [N, C]: LAMBDA sqrt(sum_k (dy/dv_k sigma_k)^2).

        ``rows_independent``: row r of every recorded tensor reaches only row r mod N of y (a head's
        rows; with CFG the uncond half r = N + i feeds row i), so one backward pass per column of y
        gives every row's derivatives. Otherwise one pass per element."""
        values = [v for v, _ in self.items]
        n = y.shape[0]
        var = torch.zeros(y.shape, dtype=torch.float64)
        if not y.requires_grad:  # y depends on nothing recorded
            return var
        cells = [(None, j) for j in range(y.shape[1])] if rows_independent else \
            [(i, j) for i in range(n) for j in range(y.shape[1])]
        for i, j in cells:
            target = y[:, j].sum() if i is None else y[i, j]
            grads = torch.autograd.grad(target, values, retain_graph=True, allow_unused=True)
            for g, (_, s) in zip(grads, self.items):
                if g is None:
                    continue
                per_row = (g * s).square().reshape(g.shape[0], -1).sum(1)
                if i is not None:
                    var[i, j] += per_row.sum()
                else:
                    if per_row.shape[0] % n:
                        raise ValueError(f"a recorded tensor has {per_row.shape[0]} rows, not a multiple of {n}")
                    var[:, j] += per_row.reshape(-1, n).sum(0)
        return LAMBDA * var.sqrt()

    # -------------------------------------------------------------- recorders for MAR's pieces
    def record_head(self, net: nn.Module, feature_sigma=None) -> list:
        """Hooks on a float64 SimpleMLPAdaLN: each call records its timestep features
        (``feature_sigma(t, dim)``, default ``timestep_feature_sigma``) and its output
        (``network_sigma`` of that call's activations). Hooks sit on submodules, so they also fire
        for ``net.forward`` / ``forward_with_cfg``. Returns the handles."""
        stages, state = count_stages(net), {}
        if feature_sigma is None:
            feature_sigma = lambda t, dim: timestep_feature_sigma(t, dim, eps=self.eps)  # noqa: E731

        def reset(mod, args):  # input_proj runs first in every call
            state["max"] = 0.0

        def pre_time(mod, args):
            state["t"] = args[0]

        def pre_features(mod, args):
            return (self.add(args[0], feature_sigma(state["t"], args[0].shape[1])),)

        def track(mod, inp, out):
            if isinstance(out, torch.Tensor):
                state["max"] = max(state["max"], float(out.detach().abs().max()))

        def post(mod, args, out):  # final_layer's output is the net's output
            track(mod, args, out)
            return self.add(out, network_sigma(state["max"], stages, self.eps))

        handles = [net.input_proj.register_forward_pre_hook(reset),
                   net.time_embed.register_forward_pre_hook(pre_time),
                   net.time_embed.mlp.register_forward_pre_hook(pre_features)]
        handles += [m.register_forward_hook(track) for m in net.modules()
                    if m is not net and m is not net.final_layer]
        handles.append(net.final_layer.register_forward_hook(post))
        return handles

    def record_diffusion(self, d) -> "_Unpatch":
        """Wrap a GaussianDiffusion instance: record x_t = a x0 + b noise (q_sample), the x0 estimate
        a x_t - b eps and the posterior mean c1 x0 + c2 x_t (p_mean_variance), each with
        sigma = eps (|first term| + |second term|) (two products and a sum, relative to the terms:
        at t = 999, a ~ 2e4, this is what makes the x0 estimate's own rounding large)."""
        q_sample, p_mean_variance = d.q_sample, d.p_mean_variance
        eps = self.eps

        def gather(table, t, like):
            return table[t].view(-1, *([1] * (like.dim() - 1)))

        def q_sample_rec(x0, t, noise):
            x_t = q_sample(x0, t, noise)
            s = eps * ((gather(d.sqrt_alphas_cumprod, t, x0) * x0).abs()
                       + (gather(d.sqrt_one_minus_alphas_cumprod, t, x0) * noise).abs())
            return self.add(x_t, s.detach())

        def p_mean_variance_rec(model_output, x_t, t, clip_x0=None):
            out = p_mean_variance(model_output, x_t, t, clip_x0)
            e, x0, c1 = model_output[:, : x_t.shape[1]], out["pred_xstart"], gather(d.posterior_mean_coef1, t, x_t)
            s0 = eps * ((gather(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t).abs()
                        + (gather(d.sqrt_recipm1_alphas_cumprod, t, x_t) * e).abs())
            x0_used = self.add(x0, s0)
            mean = out["mean"] + c1 * (x0_used - x0)  # = out["mean"] when recording; carries a perturbation
            s1 = eps * ((c1 * x0).abs() + (gather(d.posterior_mean_coef2, t, x_t) * x_t).abs())
            return {**out, "pred_xstart": x0_used, "mean": self.add(mean, s1)}

        d.q_sample, d.p_mean_variance = q_sample_rec, p_mean_variance_rec
        return _Unpatch(d, ("q_sample", "p_mean_variance"))

    def draws(self, stored):
        """A randn(shape) for the samplers handing out float64 copies of ``stored`` draws; each is
        recorded with sigma = eps |draw|, which (times the derivative) is the rounding of the product
        sigma_t * draw * temperature in x = mean + sigma_t * draw * temperature."""
        it = iter(stored)

        def randn(shape):
            x = next(it).double().clone()
            assert tuple(x.shape) == tuple(shape)
            return self.add(x, self.eps * x.abs())
        return randn


def loss_sigma(d, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, net_out: torch.Tensor,
               eps: float = EPS32, stages: int = 24) -> torch.Tensor:
    """sigma per row [N] of ``training_losses``' own arithmetic after the recorded x_t, net_out, x0
    estimate and mean: the mse ((noise - eps)^2, mean of C) and the KL of two Gaussians
    0.5 (-1 + lv2 - lv1 + exp(lv1 - lv2) + (m1 - m2)^2 exp(-lv2)) / ln 2 with its mean, about 20
    roundings (``stages`` = 24 over-counts them), each relative to the terms' magnitudes M (the sum of
    the absolute terms, averaged over channels), as ``network_sigma``. Needs no t == 0 row (the
    discretised-likelihood branch is not covered)."""
    if bool((t == 0).any()):
        raise ValueError("loss_sigma does not cover the t == 0 (decoder likelihood) rows")
    cls = type(d)  # the unpatched methods
    x0, noise, net_out = x0.double(), noise.double(), net_out.double()
    c = x0.shape[1]
    x_t = cls.q_sample(d, x0, t, noise)
    m1, _, lv1 = cls.q_posterior_mean_variance(d, x0, x_t, t)
    out = cls.p_mean_variance(d, net_out, x_t, t)
    m2, lv2 = out["mean"], out["log_variance"]
    m_mse = ((noise.abs() + net_out[:, :c].abs()) ** 2).mean(1)
    m_kl = (0.5 * (1 + lv1.abs() + lv2.abs() + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))).mean(1)
    return math.sqrt(stages) * eps * (m_mse + m_kl / math.log(2.0))


def add_in_quadrature(bound: torch.Tensor, sigma) -> torch.Tensor:
    """A ledger bound (LAMBDA sigma) combined with one more independent sigma (scalar or same shape)."""
    return (bound.square() + (LAMBDA * torch.as_tensor(sigma, dtype=torch.float64)) ** 2).sqrt()


def monte_carlo_bound(run, record, runs: int = 2, seed: int = 0) -> float:
    """B for every element of ``run()``'s float64 output, by Monte Carlo over the rounding model.

    ``record(ledger)`` installs the ledger's recorders and returns hook handles. The output's
    deviation under ``runs`` perturbed runs estimates its per-element standard deviation; B = LAMBDA
    times the largest estimate over all elements (the max over many elements of a noisy estimate
    errs high)."""
    def once(ledger):
        handles = record(ledger)
        try:
            with torch.no_grad():
                return run()
        finally:
            for h in handles:
                h.remove()
    ref = once(Ledger())
    gen = torch.Generator().manual_seed(seed)
    dev = torch.stack([once(Ledger(perturb=gen)) - ref for _ in range(runs)])
    return LAMBDA * float(dev.square().mean(0).sqrt().max())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """|actual - expected| <= bound elementwise; the message names the worst ratio."""
    err = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).detach()
    ratio = float((err / bound).max())
    assert ratio <= 1.0, (f"{what}: |difference| reaches {ratio:.3g} x its bound "
                          f"(max difference {float(err.max()):.3g}, bound there {float(bound.min()):.3g}+)")
