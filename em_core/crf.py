"""DenseCRF refinement of binary concept masks against the RGB image (Krähenbühl & Koltun).

One label per concept plus background. The unary is the softmax of the stack of binary
masks, as the paper describes; pairwise terms use CutLER's hyper-parameters by default.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class CRFParams:
    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_weight: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_weight: float = 4.0
    unary_scale: float = 1.0  # logits = scale * binary mask before the softmax
    # Inference runs with the longer side at most this many pixels (None: the image's own size);
    # the label probabilities are then resized back. Cost grows with the pixel count.
    max_side: int | None = 256

    def to_dict(self) -> dict:
        return asdict(self)


def _check(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    masks = np.asarray(masks)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected an (H, W, 3) RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8) if image.dtype.kind == "f" else image.astype(np.uint8)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks: expected (K, H, W) matching the image's {image.shape[:2]}, got {masks.shape}; "
            "resize the masks to the image first"
        )
    return np.array(image, dtype=np.uint8, order="C", copy=True), masks.astype(np.float32) > 0.5


def crf_probabilities(image: np.ndarray, masks: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """(K+1, H, W) label probabilities after mean-field inference; label 0 is background."""
    import pydensecrf.densecrf as dcrf

    image, masks = _check(image, masks)
    h, w = image.shape[:2]
    if params.max_side and max(h, w) > params.max_side:
        return _at_most(image, masks, params, params.max_side)
    background = ~masks.any(0, keepdims=True)
    logits = params.unary_scale * np.concatenate([background, masks]).astype(np.float32)
    probs = np.exp(logits - logits.max(0, keepdims=True))
    probs /= probs.sum(0, keepdims=True)
    n_labels = probs.shape[0]
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-8, 1.0)).reshape(n_labels, -1)))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_weight)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image,
                             compat=params.bilateral_weight)
    q = np.array(crf.inference(params.iterations), dtype=np.float32)
    return q.reshape(n_labels, h, w)


def _at_most(image: np.ndarray, masks: np.ndarray, params: CRFParams, side: int) -> np.ndarray:
    """crf_probabilities on a copy scaled so its longer side is `side`, resized back."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / max(h, w)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))
    small_masks = np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize((sw, sh), Image.BOX)) > 0.5
                            for m in masks])
    q = crf_probabilities(small, small_masks, CRFParams(**{**asdict(params), "max_side": None}))
    return np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.BILINEAR)) for c in q])


def refine_masks(image: np.ndarray, masks: np.ndarray, params: CRFParams = CRFParams(), names=None) -> np.ndarray:
    """(K, H, W) bool refined masks: each pixel goes to its most likely label, so none overlap.

    A concept the CRF wipes out is not left empty: it takes back the pixels of its input
    mask where its own probability is in its top tenth, and the other masks give them up.
    """
    _, binary = _check(image, masks)
    q = crf_probabilities(image, masks, params)
    labels = q.argmax(0)
    out = np.stack([labels == k + 1 for k in range(binary.shape[0])])
    for k in range(out.shape[0]):
        if out[k].any() or not binary[k].any():
            continue
        own = q[k + 1][binary[k]]
        keep = binary[k] & (q[k + 1] >= np.quantile(own, 0.9))
        name = names[k] if names else f"mask {k}"
        warnings.warn(f"DenseCRF removed {name} entirely; kept the most likely tenth of its input", stacklevel=2)
        out[:, keep] = False
        out[k] = keep
    return out
