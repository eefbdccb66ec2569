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

from marval_rl import distributed
from marval_rl.config import MARTrainSection
from marval_rl.eval.images import save_grid
from marval_rl.models.checkpoints import save_pretrained
from marval_rl.models.mar import MAR, MARConfig
from marval_rl.config import RecipeError
from marval_rl.data.batches import LatentBatches
from marval_rl.loading import load_vae
from marval_rl.models.vae import AutoencoderKL
from marval_rl.pretrain.common import loop_settings, register_pretrain_stage
from marval_rl.training import LossStage, Trainable, run_loop
from marval_rl.sampling import sample_tokens


def check_pair(config: MARConfig, vae: AutoencoderKL, image_size: int | None = None) -> None:
    """A MAR teacher and a VAE fit together only with the same latent grid and channel count."""
    if config.vae_stride != vae.config.stride or config.vae_embed_dim != vae.config.embed_dim:
        raise ValueError(f"MAR expects latents of stride {config.vae_stride} with {config.vae_embed_dim} "
                         f"channels, the VAE makes stride {vae.config.stride} with {vae.config.embed_dim}")
    if image_size is not None and config.img_size != image_size:
        raise ValueError(f"MAR img_size {config.img_size} differs from the data's image_size {image_size}")


def sharded_draws(model: MAR, batch_size: int, gen: torch.Generator) -> dict:
    """MAR's training draws for a global batch of ``batch_size``, in the order ``MAR.forward`` makes them
    (orders, mask ratio, label drop, head timesteps, head noise), cut to this rank's samples: a data-parallel
    rank passes them to ``forward`` so N ranks compute one process's loss at the global batch."""
    dev, mul, L, C = gen.device, model.diffusion_batch_mul, model.seq_len, model.token_embed_dim
    rows = distributed.local_rows(batch_size)
    draws = {"orders": model.sample_orders(batch_size, gen)[rows], "mask_rate": model.sample_mask_rate(gen)}
    if model.training and model.config.label_drop_prob > 0:
        draws["label_drop"] = (torch.rand(batch_size, generator=gen, device=dev) < model.config.label_drop_prob)[rows]
    n = mul * batch_size * L            # head rows are tiled: [all rows; all rows; ...] (mul times)
    t = torch.randint(0, model.diffloss.train_diffusion.num_timesteps, (n,), generator=gen, device=dev)
    noise = torch.randn((n, C), generator=gen, device=dev)
    draws["t"] = t.reshape(mul, batch_size, L)[:, rows].reshape(-1).to(model.device)
    draws["noise"] = noise.reshape(mul, batch_size, L, C)[:, rows].reshape(-1, C).to(model.device)
    draws["label_drop"] = draws["label_drop"].to(model.device) if "label_drop" in draws else None
    return draws


def train_mar(section: MARTrainSection, dataset, vae: AutoencoderKL, out_dir: Path, *, seed: int,
              image_size: int, log_every: int, checkpoint_every: int, sample_every: int,
              device: str = "cpu", progress: bool = True) -> tuple[MAR, dict]:
    config = MARConfig.from_dict({"vae_embed_dim": vae.config.embed_dim, **dict(section.config)})
    check_pair(config, vae, image_size)
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None and num_classes > config.class_num:
        raise ValueError(f"the data has {num_classes} classes but MAR class_num is {config.class_num}")
    distributed.check_divides(section.optim.batch_size, "pretrain.mar.optim.batch_size")
    torch.manual_seed(seed)
    model = MAR(config).to(device)
    vae = vae.to(device).eval()
    batches = LatentBatches(dataset, vae, image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    grid_labels = torch.arange(min(16, config.class_num))

    def loss_fn(step, gen):
        latents, labels = batches.sample(section.optim.batch_size, gen, device)
        if not distributed.active():
            return model(latents, labels, generator=gen), {}
        return model(latents, labels, **sharded_draws(model, section.optim.batch_size, gen)), {}

    def on_sample(step, ema_model):
        res = sample_tokens(ema_model, labels=grid_labels, num_iter=min(8, ema_model.seq_len), cfg=3.0,
                            generator=torch.Generator().manual_seed(0), record_noise=False)
        images = vae.decode_images(res.tokens)
        save_grid(images, out_dir / "samples" / f"mar_samples_{step:06d}.png", nrow=8)

    # MAR: no weight decay anywhere in the diffusion head
    stage = LossStage("mar", Trainable("mar", model, section.optim, no_decay_containing=("diffloss.",)),
                      loss_fn, on_sample)
    shipped, metrics = run_loop(stage, out_dir, generator=generator, log_every=log_every,
                                checkpoint_every=checkpoint_every, sample_every=sample_every, progress=progress)
    teacher = shipped["mar"]
    if distributed.is_main():
        save_pretrained(teacher, out_dir / "teacher", metadata={"stage": "mar", "ema": section.optim.ema, **metrics})
    distributed.barrier()
    return teacher, metrics


@register_pretrain_stage("mar")
def mar_stage(recipe, out_dir: Path, inputs) -> dict:
    """Train the teacher on the VAE an earlier ``vae`` stage left, or the recipe's ``vae.checkpoint``."""
    if inputs.vae is None:
        inputs.vae = load_vae(recipe.vae, recipe.device)
        if inputs.vae is None:
            raise RecipeError("stage 'mar' needs a VAE: run stage 'vae' first or set vae.checkpoint")
    _, metrics = train_mar(recipe.pretrain.mar, inputs.dataset, inputs.vae, out_dir,
                           image_size=recipe.data.image_size, **loop_settings(recipe))
    return metrics
