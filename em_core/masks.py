"""Masks from cross-attention: maps averaged over random timesteps, thresholded, CRF-refined."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .attention import AttentionCapture, concept_selector
from .concepts import ConceptSet, encode_text, image_sizes, injected, unet_inputs
from .crf import CRFParams, refine_masks
from .unclaimed import give_parts, give_unclaimed

FALLBACK_FRACTION = 0.1  # a concept with an empty mask keeps its most attended 10% of pixels


@torch.no_grad()
def attention_maps(bundle, concepts: ConceptSet, image, n_timesteps: int = 50, batch: int = 10,
                   generator: torch.Generator | None = None, layers: str = "all",
                   stop_early: bool = True, stratified: bool = True, t_range: tuple | None = None) -> torch.Tensor:
    """(K_i, h, w) maps of the image's concepts, averaged over `n_timesteps` random timesteps.

    `stratified`: one random timestep in each of `n_timesteps` equal slices of the schedule rather
    than independent draws; the same expected map with less spread (on the tiny world 30
    stratified timesteps come as close to a 400-timestep map as 50 independent ones:
    benchmarks/mask_estimate_error.py). The timesteps run through the U-Net `batch` at a time
    rather than one by one, and each U-Net call stops right after the last captured layer (the
    finer up-blocks after it cannot change the maps).
    """
    generator = generator or torch.Generator().manual_seed(0)
    dev = bundle.device
    n_train = bundle.scheduler.config.num_train_timesteps
    timesteps = draw_timesteps(n_timesteps, n_train, generator, stratified, t_range)
    noise = torch.randn((n_timesteps, *image.latent_mean.shape[1:]), generator=generator)
    z0 = image.latent_mean[0:1]
    concept_ids = concepts.token_ids(bundle)
    token_ids = [concept_ids[concepts.index(n)] for n in image.names]
    with injected(bundle, concepts):
        cond = encode_text(bundle, [image.prompt])
    ids = cond.ids
    select = concept_selector(ids, token_ids)
    missing = [n for n, hit in zip(image.names, select[0].sum(0).tolist()) if hit == 0]
    if missing:
        raise ValueError(f"prompt {image.prompt!r}: {missing} fell beyond the text encoder's token limit; shorten it")
    total = None
    with AttentionCapture(bundle.unet, layers, stop_early) as cap:
        for start in range(0, n_timesteps, batch):
            t = timesteps[start:start + batch]
            b = len(t)
            noisy = bundle.scheduler.add_noise(z0.expand(b, -1, -1, -1).cpu(), noise[start:start + b], t)
            noisy = noisy.to(dev, bundle.dtype)
            kw = unet_inputs(bundle, cond, b, **image_sizes(bundle, image))
            _, maps = cap.run(select.expand(b, -1, -1), image.latent_hw,
                              lambda: bundle.unet(noisy, t.to(dev), **kw).sample)
            part = maps.float().sum(0)
            total = part if total is None else total + part
    return (total / n_timesteps).cpu()


def draw_timesteps(n: int, n_train: int, generator: torch.Generator, stratified: bool = True,
                   t_range: tuple | None = None) -> torch.Tensor:
    """n timesteps in [lo, hi) (default [0, n_train)): one uniform draw in each of n equal slices,
    or n independent draws."""
    lo, hi = t_range if t_range is not None else (0, n_train)
    hi = min(hi, n_train)
    if not 0 <= lo < hi:
        raise ValueError(f"mask timestep range: [{lo}, {hi}) is empty or outside [0, {n_train})")
    if not stratified:
        return torch.randint(lo, hi, (n,), generator=generator)
    u = torch.rand((n,), generator=generator, dtype=torch.float64)
    return (lo + (torch.arange(n, dtype=torch.float64) + u) * (hi - lo) / n).long().clamp_max(hi - 1)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own min and max; a flat map becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    span = hi - lo
    return torch.where(span > 1e-12, (maps - lo) / span.clamp_min(1e-12), torch.zeros_like(maps))


def binarise(maps: torch.Tensor, size: tuple[int, int], threshold: float, names: list[str],
             previous: np.ndarray | None = None, stickiness: float = 0.0, exclusive: bool = False) -> np.ndarray:
    """(K, H, W) bool at image size (W, H); empty masks fall back to the top pixels, with a warning.

    With `previous` masks (K, H, W) and `stickiness` s, the score thresholded is
    (1 - s) * map + s * previous: a hysteresis, where a pixel stays in its concept's mask while its
    map is above (threshold - s) / (1 - s) and joins only above threshold / (1 - s). It keeps one
    noisy estimate (a few random timesteps) from flipping a mask that the ones before agreed on.
    `exclusive`: see `claim_exclusively`.
    """
    up = F.interpolate(normalise(maps)[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]
    up = torch.nan_to_num(up, nan=0.0)
    if previous is not None and stickiness:
        prev = torch.from_numpy(np.asarray(previous, dtype=np.float32))
        if prev.shape != up.shape:
            raise ValueError(f"previous masks: shape {tuple(prev.shape)}, expected {tuple(up.shape)}")
        up = (1.0 - stickiness) * up + stickiness * prev
    masks = (up > threshold).numpy()
    if exclusive:
        raw = F.interpolate(maps[None].float(), size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]
        masks = claim_exclusively(torch.nan_to_num(raw, nan=0.0), masks, threshold)
    for k, name in enumerate(names):
        if not masks[k].any():
            flat = up[k].flatten()
            keep = max(1, int(FALLBACK_FRACTION * flat.numel()))
            idx = torch.argsort(flat, descending=True, stable=True)[:keep]
            fallback = np.zeros(flat.numel(), dtype=bool)
            fallback[idx.numpy()] = True
            masks[k] = fallback.reshape(masks[k].shape)
            warnings.warn(
                f"mask of {name} is empty at threshold {threshold}; kept its {FALLBACK_FRACTION:.0%} "
                "most attended pixels instead (lower the threshold to keep more)", stacklevel=2,
            )
    return masks


def claim_exclusively(attention: torch.Tensor, masks: np.ndarray, threshold: float) -> np.ndarray:
    """Each pixel claimed by several thresholded masks goes to the concept that pixel attends to
    most (`attention`: the raw maps at image size; at one pixel they are shares of one softmax, so
    they compare across concepts, as the maps normalised each by its own peak do not). A concept
    that so loses most of its mask thresholds its map again over the pixels no other concept
    claims, renormalised there. Two tokens whose maps peak on one object (two objects of one kind,
    both started from its word; a token whose word the model does not know) otherwise share that
    object and leave the other one to nobody."""
    masks = masks.copy()
    a = attention.numpy()
    before = masks.sum(axis=(1, 2))
    owner = np.where(masks, a, -np.inf).argmax(0)
    for k in range(len(masks)):
        masks[k] &= owner == k
    for k in np.argsort(-a.reshape(len(a), -1).max(1), kind="stable"):  # the most attended first
        if masks[k].sum() >= 0.5 * before[k]:
            continue
        free = ~np.delete(masks, k, axis=0).any(0)
        if not free.any():
            continue
        hi, lo = a[k][free].max(), a[k][free].min()
        if hi - lo > 1e-12:
            masks[k] = free & ((a[k] - lo) / (hi - lo) > threshold)
    return masks


def estimate_masks(bundle, concepts: ConceptSet, image, *, n_timesteps=50, batch=10, threshold=0.5,
                   use_crf=True, crf_params: CRFParams = CRFParams(), fixed: dict | None = None,
                   generator=None, layers="all", stratified=True, t_range=None,
                   background: str | None = None, previous: np.ndarray | None = None,
                   stickiness: float = 0.0, exclusive: bool = False,
                   fill_lost: bool = False, share_parts: bool = False) -> tuple[np.ndarray, torch.Tensor]:
    """Image-size bool masks (K_i, H, W) and the raw maps they came from.

    `fixed` maps concept name -> a user mask (H, W) that is kept as it is; it still takes
    part in the CRF so the other concepts are pushed off it. `background`, `previous`,
    `stickiness`, `exclusive`, `fill_lost`, `share_parts`: see masks_from_maps.
    """
    maps = attention_maps(bundle, concepts, image, n_timesteps, batch, generator, layers, stratified=stratified,
                          t_range=t_range)
    masks = masks_from_maps(image, maps, threshold=threshold, use_crf=use_crf, crf_params=crf_params, fixed=fixed,
                            background=background, previous=previous, stickiness=stickiness,
                            exclusive=exclusive, fill_lost=fill_lost, share_parts=share_parts)
    return masks, maps


def masks_from_maps(image, maps: torch.Tensor, *, threshold=0.5, use_crf=True, crf_params: CRFParams = CRFParams(),
                    fixed: dict | None = None, keep: dict | None = None, background: str | None = None,
                    previous: np.ndarray | None = None, stickiness: float = 0.0,
                    exclusive: bool = False, fill_lost: bool = False, share_parts: bool = False) -> np.ndarray:
    """(K_i, H, W) bool masks from (K_i, h, w) averaged maps: threshold, then DenseCRF.

    `fixed`: user masks, kept as they are. `keep`: masks of concepts that have no new map (their
    rows of `maps` are ignored); they go through the CRF like the others. `background`: a
    concept whose mask is the pixels no other concept claims (when the image has it and it is
    neither fixed nor kept). `previous`: the masks before this estimate (K_i, H, W), blended into
    the normalised maps with weight `stickiness` before the threshold (see `binarise`). `exclusive`:
    overlaps go to the concept a pixel attends to most, before the CRF, and a concept left with little of
    its mask looks again where no other concept is (`claim_exclusively`). `fill_lost`: after the CRF,
    a concept left with (nearly) nothing takes an object-sized region no concept claims
    (`unclaimed.give_unclaimed`). `share_parts`: after that, a concept still left with nothing takes the
    part of another concept's mask where its share of the two raw maps is highest (`unclaimed.give_parts`).
    """
    fixed, keep = fixed or {}, keep or {}
    given = {**keep, **fixed}
    bg = background if background in image.names and background not in given and len(image.names) > 1 else None
    rows = [k for k, n in enumerate(image.names) if n not in given and n != bg]
    masks = np.zeros((len(image.names), image.size[1], image.size[0]), dtype=bool)
    if rows:
        prior = None if previous is None else np.asarray(previous, dtype=bool)[rows]
        masks[rows] = binarise(maps[rows], image.size, threshold, [image.names[k] for k in rows], prior, stickiness,
                               exclusive)
    for k, name in enumerate(image.names):
        if name in given:
            masks[k] = given[name]
    if bg is not None:
        k = image.names.index(bg)
        others = np.delete(masks, k, axis=0).any(0)
        masks[k] = ~others
        if not masks[k].any():
            masks[k] = binarise(maps[k:k + 1], image.size, threshold, [bg])[0]
            warnings.warn(f"background {bg}: the other concepts claim every pixel; took its own map instead",
                          stacklevel=2)
    if use_crf:
        masks = refine_keeping(image, masks, crf_params, fixed)
    if (fill_lost or share_parts) and rows:
        raw = F.interpolate(maps[None].float(), size=(image.size[1], image.size[0]), mode="bilinear",
                            align_corners=False)[0]
        raw = torch.nan_to_num(raw, nan=0.0).numpy()
        free = [k for k, n in enumerate(image.names) if n not in given]
        if fill_lost:
            masks, _ = give_unclaimed(masks, raw, free)
        if share_parts:
            masks, _ = give_parts(masks, raw, free)
    return masks


def refine_keeping(image, masks: np.ndarray, params: CRFParams, fixed) -> np.ndarray:
    """DenseCRF on an image's masks; the concepts named in `fixed` (user masks) come out as they went in,
    though they still push the other concepts off their pixels."""
    return restore_fixed(image.names, refine_masks(image.rgb, masks, params, image.names), masks, fixed)


def restore_fixed(names, refined: np.ndarray, masks: np.ndarray, fixed) -> np.ndarray:
    for k, name in enumerate(names):
        if name in fixed:
            refined[k] = masks[k]
    return refined


def latent_masks(masks: np.ndarray, latent_hw: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """(K, h, w) float masks on the latent grid.

    'nearest' (the default, as Break-A-Scene's `F.interpolate(mask, size=(64, 64))`): each cell
    takes the mask's value at one pixel of it, so the masks stay binary; 'area': the fraction of
    each cell inside the mask.
    """
    t = torch.from_numpy(np.asarray(masks, dtype=np.float32))[None]
    return F.interpolate(t, size=latent_hw, mode=mode)[0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
