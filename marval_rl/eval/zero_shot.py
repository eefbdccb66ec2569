"""Zero-shot classification with the embedded CLIP (models/embedded_clip.py): a prompt ensemble over the
training templates, and each template alone (the worst one says how much the ensemble hides)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from marval_rl.data.prompts import TRAIN_TEMPLATES, prompt
from marval_rl.models.embedded_clip import EmbeddedCLIP


@torch.no_grad()
def class_text_features(model: EmbeddedCLIP, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[len(templates), C, D] normalised text features of every (template, class) prompt."""
    out = []
    for t in templates:
        out.append(model.encode_text([prompt(n, t) for n in names]))
    return torch.stack(out)


@torch.no_grad()
def zero_shot_eval(model: EmbeddedCLIP, images: torch.Tensor, labels: torch.Tensor, names: Sequence[str],
                   templates: Sequence[str] | None = None, batch_size: int = 256) -> dict:
    """Zero-shot accuracy on uint8 or [0, 1] images: prompt ensemble over ``templates`` and per template."""
    was = model.training
    model.eval()
    templates = list(templates or TRAIN_TEMPLATES)
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    img = torch.cat([model.encode_image(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    txt = class_text_features(model, names, templates)                      # [T, C, D]
    ens = F.normalize(txt.mean(0), dim=-1)
    sims = img @ ens.T
    per_template = {t: float(((img @ txt[i].T).argmax(1) == labels).float().mean()) for i, t in enumerate(templates)}
    true_cos = (img * ens[labels]).sum(-1)
    other = sims.clone()
    other[torch.arange(len(labels)), labels] = float("nan")
    model.train(was)
    return {"accuracy": float((sims.argmax(1) == labels).float().mean()),
            "min_template_accuracy": min(per_template.values()),
            "per_template": per_template,
            "cos_true": float(true_cos.mean()), "cos_other": float(other.nanmean()), "n": int(len(labels))}
