"""Offline stand-ins for the published FID files (tests only; nothing is downloaded):

* an Inception weights file in the layout of ``pt_inception-2015-12-05-6726825d.pth``. Its keys and shapes
  are taken from torchvision's ``inception_v3(aux_logits=False, num_classes=1008)``, the module pytorch-fid
  loads the published file into (strictly), so the layout comes from outside the code under test. The
  weights are random but scaled (He-normal convolutions, identity batch norms) so that pool3 features and
  logits stay O(1) through the 94 convolutions instead of overflowing;
* a reference-statistics ``.npz`` in MAR's ``fid_stats/adm_in256_stats.npz`` format (``mu``, ``sigma``).
"""
from pathlib import Path

import numpy as np
import torch


def make_inception_file(path: Path, seed: int = 0) -> Path:
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    state = net.state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            v.copy_(torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif k.endswith("bn.weight") or k.endswith("bn.running_var"):
            v.fill_(1.0)
        elif k.endswith("bn.bias") or k.endswith("bn.running_mean"):
            v.zero_()
        elif k == "fc.weight":
            v.copy_(torch.randn(v.shape, generator=g) * 2.0 / v.shape[1] ** 0.5)
        elif k == "fc.bias":
            v.copy_(torch.randn(v.shape, generator=g))
    # the TF-converted files carry no BatchNorm step counters
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    return path


def make_reference_npz(path: Path, dim: int = 2048, seed: int = 0, n: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n or dim + 64, dim)) * rng.uniform(0.2, 2.0, size=dim) + rng.normal(size=dim)
    np.savez(path, mu=x.mean(0), sigma=np.cov(x, rowvar=False))
    return path
