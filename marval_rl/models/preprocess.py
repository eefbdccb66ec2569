"""Image preprocessing in torch that every evaluator network applies to [0, 1] images: the input
check, resize + centre crop with antialiasing, per-channel normalisation. Differentiable, so a reward
built on such a network passes gradients back to the pixels."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def check_images(images, what: str = "images") -> None:
    """Raise a clear ValueError unless ``images`` is a float [B, 3, H, W] tensor with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected {what} as a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected {what} of shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float {what} in [0, 1], got dtype {images.dtype} "
                         f"(convert uint8 with images.float() / 255)")
    if images.numel() == 0 or images.device.type == "meta":
        return
    lo, hi = torch.aminmax(images.detach())
    # A small tolerance: decoders and resampling overshoot [0, 1] by rounding error.
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"expected {what} in [0, 1] (the evaluator convention), got values in "
                         f"[{lo.item():.3f}, {hi.item():.3f}]; images in [-1, 1] need (x + 1) / 2")


def _size_pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_center_crop(images: torch.Tensor, size: int | tuple[int, int], crop: int | tuple[int, int] | None = None,
                       mode: str = "bicubic", resize_mode: str = "shortest", crop_rounding: str = "round",
                       clamp: bool = True) -> torch.Tensor:
    """Differentiable equivalent of ``Resize(size) -> CenterCrop(crop)`` on images in [0, 1].

    ``resize_mode``: "shortest" (the shorter side becomes ``size``, the longer ``int(size * long / short)``,
    torchvision's and the HF processors' rule), "longest" (fit inside, then centre-pad is *not* done; used
    only by squash-free configs) or "squash" (resize both sides to ``size``). Resampling uses torch's
    antialiased kernels, which follow PIL's filters, so downscaling does not alias. ``crop_rounding``:
    "round" (torchvision's CenterCrop) or "floor" (the HF slow image processors). ``clamp`` mimics the
    uint8 rounding range of PIL output.
    """
    h, w = images.shape[-2:]
    if resize_mode == "shortest":
        s = size if isinstance(size, int) else min(size)
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = s, int(s * long / short)
        new_hw = (new_short, new_long) if h <= w else (new_long, new_short)
    elif resize_mode == "longest":
        s = size if isinstance(size, int) else max(size)
        scale = s / max(h, w)
        new_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    elif resize_mode == "squash":
        new_hw = _size_pair(size)
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r} (shortest | longest | squash)")
    x = images
    if tuple(new_hw) != (h, w):
        smooth = mode in ("bilinear", "bicubic")
        kw = dict(mode=mode, antialias=smooth, align_corners=False if smooth else None)
        if smooth and clamp and new_hw[0] != h and new_hw[1] != w:
            # PIL resamples horizontally, then vertically, clipping to the pixel range in between; doing the
            # same brings bicubic overshoot at sharp edges in line with it (max error 1/255 instead of ~7/255).
            x = F.interpolate(x, size=(h, new_hw[1]), **kw).clamp(0, 1)
            x = F.interpolate(x, size=new_hw, **kw)
        else:
            x = F.interpolate(x, size=new_hw, **kw)
        if clamp:
            x = x.clamp(0, 1)
    if crop is not None:
        ch, cw = _size_pair(crop)
        h, w = x.shape[-2:]
        if (ch, cw) != (h, w):
            if ch > h or cw > w:  # torchvision pads with zeros when the crop is larger than the image
                pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
                x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
                h, w = x.shape[-2:]
            if crop_rounding == "round":
                top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            else:
                top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
    return x


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
