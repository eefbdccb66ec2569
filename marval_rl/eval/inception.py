"""Standard FID and Inception Score: the 2015-12-05 TF Inception (ported to PyTorch) against ImageNet
reference statistics, as LTH14/mar computes them with torch-fidelity.

The network is torch-fidelity's ``FeatureExtractorInceptionV3`` (not re-implemented here); its weights come
only from a local file, the published ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release;
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has the same layout), or from the torch hub
cache where either library left it. Nothing is downloaded. The file is read with
``torch.load(weights_only=True)`` and its keys and shapes are checked before use; torch-fidelity's own
loader unpickles without that guard, so it is handed the checked tensors, never the user's file.

Reference statistics are the ``.npz`` format of MAR's ``fid_stats/adm_in256_stats.npz``: ``mu`` [2048] and
``sigma`` [2048, 2048] of pool3 features of the ImageNet 256x256 training images (ADM's reference batch).
FID and IS themselves are torch-fidelity's functions (``fid_statistics_to_metric``, ``isc_features_to_metric``
with its defaults: 10 splits, shuffled with seed 2020), so the numbers are those MAR reports.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from marval_rl.config import RecipeError
from marval_rl.models.checkpoints import CheckpointError, torch_load_safely

WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHT_FILES[0]
POOL_DIM, LOGITS_DIM = 2048, 1008
STATS_HINT = ("MAR's ImageNet 256x256 statistics are fid_stats/adm_in256_stats.npz in github.com/LTH14/mar "
              "(keys mu [2048], sigma [2048, 2048])")


def _torch_fidelity():
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fe
    except ImportError as e:
        raise ImportError(f"FID / Inception Score need torch-fidelity: pip install 'marval-rl[fid]' ({e})") from e
    return fe


def find_inception_weights(path: str = "") -> Path:
    """``path`` when given, else the published file in the torch hub cache (``torch.hub.get_dir()``)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise RecipeError(f"evaluate.inception_weights: {path} is not a file (the published "
                              f"{WEIGHT_FILES[0]}, from {WEIGHTS_URL})")
        return p
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHT_FILES:
        if (cache / name).is_file():
            return cache / name
    raise RecipeError(f"evaluate.inception_weights is empty and {cache} holds neither {' nor '.join(WEIGHT_FILES)}: "
                      f"download {WEIGHTS_URL} and give its path (nothing is downloaded at run time)")


def _layout_problems(own: dict, given: dict) -> str:
    """One line naming what differs between the network's state dict and the file's ('' when it fits).
    BatchNorm's ``num_batches_tracked`` counters are optional (files converted from TF have none)."""
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in given and k not in optional]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in given and tuple(given[k].shape) != tuple(v.shape)]
    parts = [f"{len(items)} {what} (e.g. {items[0]})" for what, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    return "; ".join(parts)


def load_inception(path: str = "", device="cpu"):
    """torch-fidelity's Inception with the 2015-12-05 weights from ``path`` (or the hub cache), checked;
    returns ``(network, weights_file)``. The network maps uint8 [N, 3, H, W] to (pool3 [N, 2048],
    logits_unbiased [N, 1008])."""
    fe = _torch_fidelity()
    source = find_inception_weights(path)
    try:
        state = torch_load_safely(source)
    except CheckpointError as e:
        raise CheckpointError(f"evaluate.inception_weights: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"evaluate.inception_weights: {source} is not a state dict of tensors (expected "
                              f"{WEIGHT_FILES[0]})")

    class CheckedInception(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            # the layout check against torch-fidelity's own module, before any tensor is copied
            problems = _layout_problems(self.state_dict(), state_dict)
            if problems:
                raise CheckpointError(f"evaluate.inception_weights: {source} is not the 2015-12-05 TF Inception "
                                      f"in pytorch-fid / torch-fidelity layout: {problems}")
            bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            if bad:
                raise CheckpointError(f"evaluate.inception_weights: {source} holds non-finite weights (e.g. {bad[0]})")
            return super().load_state_dict(state_dict, strict=True)

    buffer = io.BytesIO()
    torch.save(dict(state), buffer)      # only the checked tensors: what torch-fidelity unpickles is ours
    buffer.seek(0)
    del state
    net = CheckedInception("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer)
    return net.to(device).eval(), source


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 as a saved PNG holds them (MAR rounds ``x * 255`` before writing)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def inception_outputs(net, images: torch.Tensor, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool3 features [N, 2048], logits_unbiased [N, 1008]) of [0, 1] images, float32 on the CPU."""
    device = next(net.parameters()).device
    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        p, lg = net(to_uint8(images[i:i + batch_size]).to(device))
        pools.append(p.float().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(pools), torch.cat(logits)


def load_npz_stats(path: str) -> dict:
    """``{"mu": float64 [2048], "sigma": float64 [2048, 2048]}`` from a MAR-style ``.npz``."""
    if not path:
        raise RecipeError(f"evaluate.metrics has fid but evaluate.reference_stats is empty: give the .npz of "
                          f"the real images' Inception statistics ({STATS_HINT})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(f"evaluate.reference_stats: {path} is not a file ({STATS_HINT})")
    try:
        with np.load(p, allow_pickle=False) as z:
            stats = {k: np.asarray(z[k], dtype=np.float64) for k in ("mu", "sigma") if k in z.files}
            found = list(z.files)
    except Exception as e:  # noqa: BLE001  (zip / format errors of a foreign file)
        raise RecipeError(f"evaluate.reference_stats: cannot read {p} as .npz ({type(e).__name__}: {e})") from None
    if set(stats) != {"mu", "sigma"}:
        raise RecipeError(f"evaluate.reference_stats: {p} has keys {found}, expected mu and sigma ({STATS_HINT})")
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
        raise RecipeError(f"evaluate.reference_stats: {p} has mu {mu.shape} and sigma {sigma.shape}; Inception pool3 "
                          f"statistics are mu ({POOL_DIM},) and sigma ({POOL_DIM}, {POOL_DIM})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise RecipeError(f"evaluate.reference_stats: {p} holds non-finite values")
    return stats


def feature_stats(features: torch.Tensor) -> dict:
    """float64 mean and unbiased covariance (numpy's ``np.cov``, as torch-fidelity and pytorch-fid use)."""
    f = features.double().numpy()
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}


def fid_from_features(features: torch.Tensor, reference: dict) -> float:
    """FID of generated pool3 ``features`` against reference ``{"mu", "sigma"}`` (torch-fidelity's formula)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(features)}")
    ref = {k: np.asarray(reference[k], dtype=np.float64) for k in ("mu", "sigma")}
    return float(fid_statistics_to_metric(feature_stats(features), ref, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` (torch-fidelity's, on logits_unbiased)."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    if len(logits) < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(logits, splits=splits)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])
