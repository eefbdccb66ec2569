"""Stage "vae": train a small KL autoencoder (same class as KL-16, fewer channels, smaller stride).

Loss as in LDM's KL autoencoder without the perceptual / adversarial terms (no offline LPIPS or
discriminator worth their cost at 32 px): per-image sum of |x - x_rec| plus ``kl_weight`` x KL.
After training, ``latent_scale`` is set to 1 / std of the train latents, the role 0.2325 plays for
KL-16 on ImageNet, so MAR sees unit-variance tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch

from marval_rl import distributed
from marval_rl.config import DataSection, VAETrainSection
from marval_rl.eval.images import save_grid
from marval_rl.models.checkpoints import save_pretrained
from marval_rl.models.vae import AutoencoderKL, VAEConfig
from marval_rl.data.batches import collate
from marval_rl.pretrain.common import loop_settings, register_pretrain_stage
from marval_rl.training import LossStage, Trainable, run_loop


@torch.no_grad()
def measure_latent_std(vae: AutoencoderKL, dataset, generator: torch.Generator, n: int = 1024,
                       batch_size: int = 128) -> float:
    idx = torch.randperm(len(dataset), generator=generator)[:n]
    samples = []
    for i in range(0, len(idx), batch_size):
        x, _ = collate(dataset, idx[i:i + batch_size])
        samples.append(vae.encode(x.to(next(vae.parameters()).device)).sample(generator).flatten())
    return torch.cat(samples).std().item()


def train_vae(section: VAETrainSection, data: DataSection, dataset, out_dir: Path, *, seed: int,
              log_every: int, checkpoint_every: int, sample_every: int, device: str = "cpu",
              progress: bool = True) -> tuple[AutoencoderKL, dict]:
    config = VAEConfig.from_dict(dict(section.config))
    if data.image_size % config.stride:
        raise ValueError(f"image_size {data.image_size} is not divisible by the VAE stride {config.stride}")
    distributed.check_divides(section.optim.batch_size, "pretrain.vae.optim.batch_size")
    torch.manual_seed(seed)
    vae = AutoencoderKL(config).to(device)
    generator = torch.Generator().manual_seed(seed)
    fixed, _ = collate(dataset, torch.arange(min(16, len(dataset))))

    def loss_fn(step, gen):
        # this rank's share of the global batch; the posterior noise is drawn for all of it (distributed.py)
        idx = torch.randperm(len(dataset), generator=gen)[:section.optim.batch_size]
        x, _ = collate(dataset, idx[distributed.local_rows(len(idx))])
        x = x.to(device)
        post = vae.encode(x)
        noise = torch.randn((len(idx), *post.mean.shape[1:]), generator=gen, device=gen.device)
        rec = vae.decode(post.mean + post.std * distributed.shard(noise).to(post.mean))
        rec_loss = (x - rec).abs().flatten(1).sum(1).mean()
        kl = post.kl().mean()
        mse = ((x - rec) ** 2).mean()
        return rec_loss + section.kl_weight * kl, {"rec_l1_per_px": rec_loss / x[0].numel(), "kl": kl,
                                                   "mse": mse}

    def on_sample(step, model):
        rec = model.decode(model.encode(fixed.to(device)).mode()).cpu()
        save_grid(torch.cat([fixed, rec]).add(1).div(2), out_dir / "samples" / f"vae_recon_{step:06d}.png",
                  nrow=len(fixed))

    stage = LossStage("vae", Trainable("vae", vae, section.optim), loss_fn, on_sample)
    shipped, metrics = run_loop(stage, out_dir, generator=generator, log_every=log_every,
                                checkpoint_every=checkpoint_every, sample_every=sample_every, progress=progress)
    vae = shipped["vae"]
    if section.auto_latent_scale:
        std = measure_latent_std(vae, dataset, torch.Generator().manual_seed(seed))
        vae.config.latent_scale = round(1.0 / std, 4)
        metrics["latent_std"] = std
    metrics["latent_scale"] = vae.config.latent_scale
    if distributed.is_main():
        save_pretrained(vae, out_dir / "vae", metadata={"stage": "vae", **metrics})
    distributed.barrier()
    return vae, metrics


@register_pretrain_stage("vae")
def vae_stage(recipe, out_dir: Path, inputs) -> dict:
    inputs.vae, metrics = train_vae(recipe.pretrain.vae, recipe.data, inputs.dataset, out_dir, **loop_settings(recipe))
    return metrics
