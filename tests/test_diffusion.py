"""Tests of the diffusion head (SimpleMLPAdaLN, DiffLoss) and GaussianDiffusion against the tiny-MAR
golden files produced with the official code (see shared/reference/README.md section 2)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from marval_rl.models.diffusion import GaussianDiffusion, cosine_betas, space_timesteps
from marval_rl.models.head import DiffLoss, SimpleMLPAdaLN, timestep_features
from numerics import (EPS32, EPS64, Ledger, MaxActivation, add_in_quadrature, assert_within, count_stages,
                      loss_sigma, network_sigma, timestep_feature_sigma)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on 2 shared cores

FIX = Path(__file__).parent / "fixtures"
TINY = FIX / "tiny_mar"


def _load(name):
    return torch.load(TINY / f"{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def head():
    """Tiny DiffLoss with the checkpoint's EMA head weights (the goldens use 'model_ema')."""
    ckpt = torch.load(TINY / "checkpoint.pth", weights_only=True)
    sd = {k[len("diffloss."):]: v for k, v in ckpt["model_ema"].items() if k.startswith("diffloss.")}
    dl = DiffLoss(target_channels=16, z_channels=64, depth=2, width=64, num_sampling_steps="100")
    # Same keys in the same order as the official module.
    assert list(dl.state_dict().keys()) == list(sd.keys())
    dl.load_state_dict(sd, strict=True)
    return dl.eval()


@pytest.fixture(scope="module")
def head64(head):
    """The same weights in float64: the reference the float32 goldens are held to (numerics.py)."""
    return copy.deepcopy(head).double()


def _features_reference(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos | sin](t * 10000^(-k/half)) written out with Python's math (IEEE double)."""
    half = dim // 2
    f = [math.exp(-math.log(10000.0) * k / half) for k in range(half)]
    rows = [[math.cos(tt * fk) for fk in f] + [math.sin(tt * fk) for fk in f] for tt in t.tolist()]
    return torch.tensor(rows, dtype=torch.float64)


