"""Mask quality against known masks: the IoU per concept at every mask refresh (paper Fig. 3)."""
from __future__ import annotations

import numpy as np

from .masks import iou, latent_masks


def iou_curve(state, truth: dict) -> list[dict]:
    """[{step, iou: {imgI: {name: IoU}}}] for each refresh in the state's mask history.

    `truth` maps (image index, name) -> bool mask at the image's working size; the
    comparison is made on the latent grid the masks live on (cells more than half inside).
    """
    curve = []
    for entry in state.mask_history:
        scores = {}
        for (i, name), true in truth.items():
            names = state.images[i]["names"]
            if name not in names:
                raise KeyError(f"truth: {name} is not a concept of image {i + 1} ({names})")
            est = entry["masks"][i][names.index(name)].numpy() > 0.5
            ref = latent_masks(np.asarray(true)[None], est.shape)[0].numpy() > 0.5
            scores.setdefault(f"img{i + 1}", {})[name] = iou(est, ref)
        curve.append({"step": entry["step"], "iou": scores})
    return curve


def mean_iou(entry: dict) -> float:
    values = [v for per in entry["iou"].values() for v in per.values()]
    return float(np.mean(values)) if values else float("nan")


def attention_like(mask: np.ndarray, rng: np.random.Generator, grid: int = 16, blur: float = 1.0,
                   noise: float = 0.05, threshold: float = 0.25) -> np.ndarray:
    """A coarse mask shaped like a thresholded attention map: `mask` reduced to grid x grid,
    blurred, with noise, blown back up and thresholded low so that it spills over the edges.
    The stand-in for a real model's attention when measuring DenseCRF against human masks.
    """
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    h, w = mask.shape
    small = np.asarray(Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((grid, grid), Image.BOX),
                       np.float32) / 255
    small = gaussian_filter(small, blur) + rng.normal(0, noise, small.shape)
    big = Image.fromarray(np.clip(small * 255, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(big, np.float32) / 255 > threshold
