"""The MAR backbone and AR loop against golden tensors produced by the official code (LTH14/mar).

Float32 comparisons use bounds derived from float32's own error (tests/numerics.py); every piece is
also run in float64 from the same weights and held to the golden within one float32 bound."""
import copy

import numpy as np
import pytest
import torch

from conftest import TINY_MAR, golden, tiny_constructor
from marval_rl.models import MAR, load_official_mar
from marval_rl.sampling import sample_tokens
from numerics import (EPS64, Ledger, MaxActivation, add_in_quadrature, assert_within, count_stages,
                      loss_sigma, monte_carlo_bound, network_bound, network_sigma)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend on 2 shared cores


@pytest.fixture(scope="module")
def tiny_mar64(tiny_mar):
    return copy.deepcopy(tiny_mar).double()


def _backbone_stages(model) -> int:
    return count_stages(model) - count_stages(model.diffloss)


def _encoder_stages(model) -> int:
    return sum(count_stages(m) for m in (model.z_proj, model.z_proj_ln, model.encoder_blocks, model.encoder_norm))


def test_condition_matches_golden_z(tiny_mar, tiny_mar64):
    # Catches: backbone bugs (buffer / class tokens, pos-embed before LN, visible-token gather, mask token).
    g = golden("golden_z")
    tokens = tiny_mar.patchify(g["x"])
    torch.testing.assert_close(tokens, g["tokens"], rtol=0, atol=0)
    torch.testing.assert_close(tiny_mar.unpatchify(tokens), g["x"], rtol=0, atol=0)
    cases = {"encoder_out": lambda m, x, mask, y: m.forward_mae_encoder(x, mask, m.class_embedding(y, x.shape[0])),
             "z": lambda m, x, mask, y: m.condition(x, mask, y),
             "z_allmasked_cond": lambda m, x, mask, y: m.condition(0 * x, torch.ones_like(mask), y),
             "z_allmasked_uncond": lambda m, x, mask, y: m.condition(0 * x, torch.ones_like(mask), None)}
    for name, fn in cases.items():
        stages = _encoder_stages(tiny_mar) if name == "encoder_out" else _backbone_stages(tiny_mar)
        with torch.no_grad(), MaxActivation(tiny_mar64) as mx:
            out64 = fn(tiny_mar64, tokens.double(), g["mask"], g["labels"])
        bound = network_bound(mx.value, stages)  # B = 3 sqrt(S) eps32 M, ~2e-5 here
        with torch.no_grad():
            out = fn(tiny_mar, tokens, g["mask"], g["labels"])
        assert out64.dtype == torch.float64
        assert_within(out64, g[name], bound, f"float64 {name}")
        assert_within(out, g[name], 2 * bound, f"float32 {name}")
        # float64 run to run: each sample alone equals its row of the batch (no cross-sample leakage).
        b64 = network_bound(mx.value, stages, eps=EPS64)
        for i in range(2):
            with torch.no_grad():
                alone = fn(tiny_mar64, tokens[i:i + 1].double(), g["mask"][i:i + 1], g["labels"][i:i + 1])
            assert_within(alone, out64[i:i + 1], 2 * b64, f"float64 {name} sample {i} alone")


def _backbone_scale(model64, g, label_drop=None) -> float:
    """M of the backbone alone (the head's activations do not enter z's bound)."""
    with MaxActivation(model64) as mx, torch.no_grad():
        model64.condition(model64.patchify(g["x"].double()), g["mask"], g["labels"], label_drop)
    return mx.value


def _loss_terms_bound(model64, g, z64, mask_rows, label_drop=None):
    """B per row of the head's loss terms and the masked loss, from float64: z (a backbone output,
    3 sqrt(S) eps32 M) and everything the head and diffusion round (numerics.Ledger)."""
    ledger = Ledger()
    z_rows = ledger.add(z64.reshape(-1, z64.shape[-1]).repeat(model64.diffusion_batch_mul, 1).clone(),
                        network_sigma(_backbone_scale(model64, g, label_drop), _backbone_stages(model64)))
    target = model64.patchify(g["x"].double()).reshape(-1, model64.token_embed_dim).repeat(
        model64.diffusion_batch_mul, 1)
    handles = ledger.record_head(model64.diffloss.net) + [ledger.record_diffusion(model64.diffloss.train_diffusion)]
    try:
        with torch.enable_grad():
            terms = model64.diffloss.loss_terms(target, z_rows, t=g["t"], noise=g["noise"].double())
            own = loss_sigma(model64.diffloss.train_diffusion, target, g["t"], g["noise"], terms["net_out"].detach())
            b = {k: add_in_quadrature(ledger.bound(terms[k][:, None], rows_independent=True), own[:, None])[:, 0]
                 for k in ("mse", "vb", "loss")}
            b["net_out"] = ledger.bound(terms["net_out"], rows_independent=True)
    finally:
        for h in handles:
            h.remove()
    loss = (terms["loss"].detach() * mask_rows).sum() / mask_rows.sum()
    # The masked mean: the weighted mean of the rows' B, plus the reduction's rounding.
    weighted = (b["loss"] * mask_rows).sum() / mask_rows.sum()
    b["masked"] = add_in_quadrature(weighted, network_sigma(float(loss), mask_rows.numel()))
    return b


