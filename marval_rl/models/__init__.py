"""Models: every network we train, load or save. Each saved architecture registers itself where it is
defined (``@register_architecture``, models/architectures.py); importing this package registers them all.

Generators: the MAR backbone (mar.py), its diffusion head (head.py, diffusion.py), the one-step MARVAL
student (one_step.py), the KL VAE (vae.py). Evaluator networks: the emoji classifier (classifier.py) and
the embedded CLIP (embedded_clip.py), with their shared input preprocessing (preprocess.py).
"""
from marval_rl.models.architectures import ARCHITECTURES, register_architecture
from marval_rl.models.checkpoints import (CheckpointError, load_official_mar, load_official_vae,
                                          load_pretrained, save_pretrained)
from marval_rl.models.classifier import ClassifierConfig, EmojiClassifier
from marval_rl.models.diffusion import GaussianDiffusion
from marval_rl.models.embedded_clip import EmbeddedCLIP, EmbeddedCLIPConfig
from marval_rl.models.head import DiffLoss, DiffusionSampler, SimpleMLPAdaLN
from marval_rl.models.mar import MAR, MARConfig, mar_base, mar_huge, mar_large
from marval_rl.models.one_step import MARVAL, MARVALConfig
from marval_rl.models.vae import AutoencoderKL, VAEConfig

__all__ = ["MAR", "MARConfig", "mar_base", "mar_large", "mar_huge", "DiffLoss", "DiffusionSampler", "SimpleMLPAdaLN",
           "GaussianDiffusion", "AutoencoderKL", "VAEConfig", "MARVAL", "MARVALConfig", "EmojiClassifier",
           "ClassifierConfig", "EmbeddedCLIP", "EmbeddedCLIPConfig", "load_official_mar", "load_official_vae",
           "load_pretrained", "save_pretrained", "CheckpointError", "ARCHITECTURES", "register_architecture"]
