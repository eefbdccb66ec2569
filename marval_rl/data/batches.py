"""Training batches of scaled VAE latents (the MAR teacher's and the distiller's input), and plain collation."""
from __future__ import annotations

import torch

from marval_rl import distributed
from marval_rl.data.latent_cache import check_cache_fits
from marval_rl.data.sources import CachedLatentSource
from marval_rl.models.vae import AutoencoderKL, DiagonalGaussian


def collate(dataset, idx: torch.Tensor):
    """Stack dataset items (tensor, label) for the given indices."""
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def cache_moments(vae: AutoencoderKL, dataset, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior moments [N, 2, 2C, h, w] of every image (index 0) and its horizontal flip (index 1)."""
    device = next(vae.parameters()).device
    moments, labels = [], []
    for i in range(0, len(dataset), batch_size):
        x, y = collate(dataset, torch.arange(i, min(i + batch_size, len(dataset))))
        x = x.to(device)
        moments.append(torch.stack([vae.encode(x).moments, vae.encode(x.flip(-1)).moments], 1).cpu())
        labels.append(y)
    return torch.cat(moments), torch.cat(labels)


def dataset_moments(dataset, vae: AutoencoderKL,
                    image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments [N, 2, 2C, h, w] and labels of a dataset: read from a latent cache (which must be this VAE's,
    at ``image_size`` when given), or encoded now."""
    if isinstance(dataset, CachedLatentSource):
        check_cache_fits(dataset, vae, image_size)
        return dataset.moments, dataset.labels
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    return cache_moments(vae, dataset)


class LatentBatches:
    """Batches of scaled VAE latents for training: from cached moments, or encoded on the fly.

    Small datasets (the emoji set) and cache files keep every image's moments and its flip's at hand (a
    cache file memory-mapped) and draw one of the two plus a posterior sample per step. Datasets larger than ``max_cached``
    images (ImageNet as an ImageFolder) are encoded batch by batch instead, as MAR does without a
    latent cache; the flip then comes from the dataset's own augmentation.
    """

    def __init__(self, dataset, vae: AutoencoderKL, max_cached: int = 200_000, image_size: int | None = None):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.vae, self.scale = dataset, vae, vae.config.latent_scale
        self.cached = isinstance(dataset, CachedLatentSource) or len(dataset) <= max_cached
        self.moments = self.labels = None
        if self.cached:
            self.moments, self.labels = dataset_moments(dataset, vae, image_size)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, batch_size: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a global batch of ``batch_size`` latents and labels (all of it in one
        process): the indices, flips and posterior noise are drawn for the whole batch on every rank."""
        if distributed.active() and len(self) < batch_size:
            raise ValueError(f"the dataset has {len(self)} items, fewer than the global batch of {batch_size}: "
                             f"with data-parallel ranks the batch must be whole (lower the batch size)")
        idx = torch.randperm(len(self), generator=gen)[:batch_size]
        if self.cached:
            flip = torch.randint(0, 2, (len(idx),), generator=gen)
            post, labels = DiagonalGaussian(self.moments[idx, flip]), self.labels[idx]
            return (distributed.shard(post.sample(gen)) * self.scale).to(device), distributed.shard(labels).to(device)
        rows = distributed.local_rows(len(idx))
        images, labels = collate(self.dataset, idx[rows])
        with torch.no_grad():
            post = self.vae.encode(images.to(device))
        noise = torch.randn((len(idx), *post.mean.shape[1:]), generator=gen, device=gen.device)[rows]
        latents = post.mean + post.std * noise.to(device=post.mean.device, dtype=post.mean.dtype)
        return (latents * self.scale).to(device), labels.to(device)
