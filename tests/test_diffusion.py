"""Tests of the diffusion head (SimpleMLPAdaLN, DiffLoss) and GaussianDiffusion against the tiny-MAR
golden files produced with the official code (see shared/reference/README.md section 2)."""

import json
import math
from pathlib import Path

import pytest
import torch

from marval_rl.models.diffusion import GaussianDiffusion, cosine_betas, space_timesteps
from marval_rl.models.head import DiffLoss, SimpleMLPAdaLN, timestep_features

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


# ------------------------------------------------------------------------------------- schedule
def test_schedule_golden():
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


def test_schedule_facts():
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
    d = GaussianDiffusion(None)
    x0, noise = torch.randn(4, 16), torch.randn(4, 16)
    t = torch.tensor([0, 1, 500, 999])
    ac = d.alphas_cumprod[t].float()[:, None]
    torch.testing.assert_close(d.q_sample(x0, t, noise), ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    with pytest.raises(ValueError):
        d.q_sample(x0, t[:3], noise)
    with pytest.raises(ValueError):
        d.q_sample(x0, t, noise[:, :8])


# ----------------------------------------------------------------------------------------- head
def test_head_golden(head):
    g = _load("golden_head")
    with torch.no_grad():
        torch.testing.assert_close(timestep_features(g["t"]), g["t_freq"], atol=1e-5, rtol=0)
        torch.testing.assert_close(head.net.time_embed(g["t"]), g["t_emb"], atol=1e-5, rtol=0)
        out = head.net(g["x_t"], g["t"], g["c"])  # bit-exact with 2 threads; 1 thread reorders sums (~1e-5 rel)
        torch.testing.assert_close(out, g["out"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :16], g["eps"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 16:], g["var_values"], atol=1e-5, rtol=1e-5)
        cfg = head.net.forward_with_cfg(g["x_t"], g["t"], g["c"], g["cfg_scale"])
        torch.testing.assert_close(cfg, g["out_cfg"], atol=5e-5, rtol=1e-5)  # cfg 2.5 scales the difference
        # cfg_scale as a 1-element tensor (linear cfg schedule) gives the same result.
        cfg_t = head.net.forward_with_cfg(g["x_t"], g["t"], g["c"], torch.tensor([g["cfg_scale"]]))
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


@pytest.mark.parametrize("case", ["cfg1_temp1", "cfg1_temp0.9", "cfg2_temp1"])
def test_sample_golden(head, case):
    g = _load("golden_diffloss_sample")[case]
    n = g["noise_init"].shape[0]
    ref = g["out"][:n]

    def check(out):
        assert out.shape == g["out"].shape
        # Rows kept by the caller; the sampler amplifies tiny differences at t=999 (MAR_NOTES pitfall 7).
        torch.testing.assert_close(out[:n], ref, atol=1e-4, rtol=1e-4)

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
    z = torch.randn(3, 64)
    calls = []

    def randn(shape):
        calls.append(shape)
        return torch.randn(shape)
    out = head.sample(z, randn=randn, diffusion=GaussianDiffusion("10"))
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    assert calls == [(3, 16)] * 11  # initial noise + one per step


def test_p_sample_loop_point_mass():
    """A net that predicts the exact eps of a point mass p makes the sampler return p."""
    d = GaussianDiffusion("50")
    base_ac = torch.cumprod(1 - cosine_betas(), 0)
    p = torch.linspace(-2, 2, 16).repeat(3, 1)
    seen_t = []

    def net(x, t, offset):
        seen_t.append(int(t[0]))
        ac = base_ac[t][:, None]  # the net sees original-scale steps
        eps = (x.double() - ac.sqrt() * p.double()) / (1 - ac).sqrt()
        return torch.cat([eps.float(), torch.full_like(x, offset)], dim=1)
    out = d.p_sample_loop(net, torch.randn(3, 16), temperature=0.0, offset=0.3)
    torch.testing.assert_close(out, p, atol=1e-4, rtol=0)
    assert seen_t == d.timestep_map.flip(0).tolist()


# ----------------------------------------------------------------------------------------- loss
def test_training_losses_golden():
    """Diffusion math alone: the stored net output fed back through training_losses."""
    g = _load("golden_loss")
    tokens = g["tokens"].reshape(-1, 16).repeat(4, 1)  # rows k*B*L + b*L + l (tiled)
    seen = {}

    def net_fn(x_t, t, **kw):
        seen["x_t"], seen["t"] = x_t, t
        return g["net_out"]
    terms = GaussianDiffusion(None).training_losses(net_fn, tokens, g["t"], g["noise"])
    torch.testing.assert_close(seen["x_t"], g["x_t"], atol=1e-6, rtol=1e-6)
    assert torch.equal(seen["t"], g["t"])
    for k in ["mse", "vb", "loss"]:
        torch.testing.assert_close(terms[k], g[f"terms_{k}"], rtol=1e-5, atol=1e-7, msg=k)


def test_diffloss_golden(head):
    """Head + diffusion: per-row terms and the masked losses (eval and train conditioning)."""
    g, gz = _load("golden_loss"), _load("golden_z")
    assert torch.equal(gz["tokens"], g["tokens"]) and torch.equal(gz["mask"], g["mask"])
    tokens = g["tokens"].reshape(-1, 16).repeat(4, 1)
    mask = g["mask"].reshape(-1).repeat(4)
    with torch.no_grad():
        z = gz["z"].reshape(-1, 64).repeat(4, 1)
        terms = head.loss_terms(tokens, z, t=g["t"], noise=g["noise"])
        torch.testing.assert_close(terms["net_out"], g["net_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(terms["loss"], g["terms_loss"], rtol=1e-5, atol=1e-7)
        loss = head(tokens, z, mask, t=g["t"], noise=g["noise"])
        torch.testing.assert_close(loss, g["loss_eval"], rtol=1e-5, atol=0)
        z_train = g["z_train"].reshape(-1, 64).repeat(4, 1)
        loss_train = head(tokens, z_train, mask, t=g["t"], noise=g["noise"])
        torch.testing.assert_close(loss_train, g["loss_train"], rtol=1e-5, atol=0)


def test_diffloss_random_draw_order(head):
    """Default draws: t = randint first, then noise = randn (the reference order)."""
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
    x0, t = torch.randn(6, 16), torch.tensor([0, 1, 5, 100, 500, 999])
    out = torch.randn(6, 32, requires_grad=True)
    terms = GaussianDiffusion(None).training_losses(lambda x, tt: out, x0, t, torch.randn(6, 16))
    g_eps_vb, g_var_vb = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)[0].split(16, 1)
    assert g_eps_vb.abs().sum() == 0 and g_var_vb.abs().sum() > 0
    g_var_mse = torch.autograd.grad(terms["mse"].sum(), out)[0][:, 16:]
    assert g_var_mse.abs().sum() == 0


def test_vb_decoder_nll_at_t0():
    """At t == 0 vb is the discretised-Gaussian NLL of x0 (bins of 2/255, in bits)."""
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
