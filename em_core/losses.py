"""Break-A-Scene's two losses: masked diffusion loss (paper eq. 3), cross-attention loss (eq. 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, union: torch.Tensor | None) -> torch.Tensor:
    """MSE of prediction and target under `union` (B, 1, h, w); plain MSE when union is None.

    Averaged over all latent elements as Break-A-Scene does, so a small mask weighs less.
    """
    if union is None:
        return F.mse_loss(pred.float(), target.float())
    union = union.to(pred.dtype)
    return F.mse_loss((pred * union).float(), (target * union).float())


def outside_loss(pred: torch.Tensor, base_pred: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """MSE of the prediction and the base model's outside `union`, averaged as the masked loss.

    The masked loss leaves what the model draws around a concept free; a fine-tune that moves the
    whole U-Net fills it with the training scene (neighbours' pieces, its background). This holds
    it at what the base model draws there from the same text.
    """
    return masked_diffusion_loss(pred, base_pred.detach(), 1 - union)


def attention_loss(maps: torch.Tensor, masks: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Sum over the present concepts of MSE(map / max(map), mask), divided by the batch size.

    Break-A-Scene's reduction (train.py: `attn_loss += F.mse_loss(...)` for each mask of the
    step, then `attn_loss / train_batch_size`), so with k concepts in a step the term is k times
    one concept's, at the same weight. Masks are brought to the maps' grid with nearest
    interpolation, as BaS's `F.interpolate(mask, size=(16, 16))`.
    maps (B, K, h, w), masks (B, K, H, W) in [0, 1], present (B, K) bool.
    """
    if masks.shape[-2:] != maps.shape[-2:]:
        masks = F.interpolate(masks.float(), size=maps.shape[-2:], mode="nearest")
    peak = maps.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]
    per = ((maps.float() / peak - masks.float()) ** 2).flatten(2).mean(-1)  # (B, K)
    present = present.to(device=per.device, dtype=per.dtype)
    if not bool(present.any()):
        return maps.sum() * 0.0
    return (per * present).sum() / maps.shape[0]
