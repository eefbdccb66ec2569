"""Tests for the KL-16 VAE (marval_rl/models/vae.py).

Parity is checked against ``tests/fixtures/tiny_vae/golden_vae.pt``, produced by the official MAR code with the
real KL-16 architecture and closed-form (SplitMix64) weights; the weight rule is re-implemented here
(reference README section 3), so no weight file is needed.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from marval_rl.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, build_vae, kl16_config
from numerics import EPS64, MaxActivation, assert_within, count_stages, network_bound

FIXTURES = Path(__file__).parent / "fixtures"
TINY_VAE = FIXTURES / "tiny_vae"


# ------------------------------------------------------------------------------------------------------------
# Closed-form weight rule (SplitMix64 finaliser over a per-tensor crc32 seed)
# ------------------------------------------------------------------------------------------------------------
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix_uniform(name: str, n: int, salt: int) -> np.ndarray:
    """v_j in [-1, 1) for j = 1..n, float64, following the reference weight rule."""
    seed = (zlib.crc32(name.encode("utf-8")) + salt) % 2**32
    base = np.uint64(seed) << np.uint64(32)
    with np.errstate(over="ignore"):
        z = base + np.arange(1, n + 1, dtype=np.uint64) * _GAMMA  # uint64 arrays wrap mod 2^64
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return 2.0 * u - 1.0


def closed_form_tensor(name: str, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    v = splitmix_uniform(name, math.prod(shape), salt)
    if len(shape) >= 2:
        v = v * math.sqrt(3.0 / math.prod(shape[1:]))
    elif name.endswith("weight"):  # GroupNorm gains
        v = 1.0 + 0.1 * v
    else:  # biases
        v = 0.05 * v
    return torch.from_numpy(v.reshape(shape).astype(np.float32))


def closed_form_state_dict(model: torch.nn.Module, salt: int) -> dict[str, torch.Tensor]:
    return {k: closed_form_tensor(k, tuple(t.shape), salt) for k, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_cfg() -> dict:
    return json.loads((TINY_VAE / "config.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(TINY_VAE / "golden_vae.pt", weights_only=True)


@pytest.fixture(scope="module")
def kl16_closed_form(tiny_cfg) -> tuple[AutoencoderKL, dict[str, torch.Tensor]]:
    ctor = dict(tiny_cfg["constructor"])
    assert ctor.pop("cls") == "AutoencoderKL"
    vae = AutoencoderKL(VAEConfig(**ctor)).eval()
    sd = closed_form_state_dict(vae, tiny_cfg["weight_rule"]["salt"])
    vae.load_state_dict(sd, strict=True)
    return vae, sd


@pytest.fixture(scope="module")
def kl16_float64(kl16_closed_form) -> AutoencoderKL:
    """The same (float32) closed-form weights in float64: the reference the goldens are held to."""
    import copy
    return copy.deepcopy(kl16_closed_form[0]).double()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "mar_state_dict_manifest.json").read_text())["models"]["vae_kl16"]


# ------------------------------------------------------------------------------------------------------------
# Parity with the official implementation
# ------------------------------------------------------------------------------------------------------------
def test_weight_rule_matches_param_checks(kl16_closed_form, tiny_cfg):
    # Catches: a re-implemented weight rule that differs from the golden's (every parity check would drift).
    _, sd = kl16_closed_form
    checks = tiny_cfg["param_checks"]
    assert set(checks) == set(sd)
    for name, ref in checks.items():
        t = sd[name]
        assert t.flatten()[:4].tolist() == pytest.approx(ref["first4"], rel=0, abs=1e-7), name
        assert t.double().sum().item() == pytest.approx(ref["sum"], rel=1e-7, abs=1e-5), name


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _bound(model64, part, fn, *args, eps=None):
    """float64 output of ``fn`` and its float32 bound B = 3 sqrt(S) eps32 M (tests/numerics.py): S the
    rounding stages of ``part`` (convs, GroupNorms, attention), M the largest float64 activation."""
    with MaxActivation(model64) as mx:
        out = fn(*(a.double() for a in args))
    kw = {} if eps is None else {"eps": eps}
    last = out.moments if isinstance(out, DiagonalGaussian) else out
    return out, network_bound(max(mx.value, float(last.abs().max())), count_stages(part), **kw)


@torch.no_grad()
def test_golden_encoder_side(kl16_closed_form, kl16_float64, golden):
    # Catches: encoder bugs (asymmetric downsample pad, attention placement, GroupNorm eps, moments split).
    vae, _ = kl16_closed_form
    v64 = kl16_float64
    image = golden["image"]
    enc_part = torch.nn.ModuleList([v64.encoder, v64.quant_conv])
    enc64, b_enc = _bound(v64, v64.encoder, v64.encoder, image)
    assert_within(enc64, golden["encoder_out"], b_enc, "float64 encoder")
    assert_within(vae.encoder(image), golden["encoder_out"], 2 * b_enc, "float32 encoder")
    post64, b_post = _bound(v64, enc_part, v64.encode, image)
    post = vae.encode(image)
    for name in ("moments", "mean", "logvar"):
        assert_within(getattr(post64, name), golden[name], b_post, f"float64 {name}")
        assert_within(getattr(post, name), golden[name], 2 * b_post, f"float32 {name}")
    # std = exp(logvar / 2): the logvar error times d std / d logvar = std / 2, plus exp's ulp.
    b_std = b_post * post64.std / 2 + 2 * torch.finfo(torch.float32).eps * post64.std
    assert_within(post64.std, golden["std"], b_std, "float64 std")
    assert_within(post.std, golden["std"], 2 * b_std, "float32 std")


@torch.no_grad()
def test_golden_decoder_side(kl16_closed_form, kl16_float64, golden):
    # Catches: decoder bugs (level order, extra block per level, nearest upsampling, latent scale).
    vae, _ = kl16_closed_form
    v64 = kl16_float64
    dec_part = torch.nn.ModuleList([v64.post_quant_conv, v64.decoder])
    dec64, b_dec = _bound(v64, dec_part, v64.decode, golden["latent"])
    assert_within(dec64, golden["decoded"], b_dec, "float64 decode")
    assert_within(vae.decode(golden["latent"]), golden["decoded"], 2 * b_dec, "float32 decode")
    assert vae.config.latent_scale == pytest.approx(float(golden["scale_factor"]))
    tok64, b_tok = _bound(v64, dec_part, v64.decode_tokens, golden["tokens_for_scaled_decode"])
    assert_within(tok64, golden["decoded_from_tokens"], b_tok, "float64 decode_tokens")
    assert_within(vae.decode_tokens(golden["tokens_for_scaled_decode"]), golden["decoded_from_tokens"],
                  2 * b_tok, "float32 decode_tokens")


# ------------------------------------------------------------------------------------------------------------
# Structure: keys, order, shapes, parameter counts
# ------------------------------------------------------------------------------------------------------------
def test_state_dict_matches_manifest(manifest):
    # Catches: a key, order, shape or parameter count that would stop kl16.ckpt from loading strictly.
    with torch.device("meta"):
        vae = build_vae(kl16_config())
    sd = vae.state_dict()
    assert [(k, list(t.shape)) for k, t in sd.items()] == [(e["key"], e["shape"]) for e in manifest["keys"]]
    assert len(sd) == manifest["num_keys"] == 312
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert len(list(vae.buffers())) == manifest["num_buffers"] == 0

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(vae) == manifest["num_params"] == 66_456_019
    assert count(vae.encoder) == manifest["num_params_encoder"]
    assert count(vae.decoder) == manifest["num_params_decoder"]
    assert vae.config.stride == 16


def test_manifest_constructor_is_default_config(manifest):
    ctor = dict(manifest["constructor"])
    assert ctor.pop("cls") == "AutoencoderKL"
    # The official class has a `use_variational` switch; the released KL-16 uses the variational branch,
    # which is the only one implemented here.
    assert ctor.pop("use_variational", True) is True
    assert VAEConfig.from_dict(ctor) == kl16_config()


# ------------------------------------------------------------------------------------------------------------
# Small VAEs for low-resolution experiments
# ------------------------------------------------------------------------------------------------------------
SMALL = dict(ch=32, ch_mult=(1, 2, 2), attn_resolutions=(), num_groups=8, resolution=32, embed_dim=4, z_channels=4)


@torch.no_grad()
def test_float64_run_to_run():
    # Catches: batch coupling (a norm over the batch, attention across images) in encoder or decoder.
    torch.manual_seed(0)
    v64 = build_vae(SMALL).double().eval()  # the mid blocks hold the attention
    image = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    pair = torch.cat([image, image.flip(-1)])
    enc, b = _bound(v64, v64, lambda x: v64.decode(v64.encode(x).mean), pair, eps=EPS64)  # ~1e-12
    for i in range(2):
        assert_within(v64.decode(v64.encode(pair[i:i + 1]).mean), enc[i:i + 1], 2 * b, f"image {i} alone")
    assert b < 1e-10


@pytest.mark.parametrize("size", [32, 64])
def test_small_vae_shapes(size):
    # Catches: stride / channel bookkeeping errors for non-KL-16 configs; tokens not mean * latent_scale.
    torch.manual_seed(0)
    vae = build_vae(SMALL).eval()
    assert vae.config.stride == 4
    images = torch.rand(2, 3, size, size) * 2 - 1
    post = vae.encode(images)
    assert post.mean.shape == post.std.shape == (2, 4, size // 4, size // 4)
    assert post.moments.shape == (2, 8, size // 4, size // 4)
    tokens = vae.encode_tokens(images, sample=False)
    assert torch.allclose(tokens, post.mean * vae.config.latent_scale)
    assert vae.decode_tokens(tokens).shape == (2, 3, size, size)


def test_small_vae_stride8_with_attention():
    cfg = VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), attn_resolutions=(8,), num_groups=4, resolution=64,
                    embed_dim=8, z_channels=8)
    vae = build_vae(cfg).eval()
    assert cfg.stride == 8
    assert len(vae.encoder.down[3].attn) == 2 and all(len(vae.encoder.down[i].attn) == 0 for i in range(3))
    out = vae.decode(vae.encode(torch.zeros(1, 3, 32, 48)).mode())
    assert out.shape == (1, 3, 32, 48)


def test_gradient_flows_from_decode_to_latents():
    # Catches: a decoder that detaches its input (reward gradients could not reach the tokens).
    torch.manual_seed(0)
    vae = build_vae(SMALL)
    tokens = torch.randn(2, 4, 8, 8, requires_grad=True)
    vae.decode_tokens(tokens).square().mean().backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0


def test_config_roundtrip():
    cfg = VAEConfig(**SMALL)
    d = cfg.to_dict()
    assert d["ch_mult"] == [1, 2, 2] and d["num_groups"] == 8
    assert json.loads(json.dumps(d)) == d
    assert VAEConfig.from_dict(d) == cfg
    with torch.device("meta"):
        assert build_vae(d).config == cfg and build_vae(None).config == kl16_config()


# ------------------------------------------------------------------------------------------------------------
# Error messages
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return build_vae(SMALL).eval()


def test_rejects_unnormalised_images(small_vae):
    with pytest.raises(ValueError, match=r"expected images in \[-1, 1\].*\[0, 1\] or uint8"):
        small_vae.encode(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match="floating-point"):
        small_vae.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_rejects_bad_shapes(small_vae):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        small_vae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        small_vae.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the VAE stride 4"):
        small_vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="latents"):
        small_vae.decode(torch.zeros(1, 16, 8, 8))


def test_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown VAEConfig key 'chmult'"):
        VAEConfig.from_dict({"chmult": [1, 2]})
    with pytest.raises(ValueError, match="unknown VAEConfig key"):
        build_vae({"ch": 32, "double_z": True})
    with pytest.raises(ValueError, match="not divisible by num_groups=32"):
        VAEConfig(ch=48)
    with pytest.raises(ValueError, match="num_groups"):
        VAEConfig(ch=32, ch_mult=(1, 2), num_groups=12)


# ------------------------------------------------------------------------------------------------------------
# Posterior
# ------------------------------------------------------------------------------------------------------------
def test_diagonal_gaussian():
    # Catches: wrong mean / logvar split, std vs var in sample(), KL sign or sum convention.
    moments = torch.randn(2, 8, 3, 5)
    post = DiagonalGaussian(moments)
    assert post.mean.shape == post.std.shape == post.logvar.shape == post.var.shape == (2, 4, 3, 5)
    assert post.moments is moments and torch.equal(post.mode(), moments[:, :4])
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(7))
    expected = moments[:, :4] + torch.exp(0.5 * moments[:, 4:]) * noise
    assert torch.allclose(a, expected)

    standard = DiagonalGaussian(torch.zeros(3, 8, 2, 2))
    assert torch.equal(standard.kl(), torch.zeros(3))
    assert torch.all(DiagonalGaussian(moments).kl() > 0)


def test_logvar_is_clamped():
    # Catches: a missing logvar clamp (exp overflows to inf for untrained or adversarial inputs).
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(post.std).all()


def test_encode_tokens_sampling_is_seeded(small_vae):
    # Catches: posterior sampling ignoring the generator, or returning the mean when asked to sample.
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        t1 = small_vae.encode_tokens(images, generator=torch.Generator().manual_seed(3))
        t2 = small_vae.encode_tokens(images, generator=torch.Generator().manual_seed(3))
        mean = small_vae.encode(images).mean
    assert torch.equal(t1, t2) and not torch.allclose(t1, mean * small_vae.config.latent_scale)
