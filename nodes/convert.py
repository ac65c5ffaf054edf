"""ComfyUI's IMAGE (B, H, W, 3) and MASK (B, H, W) float tensors <-> the engine's PIL / numpy."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def images_to_pil(images: torch.Tensor) -> list[Image.Image]:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise ValueError(f"image: expected a ComfyUI IMAGE batch (B, H, W, 3), got {getattr(images, 'shape', None)}")
    arr = (images[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a, "RGB") for a in arr]


def pil_to_images(pils: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(p.convert("RGB"), np.float32) / 255.0 for p in pils]))


def masks_to_tensor(masks: list[np.ndarray], size: tuple[int, int] | None = None) -> torch.Tensor:
    """A MASK batch from boolean / float (H, W) arrays, resized to `size` (W, H) if given."""
    out = []
    for m in masks:
        img = Image.fromarray((np.asarray(m, np.float32).clip(0, 1) * 255).round().astype(np.uint8), "L")
        if size is not None and img.size != size:
            img = img.resize(size, Image.BILINEAR)
        out.append(np.asarray(img, np.float32) / 255.0)
    return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 64, 64)
