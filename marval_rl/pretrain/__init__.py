"""``marval-rl pretrain``: train the embedded default's models from scratch (VAE, MAR teacher, evaluators).

Each stage registers itself where it is defined (``@register_pretrain_stage``, pretrain/common.py) and
runs on the shared training loop (marval_rl/training.py); importing this package registers them all.
"""
from marval_rl.pretrain import classifier, clip, mar, vae  # noqa: F401  (registers the stages)
from marval_rl.pretrain.common import PRETRAIN_STAGES, PretrainInputs, register_pretrain_stage

__all__ = ["PRETRAIN_STAGES", "PretrainInputs", "register_pretrain_stage"]