def test_eval_loss_matches_golden(tiny_mar, tiny_mar64):
    # Catches: loss wiring in MAR.forward (mask from orders, row tiling x4, t / noise order, mask weighting).
    g = golden("golden_loss")
    kw = dict(orders=g["orders"], mask_rate=g["mask_rate"], t=g["t"], return_terms=True)
    with torch.no_grad():
        loss, terms = tiny_mar(g["x"], g["labels"], noise=g["noise"], **kw)
        loss64, terms64 = tiny_mar64(g["x"].double(), g["labels"], noise=g["noise"].double(), **kw)
    torch.testing.assert_close(terms["mask"], g["mask"], rtol=0, atol=0)
    mask_rows = terms["mask"].reshape(-1).repeat(tiny_mar.diffusion_batch_mul)
    bounds = _loss_terms_bound(tiny_mar64, g, terms64["z"], mask_rows)
    for name in ("net_out", "mse", "vb", "loss"):
        gold = g["net_out"] if name == "net_out" else g[f"terms_{name}"]
        assert_within(terms64[name], gold, bounds[name], f"float64 {name}")
        assert_within(terms[name], gold, 2 * bounds[name], f"float32 {name}")
    assert_within(loss64, g["loss_eval"], bounds["masked"], "float64 loss")
    assert_within(loss, g["loss_eval"], 2 * bounds["masked"], "float32 loss")


def test_train_loss_with_label_drop_matches_golden():
    """Train-mode semantics (dropout off, sample 1's class replaced by the null class)."""
    # Catches: label drop not applied (or applied in eval), or mixing in the null class wrongly.
    g = golden("golden_loss")
    model = load_official_mar(TINY_MAR / "checkpoint.pth",
                              {**tiny_constructor(), "attn_dropout": 0.0, "proj_dropout": 0.0}).train()
    model64 = copy.deepcopy(model).double()
    kw = dict(orders=g["orders"], mask_rate=g["mask_rate"], label_drop=g["label_drop"], t=g["t"],
              return_terms=True)
    with torch.no_grad():
        loss64, terms64 = model64(g["x"].double(), g["labels"], noise=g["noise"].double(), **kw)
        loss, terms = model(g["x"], g["labels"], noise=g["noise"], **kw)
    b_z = network_bound(_backbone_scale(model64, g, g["label_drop"]), _backbone_stages(model))
    assert_within(terms64["z"], g["z_train"], b_z, "float64 z_train")
    assert_within(terms["z"], g["z_train"], 2 * b_z, "float32 z_train")
    mask_rows = terms["mask"].reshape(-1).repeat(model.diffusion_batch_mul)
    bounds = _loss_terms_bound(model64, g, terms64["z"], mask_rows, g["label_drop"])
    assert_within(terms64["loss"], g["terms_loss_train"], bounds["loss"], "float64 train terms")
    assert_within(terms["loss"], g["terms_loss_train"], 2 * bounds["loss"], "float32 train terms")
    assert_within(loss64, g["loss_train"], bounds["masked"], "float64 train loss")
    assert_within(loss, g["loss_train"], 2 * bounds["masked"], "float32 train loss")


def test_ema_entry_is_loaded_by_default(tiny_mar):
    """The 'model' entry differs on purpose; ema=False must load it (and differ from the golden)."""
    # Catches: loading the raw weights where the EMA ones are meant (or ignoring ema=False).
    raw = load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor(), ema=False)
    ckpt = torch.load(TINY_MAR / "checkpoint.pth", weights_only=True)
    for k, v in tiny_mar.state_dict().items():
        assert torch.equal(v, ckpt["model_ema"][k])
        assert torch.equal(raw.state_dict()[k], ckpt["model"][k])
    g = golden("golden_z")
    with torch.no_grad():
        z = raw.condition(raw.patchify(g["x"]), g["mask"], g["labels"])
    assert (z - g["z"]).abs().max() > 1e-3


def _numpy_orders(seed=1234, bsz=2, n=16):
    np.random.seed(seed)
    out = []
    for _ in range(bsz):
        a = np.arange(n)
        np.random.shuffle(a)
        out.append(a)
    return torch.as_tensor(np.stack(out))


def _sample_tokens_bound(model64, run) -> float:
    """B of every token of a float64 ``run()``: too many for per-element derivatives (512 tokens
    through 4 AR steps of 100-step chains), so a Monte Carlo emulation of the same rounding model
    (numerics.monte_carlo_bound): backbone z (3 sqrt(S) eps32 M), every head call, x0 estimate and
    posterior mean perturbed by their sigma."""
    with MaxActivation(model64) as mx, torch.no_grad():
        model64.condition(torch.zeros(1, model64.seq_len, model64.token_embed_dim, dtype=torch.float64),
                          torch.ones(1, model64.seq_len), None)
    z_sigma = network_sigma(mx.value, _backbone_stages(model64))

    def record(ledger):
        handles = ledger.record_head(model64.diffloss.net)
        handles.append(ledger.record_diffusion(model64.diffloss.gen_diffusion))
        handles.append(model64.decoder_norm.register_forward_hook(lambda m, i, o: ledger.add(o, z_sigma)))
        return handles
    return monte_carlo_bound(run, record)


