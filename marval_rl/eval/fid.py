"""FID-proxy: Frechet distance on the embedded classifier's penultimate features (128-d).

This is *not* Inception FID; its values are only comparable with other FID-proxy values computed
with the same classifier and reference statistics. The reference statistics ship with the package
(``marval_rl/assets/embedded/fid``), so scoring needs no real images and no network.
Scoring uses torchmetrics' ``FrechetInceptionDistance`` with a custom feature extractor, whose
real-feature state is restored exactly from the stored sums.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from marval_rl import strict_json
from marval_rl.models.preprocess import check_images

STATS_FILE = "stats.safetensors"
INFO_FILE = "stats.json"


def classifier_fingerprint(classifier: nn.Module) -> str:
    """sha256 over the state dict: stats are only meaningful with the network that produced them."""
    h = hashlib.sha256()
    for k, v in sorted(classifier.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureExtractor(nn.Module):
    """torchmetrics feature extractor: [0, 1] images -> the classifier's penultimate features."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.num_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # BatchNorm must use its running statistics, whatever mode the caller left the model in.
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            return self.classifier.features(images)
        finally:
            self.classifier.train(was_training)


def _as_unit_float(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        return images.float() / 255
    check_images(images)
    return images


@torch.no_grad()
def feature_moments(classifier: nn.Module, images, batch_size: int = 256) -> dict:
    """float64 sum, sum of outer products, count, mean and unbiased covariance of the features."""
    images = _as_unit_float(images)
    if len(images) < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {len(images)}")
    extract = FeatureExtractor(classifier)
    device = next(classifier.parameters()).device
    d = extract.num_features
    s, ss = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, len(images), batch_size):
        f = extract(images[i:i + batch_size].to(device)).double().cpu()
        s += f.sum(0)
        ss += f.T @ f
    n = len(images)
    mu = s / n
    sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)  # the same formula torchmetrics uses
    return {"sum": s, "cov_sum": ss, "num_samples": torch.tensor(n, dtype=torch.int64),
            "mu": mu, "sigma": sigma}


def compute_reference_stats(classifier: nn.Module, images, out_dir, provenance: dict | None = None,
                            batch_size: int = 256) -> Path:
    """Write the reference statistics of ``images`` (uint8, or float in [0, 1]) to ``out_dir``.

    ``stats.safetensors`` holds float64 mu / sigma plus torchmetrics' raw sums (so its state is
    restored bit-exactly); ``stats.json`` records provenance and the classifier fingerprint.
    """
    from marval_rl.models.checkpoints import atomic_write

    out_dir = Path(out_dir)
    stats = feature_moments(classifier, images, batch_size)
    atomic_write(out_dir / STATS_FILE, lambda p: save_file({k: v.contiguous() for k, v in stats.items()}, p))
    info = {"num_samples": int(stats["num_samples"]), "feature_dim": int(stats["mu"].numel()),
            "classifier_fingerprint": classifier_fingerprint(classifier),
            "feature": "EmojiClassifier.features (penultimate, after ReLU)",
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), **(provenance or {})}
    atomic_write(out_dir / INFO_FILE, lambda p: Path(p).write_text(strict_json.dumps(info, indent=1)))
    return out_dir


def load_reference_stats(stats_dir) -> dict:
    """Read a directory written by :func:`compute_reference_stats`; adds the json as ``"info"``."""
    stats_dir = Path(stats_dir)
    path = stats_dir / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no FID reference statistics at {stats_dir} (expected {STATS_FILE}; "
                                f"create them with marval_rl.eval.fid.compute_reference_stats)")
    try:
        stats = load_file(str(path))
    except Exception as e:
        raise ValueError(f"could not read {path}: truncated or corrupt ({e})") from e
    missing = {"sum", "cov_sum", "num_samples", "mu", "sigma"} - set(stats)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    info_path = stats_dir / INFO_FILE
    stats["info"] = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return stats


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), in float64.

    Tr((S1 S2)^1/2) is computed as the sum of sqrt-eigenvalues of the symmetric PSD matrix
    S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which avoids complex eigenvalues from round-off.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


class FIDProxy:
    """Frechet distance of generated images' classifier features against stored reference stats.

    ``stats``: a directory from :func:`compute_reference_stats` or the dict :func:`load_reference_stats`
    returns. The classifier must be the one the stats were computed with (checked by fingerprint,
    unless ``check_fingerprint=False``).
    """

    def __init__(self, classifier: nn.Module, stats, batch_size: int = 256, check_fingerprint: bool = True):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if not isinstance(stats, dict):
            stats = load_reference_stats(stats)
        d = int(classifier.num_features)
        if stats["mu"].shape != (d,) or stats["cov_sum"].shape != (d, d):
            raise ValueError(f"reference stats have feature dim {tuple(stats['mu'].shape)}, "
                             f"the classifier has {d}")
        expected = stats.get("info", {}).get("classifier_fingerprint")
        if check_fingerprint and expected and expected != classifier_fingerprint(classifier):
            raise ValueError("these FID reference stats were computed with a different classifier "
                             f"(fingerprint {expected}); recompute them for this classifier")
        self.classifier = classifier
        self.batch_size = batch_size
        self.stats = stats
        device = next(classifier.parameters()).device
        self.metric = FrechetInceptionDistance(feature=FeatureExtractor(classifier), normalize=True,
                                               reset_real_features=False).to(device)
        # The real half of the metric's state (names as in torchmetrics 1.4-1.9); reset() keeps it.
        self.metric.real_features_sum = stats["sum"].to(device, torch.float64).clone()
        self.metric.real_features_cov_sum = stats["cov_sum"].to(device, torch.float64).clone()
        self.metric.real_features_num_samples = stats["num_samples"].to(device, torch.int64).clone()

    @property
    def num_reference(self) -> int:
        return int(self.stats["num_samples"])

    @torch.no_grad()
    def score(self, images) -> float:
        """FID-proxy of ``images`` ([N, 3, H, W] float in [0, 1], or uint8); lower is better.

        Like any FID it is biased upward for small N: compare values at equal N (>= ~500 advised).
        """
        images = _as_unit_float(images)
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 images, got {len(images)}")
        self.metric.reset()
        device = self.metric.real_features_sum.device
        for i in range(0, len(images), self.batch_size):
            self.metric.update(images[i:i + self.batch_size].to(device), real=False)
        value = float(self.metric.compute())
        self.metric.reset()
        return value


def blur3x3(images: torch.Tensor) -> torch.Tensor:
    """3x3 box blur with replicate padding: the standard 'degraded' control for the FID proxy."""
    x = torch.nn.functional.pad(images, [1, 1, 1, 1], mode="replicate")
    return torch.nn.functional.avg_pool2d(x, 3, stride=1)
