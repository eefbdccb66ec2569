"""Example custom reward: the colourfulness metric of Hasler & Suesstrunk (2003), in torch.

Use it from a recipe without touching the package:

    rewards:
      - {name: "rewards/examples/colorfulness.py:Colorfulness", weight: 0.1, kwargs: {target: 0.35}}

or in Python: ``build_reward("rewards/examples/colorfulness.py:Colorfulness", target=0.35)``.
"""

from marval_rl.rewards import RewardModel


class Colorfulness(RewardModel):
    """C = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2) with rg = R - G, yb = (R + G) / 2 - B
    (images in [0, 1], so C is about 0..1). With ``target`` the reward is ``-|C - target|``, else ``C``."""

    name = "colorfulness"
    differentiable = True      # pure torch: gradients reach the pixels
    set_level = False          # each image is scored on its own
    requires_prompts = False   # prompts are accepted and ignored

    def __init__(self, target: float | None = None):
        super().__init__()
        self.target = target

    def score(self, images, prompts, metadata):
        r, g, b = images.unbind(1)
        rg, yb = r - g, 0.5 * (r + g) - b
        std = (rg.flatten(1).var(1, unbiased=False) + yb.flatten(1).var(1, unbiased=False) + 1e-12).sqrt()
        mean = (rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2 + 1e-12).sqrt()
        c = std + 0.3 * mean
        return c if self.target is None else -(c - self.target).abs()
