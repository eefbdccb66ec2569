"""Models: the MAR backbone, its diffusion head, the Gaussian diffusion and the KL VAE."""
from marval_rl.models.checkpoints import (CheckpointError, load_official_mar, load_official_vae,
                                          load_pretrained, save_pretrained)
from marval_rl.models.diffusion import GaussianDiffusion
from marval_rl.models.head import DiffLoss, SimpleMLPAdaLN
from marval_rl.models.mar import MAR, MARConfig, mar_base, mar_huge, mar_large
from marval_rl.models.vae import AutoencoderKL, VAEConfig

__all__ = ["MAR", "MARConfig", "mar_base", "mar_large", "mar_huge", "DiffLoss", "SimpleMLPAdaLN",
           "GaussianDiffusion", "AutoencoderKL", "VAEConfig", "load_official_mar", "load_official_vae",
           "load_pretrained", "save_pretrained", "CheckpointError"]
