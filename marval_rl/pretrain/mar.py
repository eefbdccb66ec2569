"""Stage "mar": train a MAR teacher on VAE latents with the official recipe, scaled down.

Official recipe where it applies: AdamW (0.9, 0.95), weight decay 0.02 except biases, norms and the
whole diffusion head, linear warm-up then constant lr, label drop 0.1, diffusion_batch_mul 4,
grad clip 3.0, EMA (evaluation uses the EMA weights). Latents are cached once as the posterior
moments of each image and of its horizontal flip; every step draws one of the two and a posterior
sample, as MAR's cached-latent path does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from marval_rl.config import MARTrainSection
from marval_rl.eval.images import save_grid
from marval_rl.models.checkpoints import save_pretrained
from marval_rl.models.mar import MAR, MARConfig
from marval_rl.models.vae import AutoencoderKL, DiagonalGaussian
from marval_rl.pretrain.common import collate, run_loop
from marval_rl.sampling import sample_tokens


def check_pair(config: MARConfig, vae: AutoencoderKL, image_size: int | None = None) -> None:
    """A MAR teacher and a VAE fit together only with the same latent grid and channel count."""
    if config.vae_stride != vae.config.stride or config.vae_embed_dim != vae.config.embed_dim:
        raise ValueError(f"MAR expects latents of stride {config.vae_stride} with {config.vae_embed_dim} "
                         f"channels, the VAE makes stride {vae.config.stride} with {vae.config.embed_dim}")
    if image_size is not None and config.img_size != image_size:
        raise ValueError(f"MAR img_size {config.img_size} differs from the data's image_size {image_size}")


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


def dataset_moments(dataset, vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments [N, 2, 2C, h, w] and labels of a dataset: read from a latent cache, or encoded now."""
    from marval_rl.data.sources import CachedLatentSource

    if isinstance(dataset, CachedLatentSource):
        if dataset.moments.shape[2] != 2 * vae.config.embed_dim:
            raise ValueError(f"cached latents have {dataset.moments.shape[2] // 2} channels, the VAE "
                             f"{vae.config.embed_dim}: the cache was made with another VAE")
        return dataset.moments, dataset.labels
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    return cache_moments(vae, dataset)


class LatentBatches:
    """Batches of scaled VAE latents for training: from cached moments, or encoded on the fly.

    Small datasets (the emoji set, a cache file) keep every image's moments and its flip's in memory
    and draw one of the two plus a posterior sample per step. Datasets larger than ``max_cached``
    images (ImageNet as an ImageFolder) are encoded batch by batch instead, as MAR does without a
    latent cache; the flip then comes from the dataset's own augmentation.
    """

    def __init__(self, dataset, vae: AutoencoderKL, max_cached: int = 200_000):
        from marval_rl.data.sources import CachedLatentSource

        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset, self.vae, self.scale = dataset, vae, vae.config.latent_scale
        self.cached = isinstance(dataset, CachedLatentSource) or len(dataset) <= max_cached
        self.moments = self.labels = None
        if self.cached:
            self.moments, self.labels = dataset_moments(dataset, vae)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, batch_size: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(self), generator=gen)[:batch_size]
        if self.cached:
            flip = torch.randint(0, 2, (len(idx),), generator=gen)
            post, labels = DiagonalGaussian(self.moments[idx, flip]), self.labels[idx]
        else:
            images, labels = collate(self.dataset, idx)
            with torch.no_grad():
                post = self.vae.encode(images.to(device))
        return (post.sample(gen) * self.scale).to(device), labels.to(device)


def train_mar(section: MARTrainSection, dataset, vae: AutoencoderKL, out_dir: Path, *, seed: int,
              image_size: int, log_every: int, checkpoint_every: int, sample_every: int,
              device: str = "cpu", progress: bool = True) -> tuple[MAR, dict]:
    config = MARConfig.from_dict({"vae_embed_dim": vae.config.embed_dim, **dict(section.config)})
    check_pair(config, vae, image_size)
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None and num_classes > config.class_num:
        raise ValueError(f"the data has {num_classes} classes but MAR class_num is {config.class_num}")
    torch.manual_seed(seed)
    model = MAR(config).to(device)
    vae = vae.to(device).eval()
    batches = LatentBatches(dataset, vae)
    generator = torch.Generator().manual_seed(seed)
    grid_labels = torch.arange(min(16, config.class_num))

    def loss_fn(step, gen):
        latents, labels = batches.sample(section.optim.batch_size, gen, device)
        return model(latents, labels, generator=gen), {}

    def on_sample(step, ema_model):
        res = sample_tokens(ema_model, labels=grid_labels, num_iter=min(8, ema_model.seq_len), cfg=3.0,
                            generator=torch.Generator().manual_seed(0), record_noise=False)
        images = vae.decode_images(res.tokens)
        save_grid(images, out_dir / "samples" / f"mar_samples_{step:06d}.png", nrow=8)

    teacher, metrics = run_loop(name="mar", model=model, optim=section.optim, out_dir=out_dir,
                                loss_fn=loss_fn, generator=generator, log_every=log_every,
                                checkpoint_every=checkpoint_every, sample_every=sample_every,
                                on_sample=on_sample, no_decay_prefixes=("diffloss",), progress=progress)
    save_pretrained(teacher, out_dir / "teacher", metadata={"stage": "mar", "ema": section.optim.ema, **metrics})
    return teacher, metrics