@pytest.mark.parametrize("case", ["cfg1_linear_temp1", "cfg2_linear_temp1", "cfg2_constant_temp1",
                                  "uncond_cfg1"])
def test_sample_tokens_matches_golden(tiny_mar, tiny_mar64, case):
    # Catches: AR-loop bugs (unmasking order, cosine mask schedule, CFG schedule, draw order, null class).
    g = golden("golden_sample_tokens")[case]
    orders = g.get("orders", _numpy_orders(int(g["seed"])))
    if "orders" in g:
        torch.testing.assert_close(orders, _numpy_orders(int(g["seed"])))  # our reading of the RNG order

    def run(model=tiny_mar64):
        gen = torch.Generator().manual_seed(int(g["seed"]))
        return sample_tokens(model, bsz=int(g["bsz"]), labels=g["labels"], num_iter=int(g["num_iter"]),
                             cfg=float(g["cfg"]), cfg_schedule=g["cfg_schedule"],
                             temperature=float(g["temperature"]), orders=orders, generator=gen)
    bound = _sample_tokens_bound(tiny_mar64, lambda: run().tokens)  # ~1e-3 (cfg 1) .. ~1e-2 (cfg 2)
    with torch.no_grad():
        res, res64 = run(tiny_mar), run()
    assert res64.tokens.dtype == torch.float64
    assert_within(res64.tokens, g["tokens"], bound, "float64 tokens")
    assert_within(res.tokens, g["tokens"], 2 * bound, "float32 tokens")
    if "cfg_iter_per_step" in g:
        torch.testing.assert_close(torch.tensor(res.record.cfg_per_step), g["cfg_iter_per_step"].float())
        assert res.rows_per_step == [int(r) for r in g["rows_per_step"]] or \
            [2 * r for r in res.rows_per_step] == [int(r) for r in g["rows_per_step"]]


def test_replay_reproduces_tokens_exactly(tiny_mar):
    # Catches: a replay that re-draws (or skips) randomness instead of reusing the record.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        first = sample_tokens(tiny_mar, labels=[1, 2, 3], num_iter=5, cfg=1.5, generator=gen)
        again = sample_tokens(tiny_mar, replay=first.record)
    assert torch.equal(first.tokens, again.tokens)
    # a different generator gives a different trajectory (the replay is not a no-op)
    with torch.no_grad():
        other = sample_tokens(tiny_mar, labels=[1, 2, 3], num_iter=5, cfg=1.5,
                              generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(first.tokens, other.tokens)


def test_replay_with_grad_matches_and_backprops(tiny_mar):
    """The RL trainer's use: replay a no-grad rollout with autograd on and differentiate."""
    # Catches: a replay that detaches the head (no gradient) or changes the trajectory under autograd.
    with torch.no_grad():
        roll = sample_tokens(tiny_mar, labels=[0, 5], num_iter=3, generator=torch.Generator().manual_seed(3))
    head_w = tiny_mar.diffloss.net.final_layer.linear.weight
    head_w.requires_grad_(True)
    again = sample_tokens(tiny_mar, replay=roll.record)
    torch.testing.assert_close(again.tokens.detach(), roll.tokens, rtol=0, atol=1e-6)
    again.tokens.square().mean().backward()
    assert head_w.grad is not None and head_w.grad.abs().sum() > 0
    head_w.grad = None


def test_every_token_predicted_once(tiny_mar):
    # Catches: a mask schedule that predicts a token twice or never.
    with torch.no_grad():
        res = sample_tokens(tiny_mar, labels=[0, 1], num_iter=7, generator=torch.Generator().manual_seed(0))
    stacked = torch.stack(res.record.predicted).int()
    assert torch.equal(stacked.sum(0), torch.ones(2, 16, dtype=torch.int32))
    assert all(int(p.sum()) > 0 for p in res.record.predicted)


@pytest.mark.parametrize("name", ["mar_base", "mar_large", "mar_huge"])
def test_factories_match_official_manifest(name):
    # Catches: a factory with the wrong size (key names, shapes or parameter count off the release).
    import json
    from conftest import FIXTURES

    manifest = json.loads((FIXTURES / "mar_state_dict_manifest.json").read_text())["models"][name]
    with torch.device("meta"):
        model = MAR(name)
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == \
        [(e["key"], e["shape"]) for e in manifest["keys"]]
    assert sum(v.numel() for v in sd.values()) == manifest["num_params"]
    assert sum(p.numel() for p in model.diffloss.parameters()) == manifest["num_params_diffloss"]