def _head_reference(net_sd: dict, x, t, c, depth: int) -> torch.Tensor:
    """SimpleMLPAdaLN written out from its definition (DiT-style adaLN MLP, LayerNorm eps 1e-6), in
    float64 from a state dict: independent of the module code it checks."""
    w = {k: v.double() for k, v in net_sd.items()}

    def lin(h, name):
        return h @ w[name + ".weight"].T + w[name + ".bias"]

    def silu(h):
        return h * torch.sigmoid(h)

    def norm(h):
        mu = h.mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-6)

    y = lin(silu(lin(_features_reference(t), "time_embed.mlp.0")), "time_embed.mlp.2") + lin(c, "cond_embed")
    h = lin(x, "input_proj")
    for i in range(depth):
        p = f"res_blocks.{i}."
        shift, scale, gate = lin(silu(y), p + "adaLN_modulation.1").chunk(3, dim=-1)
        hn = norm(h) * w[p + "in_ln.weight"] + w[p + "in_ln.bias"]
        h = h + gate * lin(silu(lin(hn * (1 + scale) + shift, p + "mlp.0")), p + "mlp.2")
    shift, scale = lin(silu(y), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    return lin(norm(h) * (1 + scale) + shift, "final_layer.linear")


def _head_bound(net64, x, t, c, cfg=None, eps=None):
    """The float64 head output and the bound B of every element (numerics.Ledger; float32 unless eps)."""
    ledger = Ledger() if eps is None else Ledger(eps=eps)
    handles = ledger.record_head(net64)
    try:
        with torch.enable_grad():
            args = (x.double(), t, c.double())
            out = net64(*args) if cfg is None else net64.forward_with_cfg(*args, cfg)
            return out.detach(), ledger.bound(out, rows_independent=True)
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------- schedule
def test_schedule_golden():
    # Catches: float64 schedule tables (betas, posterior terms, respaced map) drifting from the official ones.
    g = _load("golden_schedule")
    train, gen = GaussianDiffusion(None), GaussianDiffusion(g["num_sampling_steps"])
    assert train.num_timesteps == 1000 and torch.equal(train.timestep_map, torch.arange(1000))
    torch.testing.assert_close(train.betas, g["train_betas"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(train.alphas_cumprod, g["train_alphas_cumprod"], rtol=1e-12, atol=1e-15)
    assert gen.num_timesteps == 100
    assert torch.equal(gen.timestep_map, g["gen_timestep_map"])
    for name in ["betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"]:
        ours = getattr(gen, name)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, g[f"gen_{name}"], rtol=1e-12, atol=1e-15, msg=name)


def test_schedule_closed_form():
    # Catches: a schedule that drifts from the cosine law (offset s, the squared cos, the clipping).
    d = GaussianDiffusion(None)
    abar = lambda s: math.cos((s / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    t = torch.arange(999)  # beta_999 is clipped at 0.999: the closed form holds below
    closed = torch.tensor([abar(i + 1) / abar(0) for i in t.tolist()], dtype=torch.float64)
    # float64: a product of <= 1000 factors, each rounded once: relative error <= 1000 eps64.
    torch.testing.assert_close(d.alphas_cumprod[:999], closed, rtol=1000 * EPS64, atol=0)


def test_schedule_facts():
    # Catches: the respacing losing q(x_t | x0) at kept steps, or kept-step rounding shifting steps.
    betas = cosine_betas()
    assert betas.dtype == torch.float64 and betas[-1] == 0.999
    ac = torch.cumprod(1 - betas, 0)
    assert 2e-9 < ac[999] < 3e-9 and 2e-6 < ac[998] < 3e-6
    kept = space_timesteps(1000, "100")
    assert kept[:3] == [0, 10, 20] and kept[-2:] == [989, 999] and len(kept) == 100
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, 250) == space_timesteps(1000, "250")
    # Respacing keeps q(x_t | x0) at the kept steps.
    g = GaussianDiffusion("10")
    torch.testing.assert_close(g.alphas_cumprod, ac[g.timestep_map], rtol=1e-8, atol=0)


def test_bad_diffusion_args():
    with pytest.raises(ValueError, match="at least 2"):
        GaussianDiffusion("1")
    with pytest.raises(ValueError, match="at least 2"):
        DiffLoss(16, 64, 2, 64, num_sampling_steps="1")
    with pytest.raises(ValueError):
        GaussianDiffusion("2000")
    with pytest.raises(ValueError):
        GaussianDiffusion(None, noise_schedule="linear")


def test_q_sample_analytic():
    # Catches: swapped / squared coefficients in q(x_t | x0), or float64 inputs mixed with float32 tables.
    d = GaussianDiffusion(None)
    x0, noise = torch.randn(4, 16), torch.randn(4, 16)
    t = torch.tensor([0, 1, 500, 999])
    ac = d.alphas_cumprod[t].float()[:, None]
    torch.testing.assert_close(d.q_sample(x0, t, noise), ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    ac64 = d.alphas_cumprod[t][:, None]
    x_t64 = d.q_sample(x0.double(), t, noise.double())
    assert x_t64.dtype == torch.float64
    # Two products and a sum in float64 on |terms| <= 5: within 4 eps64 * 5 of the formula.
    torch.testing.assert_close(x_t64, ac64.sqrt() * x0.double() + (1 - ac64).sqrt() * noise.double(),
                               rtol=0, atol=20 * EPS64)
    with pytest.raises(ValueError):
        d.q_sample(x0, t[:3], noise)
    with pytest.raises(ValueError):
        d.q_sample(x0, t, noise[:, :8])


# ----------------------------------------------------------------------------------------- head
def test_timestep_features_float64_reference():
    # Catches: wrong frequency law (log base, half vs dim, cos/sin order), or a float32 path in float64.
    t = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    ours = timestep_features(t, dtype=torch.float64)
    assert ours.dtype == torch.float64
    # Both sides are float64 computations of the same formula: each within the elementwise
    # bound eps64 (t f (x + 1.5) + 1) of the exact value (numerics.timestep_feature_sigma).
    assert_within(ours, _features_reference(t), 2 * timestep_feature_sigma(t, eps=EPS64), "float64 features")


def test_timestep_features_float32_bound():
    # Catches: float32 features further from the exact ones than float32 rounding explains.
    g = _load("golden_head")
    t = torch.cat([g["t"], torch.arange(0, 1000, 37)])
    exact, bound = _features_reference(t), timestep_feature_sigma(t)  # bound grows with t: 1.8e-4 at 999
    assert_within(timestep_features(t), exact, bound, "our float32 features")
    # The golden's features (torch 2.13's float32 exp) obey the same bound; ours and the golden's
    # differ by up to 2.9e-5 at t = 999 (1 ulp in 5 frequencies), inside 2 x bound.
    assert_within(g["t_freq"], exact[: len(g["t"])], bound[: len(g["t"])], "golden features")


def test_head_float64_reference(head64):
    # Catches: a head that deviates from the SimpleMLPAdaLN definition (gate, modulate, LN eps, order).
    g = _load("golden_head")
    sd = {k[len("net."):]: v for k, v in head64.state_dict().items() if k.startswith("net.")}
    ref = _head_reference(sd, g["x_t"].double(), g["t"], g["c"].double(), depth=len(head64.net.res_blocks))
    out, bound = _head_bound(head64.net, g["x_t"], g["t"], g["c"], eps=EPS64)  # the float64 bound, ~1e-13
    assert out.dtype == torch.float64
    assert_within(out, ref, 2 * bound, "float64 head vs written-out reference")
    assert float(bound.max()) < 1e-10


def test_head_golden(head, head64):
    # Catches: the head's float32 outputs (eps, learned variance, CFG mix) drifting from the official ones.
    g = _load("golden_head")
    x, t, c = g["x_t"], g["t"], g["c"]
    out64, bound = _head_bound(head64.net, x, t, c)  # float32 bound B per element (~1e-4 here)
    with torch.no_grad():
        out = head.net(x, t, c)
        # B: features and the net's own rounding (numerics.py); golden and ours: each within B.
        assert_within(out64, g["out"], bound, "float64 head vs float32 golden")
        assert_within(out, g["out"], 2 * bound, "float32 head vs float32 golden")
        assert_within(out[:, :16], g["eps"], 2 * bound[:, :16], "eps")
        assert_within(out[:, 16:], g["var_values"], 2 * bound[:, 16:], "variance values")
        # The time embedding alone: features (B_feat) through two Linears and a SiLU.
        with torch.enable_grad(), MaxActivation(head64.net.time_embed) as mx:
            ledger = Ledger()
            feats = ledger.add(timestep_features(t, dtype=torch.float64), timestep_feature_sigma(t))
            emb64 = head64.net.time_embed.mlp(feats)
            emb64 = ledger.add(emb64, network_sigma(mx.value, count_stages(head64.net.time_embed)))
            b_emb = ledger.bound(emb64, rows_independent=True)
        assert_within(head.net.time_embed(t), g["t_emb"], 2 * b_emb, "time embedding")

        cfg64, b_cfg = _head_bound(head64.net, x, t, c, cfg=g["cfg_scale"])  # cfg 2.5 scales the difference
        cfg = head.net.forward_with_cfg(x, t, c, g["cfg_scale"])
        assert_within(cfg64, g["out_cfg"], b_cfg, "float64 cfg")
        assert_within(cfg, g["out_cfg"], 2 * b_cfg, "float32 cfg")
        # cfg_scale as a 1-element tensor (linear cfg schedule) gives the same result.
        cfg_t = head.net.forward_with_cfg(x, t, c, torch.tensor([g["cfg_scale"]]))
        torch.testing.assert_close(cfg_t, cfg, atol=0, rtol=0)


def test_head_keys_match_official_manifest():
    manifest = json.loads((FIX / "mar_state_dict_manifest.json").read_text())["models"]["mar_base"]
    ref = [(e["key"], e["shape"]) for e in manifest["keys"] if e["key"].startswith("diffloss.")]
    with torch.device("meta"):  # 36M parameters: no need to allocate them
        dl = DiffLoss(16, 768, depth=6, width=1024)
    ours = [("diffloss." + k, list(v.shape)) for k, v in dl.state_dict().items()]
    assert ours == ref
    assert sum(p.numel() for p in dl.parameters()) == manifest["num_params_diffloss"]


def test_head_init_and_checkpointing():
    # Catches: a non-zero initial head output, or gradient checkpointing changing values / gradients.
    torch.manual_seed(0)
    dl = DiffLoss(16, 32, depth=2, width=48)
    x, t, c = torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randn(5, 32)
    assert torch.equal(dl.net(x, t, c), torch.zeros(5, 32))  # zero-initialised output layers
    assert dl.net.input_proj.bias.abs().sum() == 0 and dl.net.time_embed.mlp[0].weight.std() < 0.03
    # Gradient checkpointing does not change values or gradients.
    for p in dl.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ref = DiffLoss(16, 32, depth=2, width=48, grad_checkpointing=True)
    ref.load_state_dict(dl.state_dict())
    ref.train()
    dl.train()
    for m in (dl, ref):
        m.zero_grad()
        m(x, c, t=t, noise=torch.ones(5, 16)).backward()
    torch.testing.assert_close(ref.net(x, t, c), dl.net(x, t, c))
    for a, b in zip(dl.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_head_bad_inputs(head):
    x, t, c = torch.randn(4, 16), torch.zeros(4, dtype=torch.long), torch.randn(4, 64)
    with pytest.raises(ValueError, match="row counts"):
        head.net(x, t, c[:3])
    with pytest.raises(ValueError, match="x must be"):
        head.net(x[:, :8], t, c)
    with pytest.raises(ValueError, match="c must be"):
        head.net(x, t, c[:, :32])
    with pytest.raises(ValueError, match="even"):
        head.net.forward_with_cfg(x[:3], t[:3], c[:3], 2.0)
    with pytest.raises(ValueError):
        head(torch.randn(4, 15), c)
    with pytest.raises(ValueError):
        head(x, c[:3])
    with pytest.raises(ValueError, match="even"):
        head.sample(c[:3], cfg=2.0)
    with pytest.raises(ValueError):
        head.sample(c[:, :10])


# -------------------------------------------------------------------------------------- sampler
def _replay(draws):
    """A randn callable that hands out the stored draws in order and checks each shape."""
    it = iter(draws)

    def randn(shape):
        x = next(it)
        assert tuple(x.shape) == tuple(shape)
        return x.clone()
    return randn, it


def _sampler_bound(head64, g):
    """Float64 run of the head sampler on the stored draws, and B for its kept rows: every head call,
    x0 estimate, posterior mean and noise product recorded (numerics.Ledger) and carried through the
    100 steps by autograd; the t = 999 step (x0 = 2e4 x_t - 2e4 eps) dominates."""
    ledger, d = Ledger(), GaussianDiffusion(str(head64.gen_diffusion.num_timesteps))
    handles = ledger.record_head(head64.net) + [ledger.record_diffusion(d)]
    try:
        with torch.enable_grad():
            out = head64.sample(g["z"].double(), g["temperature"], g["cfg"], diffusion=d,
                                randn=ledger.draws([g["noise_init"]] + list(g["noise_steps"])))
            n = g["noise_init"].shape[0]
            return out[:n].detach(), ledger.bound(out[:n], rows_independent=True)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("case", ["cfg1_temp1", "cfg1_temp0.9", "cfg2_temp1"])
def test_sample_golden(head, head64, case):
    # Catches: sampler bugs (respaced t vs original t, posterior coefficients, variance interpolation,
    # temperature on the noise, shared cond/uncond noise, draw order) against the official chain.
    g = _load("golden_diffloss_sample")[case]
    n = g["noise_init"].shape[0]
    ref = g["out"][:n]
    out64, bound = _sampler_bound(head64, g)  # ~3e-4 (cfg 1) / ~2e-3 (cfg 2): t = 999 amplifies ~2e4x
    assert_within(out64, ref, bound, "float64 sampler vs float32 golden")

    def check(out):
        assert out.shape == g["out"].shape
        # Rows kept by the caller; two float32 runs: within 2 B.
        assert_within(out[:n], ref, 2 * bound, "float32 sampler vs golden")

    randn, rest = _replay([g["noise_init"]] + list(g["noise_steps"]))
    check(head.sample(g["z"], g["temperature"], g["cfg"], randn=randn))
    assert next(rest, None) is None  # every stored draw consumed, none missing

    torch.manual_seed(g["seed"])
    check(head.sample(g["z"], g["temperature"], g["cfg"]))

    gen = torch.Generator().manual_seed(g["seed"])
    check(head.sample(g["z"], g["temperature"], g["cfg"], randn=lambda s: torch.randn(s, generator=gen)))

    if g["cfg"] != 1.0:  # a 1-element tensor cfg (linear schedule) behaves the same
        randn, _ = _replay([g["noise_init"]] + list(g["noise_steps"]))
        check(head.sample(g["z"], g["temperature"], torch.tensor([g["cfg"]]), randn=randn))


def test_sample_other_diffusion(head):
    # Catches: a respaced sampler that draws the wrong number of times or returns the wrong shape.
    z = torch.randn(3, 64)
    calls = []

    def randn(shape):
        calls.append(shape)
        return torch.randn(shape)
    out = head.sample(z, randn=randn, diffusion=GaussianDiffusion("10"))
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    assert calls == [(3, 16)] * 11  # initial noise + one per step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_p_sample_loop_point_mass(dtype):
    """A net that predicts the exact eps of a point mass p makes the sampler return p."""
    # Catches: wrong posterior mean coefficients or t mapping; in float64, tables cast to float32.
    d = GaussianDiffusion("50")
    base_ac = torch.cumprod(1 - cosine_betas(), 0)
    p = torch.linspace(-2, 2, 16).repeat(3, 1)
    seen_t = []

    def net(x, t, offset):
        seen_t.append(int(t[0]))
        ac = base_ac[t][:, None]  # the net sees original-scale steps
        eps = (x.double() - ac.sqrt() * p.double()) / (1 - ac).sqrt()
        return torch.cat([eps.to(dtype), torch.full_like(x, offset)], dim=1)
    out = d.p_sample_loop(net, torch.randn(3, 16, dtype=dtype), temperature=0.0, offset=0.3)
    assert out.dtype == dtype
    # The first step's x0 = x_T / sqrt(ab) - sqrt(1/ab - 1) eps has terms ~2e4 |x|: rounding of
    # ~2e4 * 4 * eps_dtype (|x| <= 4) enters its posterior mean times coef1(t=999) <= 1, and later
    # steps contract it; 4e4 eps bounds that (4.8e-3 in float32, ~1e-11 in float64).
    atol = 4e4 * torch.finfo(dtype).eps
    torch.testing.assert_close(out, p.to(dtype), atol=atol, rtol=0)
    assert seen_t == d.timestep_map.flip(0).tolist()


# ----------------------------------------------------------------------------------------- loss
def _loss_bounds(net_fn, d, x0, t, noise, ledger, **kw):
    """float64 training_losses with x_t, x0 estimate and posterior mean recorded (plus what ``net_fn``
    records), and B per row of x_t, net_out and each loss term (own arithmetic added: loss_sigma)."""
    handle = ledger.record_diffusion(d)
    try:
        with torch.enable_grad():
            terms = d.training_losses(net_fn, x0.double(), t, noise.double(), **kw)
            own = loss_sigma(d, x0, t, noise, terms["net_out"].detach())[:, None]
            bounds = {k: add_in_quadrature(ledger.bound(terms[k][:, None], rows_independent=True), own)[:, 0]
                      for k in ("mse", "vb", "loss")}
            bounds["net_out"] = ledger.bound(terms["net_out"], rows_independent=True)
    finally:
        handle.remove()
    # x_t's own B (it is computed first, from exact inputs): LAMBDA eps32 (|a x0| + |b noise|).
    a, b = d.sqrt_alphas_cumprod[t][:, None], d.sqrt_one_minus_alphas_cumprod[t][:, None]
    bounds["x_t"] = 3 * EPS32 * ((a * x0.double()).abs() + (b * noise.double()).abs())
    return {k: v.detach() for k, v in terms.items()}, bounds


def _masked_mean_bound(row_bound, mask, loss):
    """B of sum(mask * term) / sum(mask): the weighted mean of the rows' B (no cancellation assumed),
    and the reduction's own rounding, sqrt(rows) eps32 |loss| standard deviations."""
    weighted = (row_bound * mask).sum() / mask.sum()
    return add_in_quadrature(weighted.reshape(1), network_sigma(float(abs(loss)), mask.numel()))[0]


def test_training_losses_golden():
    """Diffusion math alone: the stored net output fed back through training_losses."""
    # Catches: wrong q_sample coefficients, vb / mse mix-up, vb seeing a live eps, bits vs nats.
    g = _load("golden_loss")
    tokens = g["tokens"].reshape(-1, 16).repeat(4, 1)  # rows k*B*L + b*L + l (tiled)
    seen = {}

    def net_fn(x_t, t, **kw):
        seen["x_t"], seen["t"] = x_t, t
        return g["net_out"].to(x_t.dtype)  # the same inputs for both runs: no error of its own
    terms = GaussianDiffusion(None).training_losses(net_fn, tokens, g["t"], g["noise"])
    x_t32 = seen["x_t"]
    assert torch.equal(seen["t"], g["t"])
    ledger = Ledger()
    terms64, bounds = _loss_bounds(net_fn, GaussianDiffusion(None), tokens, g["t"], g["noise"], ledger)
    assert_within(seen["x_t"], g["x_t"], bounds["x_t"], "float64 x_t")
    assert_within(x_t32, g["x_t"], 2 * bounds["x_t"], "float32 x_t")
    for k in ["mse", "vb", "loss"]:
        assert_within(terms64[k], g[f"terms_{k}"], bounds[k], f"float64 {k}")
        assert_within(terms[k], g[f"terms_{k}"], 2 * bounds[k], f"float32 {k}")


def test_diffloss_golden(head, head64):
    """Head + diffusion: per-row terms and the masked losses (eval and train conditioning)."""
    # Catches: head / diffusion wiring (which t the net sees, tiling of rows, mask weighting).
    g, gz = _load("golden_loss"), _load("golden_z")
    assert torch.equal(gz["tokens"], g["tokens"]) and torch.equal(gz["mask"], g["mask"])
    tokens = g["tokens"].reshape(-1, 16).repeat(4, 1)
    mask = g["mask"].reshape(-1).repeat(4)
    for z_name, loss_name in (("z", "loss_eval"), ("z_train", "loss_train")):
        z = (gz if z_name == "z" else g)[z_name].reshape(-1, 64).repeat(4, 1)
        ledger = Ledger()
        handles = ledger.record_head(head64.net)
        try:
            terms64, bounds = _loss_bounds(head64.net, GaussianDiffusion(None), tokens, g["t"], g["noise"],
                                           ledger, c=z.double())
        finally:
            for h in handles:
                h.remove()
        loss64 = (terms64["loss"] * mask).sum() / mask.sum()
        b_loss = _masked_mean_bound(bounds["loss"], mask, loss64)
        assert_within(loss64, g[loss_name], b_loss, f"float64 {loss_name}")
        with torch.no_grad():
            loss = head(tokens, z, mask, t=g["t"], noise=g["noise"])
            assert_within(loss, g[loss_name], 2 * b_loss, f"float32 {loss_name}")
            if z_name == "z":
                terms = head.loss_terms(tokens, z, t=g["t"], noise=g["noise"])
                assert_within(terms64["net_out"], g["net_out"], bounds["net_out"], "float64 net_out")
                assert_within(terms["net_out"], g["net_out"], 2 * bounds["net_out"], "float32 net_out")
                assert_within(terms64["loss"], g["terms_loss"], bounds["loss"], "float64 terms")
                assert_within(terms["loss"], g["terms_loss"], 2 * bounds["loss"], "float32 terms")


def test_diffloss_random_draw_order(head):
    """Default draws: t = randint first, then noise = randn (the reference order)."""
    # Catches: drawing noise before t (same seed, different losses than the official code).
    target, z = torch.randn(8, 16), torch.randn(8, 64)
    gen = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (8,), generator=gen)
    noise = torch.randn(8, 16, generator=gen)
    with torch.no_grad():
        expected = head(target, z, t=t, noise=noise)
        got = head(target, z, generator=torch.Generator().manual_seed(7))
    assert torch.equal(expected, got)


def test_vb_trains_only_variance(head):
    """vb sees a detached eps, so eps outputs get gradient from mse only."""
    # Catches: vb training the eps outputs (the reference detaches them), or mse reaching the variance.
    x0, t = torch.randn(6, 16), torch.tensor([0, 1, 5, 100, 500, 999])
    out = torch.randn(6, 32, requires_grad=True)
    terms = GaussianDiffusion(None).training_losses(lambda x, tt: out, x0, t, torch.randn(6, 16))
    g_eps_vb, g_var_vb = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)[0].split(16, 1)
    assert g_eps_vb.abs().sum() == 0 and g_var_vb.abs().sum() > 0
    g_var_mse = torch.autograd.grad(terms["mse"].sum(), out)[0][:, 16:]
    assert g_var_mse.abs().sum() == 0


def test_vb_decoder_nll_at_t0():
    """At t == 0 vb is the discretised-Gaussian NLL of x0 (bins of 2/255, in bits)."""
    # Catches: wrong bin width, edge bins not open-ended, nats instead of bits at t == 0.
    d = GaussianDiffusion(None)
    x0 = torch.tensor([[-1.0, -0.5, 0.0, 0.3, 1.0, 0.998, -0.2, 1.5]])
    t = torch.zeros(1, dtype=torch.long)
    noise = torch.randn(1, 8)
    out = torch.cat([noise + 0.05 * torch.randn(1, 8), torch.full((1, 8), 0.2)], dim=1)
    vb = d.training_losses(lambda x, tt: out, x0, t, noise)["vb"]
    # Independent check with the exact normal CDF (the reference uses a tanh approximation).
    pm = d.p_mean_variance(out, d.q_sample(x0, t, noise), t)
    mean, std = pm["mean"].double(), torch.exp(0.5 * pm["log_variance"]).double()
    cdf = lambda v: torch.special.ndtr((v - mean) / std)  # noqa: E731
    x = x0.double()
    p = torch.where(x < -0.999, cdf(x + 1 / 255),
                    torch.where(x > 0.999, 1 - cdf(x - 1 / 255), cdf(x + 1 / 255) - cdf(x - 1 / 255)))
    expected = (-torch.log(p.clamp(min=1e-12))).mean() / math.log(2)
    torch.testing.assert_close(vb.double(), expected.reshape(1), rtol=2e-3, atol=1e-4)
